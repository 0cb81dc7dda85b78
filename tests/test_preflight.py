"""`python -m raydsnas.search --dry-run`: the preflight's numbers against independent ones, and
early failure on jobs that cannot fit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydsnas.config import load_config
from raydsnas.preflight import (
    Capacity,
    NodeType,
    estimate_memory,
    load_cluster,
    preflight,
    saved_activation_bytes,
)
from raydsnas.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args):
    """The CLI in its own process (as users run it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raydsnas.search", "--dry-run", *args],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True,
                          timeout=300)


def dry_run_here(capsys, monkeypatch, *args):
    """The same CLI entry point in this process (no interpreter start-up per call)."""
    from types import SimpleNamespace

    from raydsnas.search import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["--dry-run", *args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_default_dry_run_prints_the_facts():
    out = dry_run()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "name: dsnas-digits" in text  # the resolved config comes first
    assert "builtin:digits: 1500 train / 297 val samples, 10 classes" in text
    assert "23 steps/epoch x 12 epochs" in text  # 1500 // 64
    space = load_config().space.build(10)
    params = sum(p.numel() for p in space.supernet().parameters())
    assert f"supernet:          {params / 1e6:.3f}M parameters" in text
    lo, hi = space.flops(space.flops_table().smallest()), space.flops(space.flops_table().largest())
    assert f"{lo / 1e6:.2f}M .. {hi / 1e6:.2f}M FLOPs" in text
    assert "preflight: OK" in text
    assert not (ROOT / "runs" / "dsnas-digits-never").exists()


def test_imagenet_job_fits_every_cluster_file():
    for cluster in ("aws", "gcp", "kuberay-cluster", "kuberay-job"):
        job = load_config(ROOT / "jobs" / "imagenet.yaml", ["data.uri=synthetic:1000/2048/64"])
        result = preflight(job, load_cluster(ROOT / "clusters" / f"{cluster}.yaml"),
                           gpu_memory_gib=40)
        assert result.ok, (cluster, result.problems)
        assert result.worker_counts == (8, 8)
        assert result.per_worker_resources == {"CPU": 8, "GPU": 1}
        # The paper space's extremes (issue 2's table, from an independent forward-hook count).
        assert round(result.flops_range[0] / 1e4) == 27036 and \
            round(result.flops_range[1] / 1e4) == 39861


def test_dry_run_fails_early_on_jobs_that_cannot_fit(capsys, monkeypatch):
    out = dry_run_here(capsys, monkeypatch, "--config", "jobs/imagenet.yaml",
                       "--cluster", "clusters/aws.yaml",
                       "--set", "data.uri=synthetic:1000/4096/64",
                       "--set", "scaling.num_workers=24",
                       "--set", "search.global_batch_size=1020")
    assert out.returncode == 2
    assert "search.global_batch_size = 1020 does not divide over 24 workers" in out.stdout
    assert "needs 24 workers (24 GPUs); clusters/aws.yaml holds at most 16" in out.stdout
    assert "preflight: FAILED (2 problem(s))" in out.stdout
    # A GPU job on this CPU-only machine, without a cluster file.
    out = dry_run_here(capsys, monkeypatch, "--config", "jobs/cifar-like.yaml",
                       "--set", "data.uri=synthetic:10/512/64")
    if not torch.cuda.is_available():
        assert out.returncode == 2 and "no node of this machine" in out.stdout
    # A batch too large for the GPU the user names.
    out = dry_run_here(capsys, monkeypatch, "--config", "jobs/imagenet.yaml",
                       "--cluster", "clusters/kuberay-cluster.yaml",
                       "--set", "data.uri=synthetic:1000/65536/64",
                       "--set", "search.global_batch_size=16384", "--gpu-memory-gib", "16")
    assert out.returncode == 2 and "exceeds 80% of the GPU's 16 GiB" in out.stdout
    # An unreachable data set is a problem naming its URL, after every check that needs no
    # data; a bad cluster file names itself.
    out = dry_run_here(capsys, monkeypatch, "--set", "data.uri=/nonexistent/shards")
    assert out.returncode == 2 and "PROBLEM:           data.uri: " in out.stdout
    assert "/nonexistent/shards" in out.stdout.split("PROBLEM:")[1]
    assert "memory/worker:" in out.stdout and "preflight: FAILED (1 problem(s))" in out.stdout
    out = dry_run_here(capsys, monkeypatch, "--cluster", "clusters/missing.yaml")
    assert out.returncode == 2 and "clusters/missing.yaml" in out.stderr


def test_activation_estimate_is_affine_and_matches_a_measurement():
    """The estimate extrapolates from batches 2 and 4; a measurement at batch 6 agrees."""
    space = SearchSpace(num_classes=10, input_size=16, width_mult=0.5, stage_repeats=(1, 1, 2, 1),
                        stem_stride=1, dropout=0.0)
    arch = space.flops_table().largest()
    est = estimate_memory(space, 6, world=1)
    measured = saved_activation_bytes(space, arch, 6)
    assert abs(est.activations - measured) <= 0.02 * measured
    params = sum(p.numel() for p in space.supernet().parameters())
    assert est.weights == est.optimizer == 4 * params
    assert est.gradients == 4 * space.params(arch)
    # bf16 autocast on a GPU halves the saved activations (checked on an H200: README).
    assert estimate_memory(space, 6, world=1, amp=True).activations == round(
        est.activations / 2) or abs(estimate_memory(space, 6, world=1, amp=True).activations
                                    - est.activations / 2) <= 1
    # Two workers also hold the all-reduce buffer of the path's gradients.
    assert estimate_memory(space, 6, world=2).gradients == 2 * est.gradients


def test_capacity_counts_workers_per_node_and_the_global_limit():
    gpu = NodeType("gpu", {"CPU": 96, "GPU": 8}, max_nodes=3)
    small = NodeType("small", {"CPU": 8, "GPU": 1}, max_nodes=10)
    head = NodeType("head", {"CPU": 0}, 1)
    cap = Capacity("c", [head, gpu, small], max_worker_nodes=4)
    # The 8-GPU nodes first (3 x 8), then one 1-GPU node under the global limit of 4 nodes.
    assert cap.workers_fit({"CPU": 8, "GPU": 1}) == (25, ["gpu", "small"])
    assert cap.workers_fit({"CPU": 16, "GPU": 2})[0] == 3 * 4
    assert cap.workers_fit({"CPU": 1, "GPU": 16}) == (0, [])


def test_an_elastic_max_the_autoscaler_can_never_launch_fails_the_dry_run(capsys, monkeypatch,
                                                                         tmp_path):
    """Autoscaler v2 (a `ray up` file, KubeRay's `version: v2`) launches nothing for Ray
    Train's request of all `max` workers when the cluster can never hold them: a problem (exit
    2, saying what to change). Under KubeRay's v1 (which launches what it can) a warning."""
    args = ["--config", "jobs/local-autoscaling.yaml", "--set", "scaling.num_workers=[1,4]"]
    out = dry_run_here(capsys, monkeypatch, *args, "--cluster", "clusters/local-autoscaling.yaml")
    assert out.returncode == 2, out.stdout
    assert ("scaling.num_workers = [1, 4] asks Ray's autoscaler for 4 workers at once; "
            "clusters/local-autoscaling.yaml holds at most 2") in out.stdout
    assert "Set scaling.num_workers to [1, 2], or raise max_workers" in out.stdout
    assert "of node type(s) worker" in out.stdout
    ok = dry_run_here(capsys, monkeypatch, *args[:2], "--cluster",
                      "clusters/local-autoscaling.yaml")
    assert ok.returncode == 0 and "preflight: OK" in ok.stdout

    import yaml

    cluster = yaml.safe_load((ROOT / "clusters" / "kuberay-cluster.yaml").read_text())
    big = ["--config", "jobs/imagenet.yaml", "--set", "data.uri=synthetic:1000/65536/64",
           "--set", "scaling.num_workers=[8,64]"]
    for version, code in (("v2", 2), ("v1", 0)):
        cluster["spec"]["autoscalerOptions"]["version"] = version
        path = tmp_path / f"kuberay-{version}.yaml"
        path.write_text(yaml.safe_dump(cluster))
        out = dry_run_here(capsys, monkeypatch, *big, "--cluster", str(path))
        assert out.returncode == code, (version, out.stdout)
        assert f"{path} holds at most 32" in out.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_passes_its_preflight(path):
    """Each shipped job fits the cluster it is written for (data swapped for a synthetic set of
    the same size class, since the buckets are placeholders)."""
    import yaml

    from raydsnas.config import parse_config
    from raydsnas.tune import load_sweep

    raw = yaml.safe_load(path.read_text())
    sweep = "sweep" in raw
    if path.name == "local-autoscaling.yaml":  # its one-machine autoscaling cluster
        job = load_config(path)
        result = preflight(job, load_cluster(ROOT / "clusters" / "local-autoscaling.yaml"))
    elif raw["scaling"].get("use_gpu"):
        overrides = ["data.uri=synthetic:1000/65536/64"]
        job = parse_config(load_sweep(str(path), overrides)[0]) if sweep else load_config(path, overrides)
        result = preflight(job, load_cluster(ROOT / "clusters" / "aws.yaml"))
    else:
        job = parse_config(load_sweep(str(path))[0]) if sweep else load_config(path)
        result = preflight(job, Capacity("laptop", [NodeType("head", {"CPU": 2}, 1)],
                                         autoscaling=False))
    assert result.ok, result.problems


def test_memory_follows_the_strategy_and_the_gpu_generation(tmp_path):
    """SNAS keeps every candidate's activations, ProxylessNAS two paths'; a pre-Ampere GPU
    (no bf16: the search runs in fp32) gets no bf16 discount."""
    from dataclasses import fields

    import yaml

    from raydsnas.strategies import STRATEGIES

    raw = yaml.safe_load((ROOT / "jobs" / "imagenet.yaml").read_text())
    keys = {name: {f.name for f in fields(STRATEGIES[name].config)} for name in STRATEGIES}
    dsnas_only = keys["dsnas"] - (keys["snas"] & keys["proxyless"])
    for key in dsnas_only & set(raw["search"]):  # DSNAS's own keys
        raw["search"].pop(key)
    raw["data"]["uri"] = "synthetic:1000/4096/64"
    memory = {}
    for strategy in ("dsnas", "snas", "proxyless"):
        raw["search"]["strategy"] = strategy
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
        result = preflight(load_config(tmp_path / "job.yaml"),
                           load_cluster(ROOT / "clusters" / "aws.yaml"))
        memory[strategy] = result.memory
    assert memory["snas"].activations == pytest.approx(4 * memory["dsnas"].activations, rel=1e-6)
    assert memory["proxyless"].activations == pytest.approx(2 * memory["dsnas"].activations,
                                                            rel=1e-6)
    volta = Capacity("p3", [NodeType("gpu", {"CPU": 64, "GPU": 8}, 2, 16, bf16=False)])
    ampere = Capacity("p4d", [NodeType("gpu", {"CPU": 96, "GPU": 8}, 2, 40, bf16=True)])
    job = load_config(ROOT / "jobs" / "imagenet.yaml", ["data.uri=synthetic:1000/4096/64"])
    fp32, bf16 = preflight(job, volta).memory, preflight(job, ampere).memory
    assert fp32.activations == pytest.approx(2 * bf16.activations, rel=1e-6)


def test_dry_run_with_a_dashboard_address_warns_instead_of_crashing():
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"}
    out = subprocess.run([sys.executable, "-m", "raydsnas.search", "--dry-run"], cwd=ROOT,
                         env=env, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resources not checked" in out.stdout and "--cluster FILE" in out.stdout
