"""The README stays true: its config reference is what the config classes generate, every key is
documented, and every command in it is run here or by a named test (or by .ci/run); commands
that need a cloud account are covered by validating the files they take."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raydsnas import reference
from raydsnas.data.builtin import builtin_shard_set

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# README command (regex) -> where it is exercised: "this file", ".ci/run", or tests that run it
# (or, for cloud commands, that validate exactly the files it takes).
COVERAGE = {
    r"pip install -e '\.\[test\]'": [".ci/run"],
    r"python -m pytest -q": [".ci/run"],
    r"python -m raydsnas\.search": [
        "tests/test_search_cli.py::test_default_run_with_no_arguments_writes_an_accurate_child"],
    r"python -m raydsnas\.data\.shard /data/imagenet/train s3://\S+ --val-src \S+": [
        "tests/data/test_shards.py::test_cli_writes_a_shard_set",
        "tests/data/test_shards.py::test_s3_round_trip_gives_original_pixels_and_labels"],
    r"python -m raydsnas\.search --config jobs/imagenet\.yaml --dry-run --cluster clusters/aws\.yaml": [
        "tests/test_readme.py::test_readme_dry_run_on_s3_shards",
        "tests/test_readme.py::test_readme_dry_run_without_the_bucket_still_checks_the_rest"],
    r"python -m raydsnas\.search --config jobs/local\.yaml --dry-run": [
        "tests/test_readme.py::test_readme_local_dry_run"],
    r"ray up clusters/aws\.yaml|ray dashboard clusters/aws\.yaml": [
        "tests/test_clusters.py::test_launcher_yaml_passes_ray_schema"],
    r"docker build -f clusters/Dockerfile .*": [
        "tests/test_clusters.py::test_pinned_requirements_satisfy_pyproject"],
    r"kubectl apply -f clusters/kuberay-cluster\.yaml|kubectl port-forward service/raydsnas-head-svc 8265:8265": [
        "tests/test_clusters.py::test_kuberay_manifest_passes_ray_autoscaler"],
    r"ray job submit --address http://127\.0\.0\.1:8265 --working-dir \. (--runtime-env-json .* )?-- python -m raydsnas\.search --config jobs/\S+\.yaml": [
        "tests/test_job_submit.py::test_ray_job_submit_runs_the_local_job_on_a_real_head",
        "tests/test_newcomer_cluster.py::test_ray_job_submit_succeeds_on_a_head_started_after_a_local_run",
        "tests/test_preflight.py::test_every_job_passes_its_preflight",
        "tests/test_autoscaling.py::"
        "test_autoscaler_launches_grows_replaces_a_preempted_node_and_the_job_succeeds"],
    r"bash clusters/local-autoscaling\.sh": [
        "tests/test_autoscaling.py::"
        "test_autoscaler_launches_grows_replaces_a_preempted_node_and_the_job_succeeds",
        "tests/test_autoscaling.py::"
        "test_nodes_come_from_zero_go_when_idle_and_an_impossible_request_is_reported"],
    r"python -m raydsnas\.search --config jobs/local-autoscaling\.yaml --dry-run --cluster "
    r"clusters/local-autoscaling\.yaml": [
        "tests/test_preflight.py::"
        "test_an_elastic_max_the_autoscaler_can_never_launch_fails_the_dry_run"],
    r"curl -s http://127\.0\.0\.1:8265/api/train/v2/runs/v1": [
        "tests/test_autoscaling.py::"
        "test_autoscaler_launches_grows_replaces_a_preempted_node_and_the_job_succeeds"],
    r"python -m raydsnas\.tune --config jobs/local-sweep\.yaml": [
        "tests/test_tune.py::test_asha_stops_trials_early_and_the_following_trials_still_run"],
    r"tensorboard --logdir runs": [
        "tests/test_search_cli.py::test_default_run_with_no_arguments_writes_an_accurate_child"],
    r"python -m raydsnas\.report runs/digits-sweep -o sweep\.html": [
        "tests/test_tune.py::test_html_report_renders_the_sweep_and_a_run_with_every_plot"],
    r"python -m raydsnas\.export runs/dsnas-digits/subnet": [
        "tests/test_search_cli.py::test_default_run_with_no_arguments_writes_an_accurate_child"],
    r"python -m raydsnas\.search --config jobs/local\.yaml --set search\.h=0\.2 --print-config": [
        "tests/test_readme.py::test_readme_print_config"],
    r"python -m raydsnas\.search --set name=digits-alone --set search\.strategy=fixed --set "
    r"'search\.arch=\[[0-9,]+\]'": [
        "tests/test_readme.py::test_readme_trains_a_fixed_architecture_alone"],
}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def ensure_bucket(fs: pafs.S3FileSystem, bucket: str) -> None:
    """Create `bucket` unless an earlier test of this session's S3 server did."""
    if fs.get_file_info(bucket).type != pafs.FileType.Directory:
        fs.create_dir(bucket)


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.DOTALL)


# Distinctive line of a README Python block -> (what the test puts in place first, the code run
# before the block: the names the block takes as given).
PYTHON_BLOCKS = {
    'load_child("s3://my-bucket/raydsnas-runs/imagenet-dsnas/subnet")': "",
    "search = DSNAS(space, DSNASConfig(": (
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        "loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), "
        "generator=g)) for _ in range(2)]\n"),
}


def test_config_reference_in_readme_is_generated_from_the_classes():
    block = README.split(reference.START, 1)[1].split(reference.END, 1)[0]
    assert block.strip() == reference.render().strip(), \
        "README's config reference is stale: run python -m raydsnas.reference --update README.md"
    assert reference.undocumented() == []
    for key in ("search.h", "search.global_batch_size", "data.uri", "scaling.num_workers",
                "storage.uri", "space.width_mult", "sweep.params"):
        assert f"| `{key}` |" in block


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 15
    for command in commands:
        matches = [p for p in COVERAGE if re.fullmatch(p, command)]
        assert len(matches) == 1, f"README command not covered (or covered twice): {command}"
    ci = (ROOT / ".ci" / "run").read_text().replace("python -m pip install -q", "pip install")
    for pattern, where in COVERAGE.items():
        assert any(re.fullmatch(pattern, c) for c in commands), f"stale coverage entry {pattern}"
        for item in where:
            if item == ".ci/run":
                assert re.search(pattern, ci), pattern
                continue
            path, name = item.split("::")
            tree = ast.parse((ROOT / path).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{item} does not exist"


def test_readme_print_config():
    (command,) = [c for c in readme_commands() if c.endswith("--print-config")]
    out = subprocess.run(command.split(), check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                              f"{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["search"]["h"] == 0.2 and config["name"] == "dsnas-digits"


def test_readme_dry_run_on_s3_shards(s3_server, tmp_path):
    """The README's dry run, word for word, against `s3://my-bucket/imagenet-shards` on the
    loopback S3 server (holding the digits' shards), reached through AWS_ENDPOINT_URL as a user
    would reach MinIO."""
    (command,) = [c for c in readme_commands() if "--dry-run --cluster clusters/aws.yaml" in c]
    fs = s3_server.filesystem()
    ensure_bucket(fs, "my-bucket")
    local = builtin_shard_set("digits")
    pafs.copy_files(local, "my-bucket/imagenet-shards", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "AWS_ENDPOINT_URL": s3_server.endpoint_url,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(command.split(), check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "s3://my-bucket/imagenet-shards: 1500 train / 297 val samples, 10 classes" in out.stdout
    assert "workers:           8, each 8 CPU, 1 GPU" in out.stdout
    assert "preflight: OK" in out.stdout
    # The README quotes the run's figures: the same lines (for 1000 classes) come out here.
    readme_lines = [line for line in README.splitlines() if line.startswith("batch:  ")]
    assert readme_lines and readme_lines[0] in out.stdout


def test_readme_dry_run_without_the_bucket_still_checks_the_rest(s3_server):
    """The README's ImageNet dry run where its bucket does not exist (a reader without the
    data): every check that needs no data is still printed, then the data error; exit 2."""
    (command,) = [c for c in readme_commands() if "--dry-run --cluster clusters/aws.yaml" in c]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "AWS_ENDPOINT_URL": s3_server.endpoint_url,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([*command.split(), "--set", "data.uri=s3://no-such-bucket-raydsnas/x"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "s3://no-such-bucket-raydsnas/x: cannot be read (below); the checks that follow " \
        "assume 1000 classes" in out.stdout
    for line in ("workers:           8, each 8 CPU, 1 GPU", "memory/worker:",
                 "child networks:", "PROBLEM:           data.uri: ", "preflight: FAILED"):
        assert line in out.stdout, out.stdout
    assert "no-such-bucket-raydsnas" in out.stdout.split("PROBLEM:")[1]
    assert "Traceback" not in out.stderr


def test_readme_local_dry_run():
    (command,) = [c for c in readme_commands() if c.endswith("jobs/local.yaml --dry-run")]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(command.split(), check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "builtin:digits: 1500 train / 297 val samples, 10 classes" in out.stdout
    assert "preflight: OK" in out.stdout


@pytest.mark.slow
def test_readme_trains_a_fixed_architecture_alone(tmp_path):
    """The README's `fixed` command as written, shortened to 2 epochs of 3 steps by two more
    `--set`s (later ones win): the run trains exactly that architecture and exports it."""
    import shlex

    from raydsnas import load_child

    (command,) = [c for c in readme_commands() if "search.strategy=fixed" in c]
    arch = json.loads(re.search(r"search\.arch=(\[[0-9,]+\])", command).group(1))
    args = shlex.split(command) + ["--set", "search.epochs=2", "--set",
                                   "search.max_steps_per_epoch=3"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAYDSNAS_CACHE": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(args, check=False, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    child = load_child(str(tmp_path / "runs" / "digits-alone" / "subnet"))
    assert list(child.arch) == arch
    assert child.meta["strategy"] == "fixed"


def test_every_python_block_of_the_readme_runs(s3_server, tmp_path):
    """Each ```python block of the README, word for word, in a fresh interpreter, against the
    loopback S3 server (reached through AWS_ENDPOINT_URL, as a user reaches MinIO). The deploy
    snippet reads an ImageNet-space child saved where it says, with a run's metadata keys."""
    from raydsnas import SearchSpace, save_child

    fs = s3_server.filesystem()
    for bucket in ("my-bucket", "bucket"):
        ensure_bucket(fs, bucket)
    space = SearchSpace.imagenet(1000)
    arch = [1, 0, 2, 3] * 5
    save_child(space.child(arch), "s3://my-bucket/raydsnas-runs/imagenet-dsnas/subnet",
               meta={"top1": 0.7321, "top5": 0.9102, "worker_hours": 12.5},
               storage_options=s3_server.storage_options, program=False)
    blocks = readme_python_blocks()
    assert len(blocks) == len(PYTHON_BLOCKS)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    outputs = {}
    for block in blocks:
        keys = [k for k in PYTHON_BLOCKS if k in block]
        assert len(keys) == 1, f"README Python block not known to this test:\n{block}"
        script = tmp_path / "block.py"
        script.write_text(PYTHON_BLOCKS[keys[0]] + block)
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=env)
        assert out.returncode == 0, f"{block}\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        outputs[keys[0]] = out.stdout
    deploy = outputs['load_child("s3://my-bucket/raydsnas-runs/imagenet-dsnas/subnet")']
    assert deploy.strip() == f"{arch} 0.7321 {space.flops(arch)}"
    assert "my-run/subnet/arch.json" in {info.path.split("runs/", 1)[-1] for info in
                                        fs.get_file_info(pafs.FileSelector("bucket",
                                                                          recursive=True))}
