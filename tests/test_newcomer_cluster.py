"""A newcomer's order of things, from a fresh HOME: a local run first (`python -m
raydsnas.search`), the README's deploy snippet on its child, a rerun with a changed config
(refused, nothing written), then the README's one-machine cluster (`ray start --head`) and its
`ray job submit` command. Unlike
tests/test_job_submit.py, the home directory is not empty when the head starts: it holds
whatever the local run left there (a local Ray that left `~/.ray/auth_token` made the next
`ray start` turn token auth on, and the README's submit then failed with AuthenticationError).
"""

import json
import os
import subprocess
import sys
import urllib.request
import uuid

import pytest

from tests.test_job_submit import BIN, ROOT, ray_head, submit_job


@pytest.mark.slow
def test_ray_job_submit_succeeds_on_a_head_started_after_a_local_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               GLOO_SOCKET_IFNAME="lo", RAYDSNAS_CACHE=str(tmp_path / "cache"))
    short = ["--set", "search.epochs=1", "--set", "search.max_steps_per_epoch=2",
             "--set", "search.bn_recalibration_batches=1"]

    local = subprocess.run(
        [sys.executable, "-m", "raydsnas.search", "--config", str(ROOT / "jobs" / "local.yaml"),
         "--set", "name=first-run", *short],
        cwd=home, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert (home / "runs" / "first-run" / "subnet" / "arch.json").exists()
    assert not (home / ".ray" / "auth_token").exists()

    # The README's deploy snippet, word for word but for where the child is.
    from tests.test_readme import readme_python_blocks

    (snippet,) = [b for b in readme_python_blocks() if "imagenet-dsnas/subnet" in b]
    snippet = snippet.replace("s3://my-bucket/raydsnas-runs/imagenet-dsnas/subnet",
                              str(home / "runs" / "first-run" / "subnet"))
    shown = subprocess.run([sys.executable, "-c", snippet], cwd=home, env=env, check=False,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    record = json.loads((home / "runs" / "first-run" / "subnet" / "arch.json").read_text())
    assert shown.stdout.split()[-2:] == [str(record["meta"]["top1"]), str(record["flops"])]

    # A rerun of that run with another h: refused before Ray starts, the run left as it was.
    before = {p: p.read_bytes() for p in (home / "runs").rglob("*") if p.is_file()}
    rerun = subprocess.run(
        [sys.executable, "-m", "raydsnas.search", "--config", str(ROOT / "jobs" / "local.yaml"),
         "--set", "name=first-run", *short, "--set", "search.h=0.29"],
        cwd=home, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    assert "search.h 0.15 -> 0.29" in rerun.stderr and "--set name=first-run-2" in rerun.stderr
    assert {p: p.read_bytes() for p in (home / "runs").rglob("*") if p.is_file()} == before

    with ray_head(env, home) as dashboard:
        submission = f"raydsnas-test-{uuid.uuid4().hex[:8]}"
        # The README's command, plus a submission id, the cache and a shorter run.
        runtime_env = {"env_vars": {"RAYDSNAS_CACHE": str(tmp_path / "cache")}}
        submit = submit_job(dashboard, submission, runtime_env, env, [
            "python", "-m", "raydsnas.search", "--config", "jobs/local.yaml", *short])
        assert "AuthenticationError" not in submit.stderr, submit.stderr[-3000:]
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        with urllib.request.urlopen(f"{dashboard}/api/jobs/{submission}", timeout=10) as r:
            assert json.loads(r.read())["status"] == "SUCCEEDED"
    record = json.loads((home / "runs" / "dsnas-digits" / "subnet" / "arch.json").read_text())
    assert record["meta"]["steps"] == 2
