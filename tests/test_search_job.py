"""The search job on a real local Ray: data-parallel equivalence, both sampling policies, resume
after the driver is killed, recovery from a killed worker, and elastic resizing."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from raydsnas import load_child
from raydsnas.config import load_config
from raydsnas.train.launcher import run_search

REPO = Path(__file__).resolve().parents[1]


def synthetic_sets(storage: Path, name: str, **extra) -> list[str]:
    sets = {
        "name": name, "storage": str(storage),
        "data.uri": "synthetic:4/256/64", "data.image_size": 16,
        "space.preset": "cifar", "space.input_size": 16, "space.width_mult": 0.25,
        "space.stage_repeats": "[1,1,2,1]",
        "search.epochs": 2, "search.global_batch_size": 32, "search.lr": 0.05,
        "search.lr_reference_batch": 32, "search.alpha_lr": 0.05, "search.h": 0.15,
        "search.freeze_check_every": 3, "search.max_steps_per_epoch": 4,
        "search.warmup_epochs": 0, "search.bn_recalibration_batches": 2, "search.log_every": 100,
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 1, "scaling.max_failures": 0,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest last (by epoch, then by write time)."""
    found = [p for p in run_dir.glob("epoch_*") if (p / "state.pt").exists()]
    return sorted(found, key=lambda p: (p.name.split("-")[0], (p / "state.pt").stat().st_mtime))


def final_state(run_dir: Path) -> dict:
    return torch.load(checkpoints(run_dir)[-1] / "state.pt", weights_only=True)


def run_cli(sets: list[str], cwd: Path, env_extra: dict | None = None, **kw):
    """`python -m raydsnas.search --set ...` in its own process group (so a test can kill the
    driver together with the local Ray it started)."""
    env = {**os.environ, "RAY_ADDRESS": "", **(env_extra or {})}
    args = [a for item in sets for a in ("--set", item)]
    return subprocess.Popen([sys.executable, "-m", "raydsnas.search", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_two_workers_shared_policy_equal_one_worker_with_the_whole_batch(ray_local, tmp_path):
    one = run_search(load_config(None, synthetic_sets(tmp_path, "one")))
    two = run_search(load_config(None, synthetic_sets(
        tmp_path, "two", **{"scaling.num_workers": 2, "scaling.sync_bn": "true"})))
    a, b = final_state(tmp_path / "one")["strategy"], final_state(tmp_path / "two")["strategy"]
    assert a["step"] == b["step"] == 8
    assert a["frozen"] == b["frozen"]
    # Adam divides each alpha gradient by its magnitude, so where a layer's credit is ~1e-7
    # (BN-shielded layers) float reduction order moves alpha by a fraction of one Adam step
    # (alpha_lr 0.05). The weights, updated by SGD, agree far more tightly.
    assert (b["alpha"] - a["alpha"]).abs().max() < 0.2 * 0.05
    assert (a["alpha"] - a["alpha"].mean()).abs().max() > 0.05  # alpha really moved
    for key, value in a["supernet"].items():
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(b["supernet"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert one.record["arch"] == two.record["arch"]
    child = load_child(two.subnet_uri)
    assert child.meta["meta"]["flops"] == child.space.flops(child.arch)


@pytest.mark.slow
def test_per_rank_policy_runs_with_ranks_in_sync(ray_local, tmp_path):
    # Ranks are checked against each other every epoch; a divergence would fail the run.
    outcome = run_search(load_config(None, synthetic_sets(
        tmp_path, "per-rank", **{"scaling.num_workers": 2, "search.sampling": "per_rank"})))
    state = final_state(tmp_path / "per-rank")["strategy"]
    assert state["step"] == 8
    assert outcome.record["meta"]["top1"] >= 0


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_result_as_an_uninterrupted_run(ray_local, tmp_path,
                                                                          monkeypatch):
    extra = {"search.epochs": 4, "search.sampling": "shared", "data.uri": "builtin:digits",
             "data.preserve_order": "true", "data.image_size": 16, "search.max_steps_per_epoch": 3,
             "search.global_batch_size": 32, "space.num_classes": "auto"}
    env = {"RAYDSNAS_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("RAYDSNAS_CACHE", env["RAYDSNAS_CACHE"])
    run_search(load_config(None, synthetic_sets(tmp_path / "a", "run", **extra)))  # uninterrupted

    interrupted = run_cli(synthetic_sets(tmp_path / "b", "run", **extra), tmp_path, env)
    deadline = time.time() + 600
    while not any(p.name.startswith("epoch_000002") for p in checkpoints(tmp_path / "b" / "run")):
        assert interrupted.poll() is None and time.time() < deadline, interrupted.stdout.read()
        time.sleep(0.2)
    os.killpg(interrupted.pid, signal.SIGKILL)  # the driver and the local Ray it started
    interrupted.wait(timeout=60)
    assert not (tmp_path / "b" / "run" / "subnet").exists()

    resumed = run_cli(synthetic_sets(tmp_path / "b", "run", **extra), tmp_path, env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from epoch 2" in out or "resumed from epoch 3" in out
    a = final_state(tmp_path / "a" / "run")["strategy"]
    b = final_state(tmp_path / "b" / "run")["strategy"]
    assert a["step"] == b["step"] == 12
    torch.testing.assert_close(b["alpha"], a["alpha"], rtol=1e-5, atol=1e-6)
    assert a["frozen"] == b["frozen"]


def _train_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_completes(ray_local, tmp_path):
    job = load_config(None, synthetic_sets(tmp_path, "ft", **{
        "search.epochs": 5, "scaling.max_failures": 2, "scaling.num_workers": 2}))
    killed = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline:
            if checkpoints(tmp_path / "ft"):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint)
    killer.start()
    outcome = run_search(job)
    killer.join()
    assert killed, "the test never found a worker to kill"
    assert killed[0] not in _train_worker_pids()
    state = final_state(tmp_path / "ft")
    assert state["epoch"] == 5 and state["strategy"]["step"] == 20
    assert load_child(outcome.subnet_uri).arch == outcome.record["arch"]


def _history(run_dir: Path) -> list[dict]:
    for latest in reversed(checkpoints(run_dir)):
        try:
            return json.loads(torch.load(latest / "state.pt", weights_only=True)["history"])
        except (OSError, RuntimeError, EOFError):  # being written or rotated away
            continue
    return []


def _registered_world_size(run_dir: Path) -> int | None:
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["metrics"]["world_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@pytest.mark.slow
def test_elastic_run_grows_and_shrinks_with_the_cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # inherited by the cluster's workers
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    proc = None
    try:
        run_dir = tmp_path / "elastic"
        proc = run_cli(synthetic_sets(tmp_path, "elastic", **{
            "scaling.num_workers": "[1,2]", "scaling.elastic_resize_interval_s": 2,
            "scaling.max_failures": 6, "search.epochs": 40}),
            tmp_path, {"RAY_ADDRESS": cluster.address})

        def wait_for(condition, what):
            deadline = time.time() + 300
            while not condition():
                assert proc.poll() is None, f"run ended while waiting for {what}: " + proc.stdout.read()[-3000:]
                assert time.time() < deadline, f"timed out waiting for {what}"
                time.sleep(0.5)

        wait_for(lambda: len(_history(run_dir)) >= 2, "two epochs")
        extra = cluster.add_node(num_cpus=1)
        # Ray Train registers reported checkpoints a little later; wait for a registered
        # 2-worker checkpoint, so that the shrink restarts from one.
        wait_for(lambda: _registered_world_size(run_dir) == 2, "a registered 2-worker checkpoint")
        cluster.remove_node(extra)
        wait_for(lambda: _history(run_dir)[-1]["world_size"] == 1
                 and any(h["world_size"] == 2 for h in _history(run_dir)), "shrinking back")
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    sizes = [h["world_size"] for h in _history(run_dir)]
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1
    assert [h["epoch"] for h in _history(run_dir)] == list(range(1, 41))
    assert (run_dir / "subnet" / "arch.json").exists()


@pytest.mark.slow
def test_default_run_with_no_arguments_writes_an_accurate_child(tmp_path):
    proc = run_cli([], tmp_path, {"RAYDSNAS_CACHE": str(tmp_path / "cache")})
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:]
    subnet = tmp_path / "runs" / "dsnas-digits" / "subnet"
    assert f"child network: {subnet}" in out
    child = load_child(str(subnet))
    top1 = child.meta["meta"]["top1"]
    assert top1 > 0.6  # 10 classes: chance is 0.1
    assert (tmp_path / "runs" / "dsnas-digits" / "events").is_dir()


@pytest.mark.slow
def test_run_on_s3_storage_writes_checkpoints_and_subnet_without_secrets(ray_local, s3_server,
                                                                         tmp_path):
    from tests.conftest import TEST_SECRET_ACCESS_KEY

    bucket = s3_server.make_bucket("runs")
    sets = synthetic_sets(tmp_path, "s3run", **{
        "storage.uri": f"s3://{bucket}/runs", "storage.options.endpoint_url": s3_server.endpoint_url})
    sets = [s for s in sets if not s.startswith("storage=")]
    outcome = run_search(load_config(None, sets))
    assert outcome.subnet_uri == f"s3://{bucket}/runs/s3run/subnet"
    objects = s3_server.object_contents(bucket)
    names = sorted(objects)
    assert f"{bucket}/runs/s3run/subnet/arch.json" in names
    assert any("/runs/s3run/epoch_000002-" in n and n.endswith("/state.pt") for n in names)
    assert any("/runs/s3run/events/" in n for n in names)
    assert not any(TEST_SECRET_ACCESS_KEY.encode() in data for data in objects.values())
    child = load_child(outcome.subnet_uri, storage_options=s3_server.storage_options)
    assert child.arch == outcome.record["arch"]
