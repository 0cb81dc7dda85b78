"""The search job on a real local Ray (in this process): data-parallel equivalence, both sampling
policies, recovery from a killed worker, S3 storage. Runs through the command line (resume,
elasticity, the default) are in test_search_cli.py."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

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


def run_cli(sets: list[str], cwd: Path, env_extra: dict | None = None,
            extra_args: list[str] = (), **kw):
    """`python -m raydsnas.search --set ... [extra_args]` in its own process group (so a test
    can kill the driver together with the local Ray it started)."""
    env = {**os.environ, "RAY_ADDRESS": "", **(env_extra or {})}
    args = [a for item in sets for a in ("--set", item)] + list(extra_args)
    return subprocess.Popen([sys.executable, "-m", "raydsnas.search", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_two_workers_shared_policy_equal_one_worker_with_the_whole_batch(ray_local, tmp_path):
    # No search deadline: at a deadline near-tied layers freeze on an argmax that float
    # reduction order may flip; this test is about the updates being the same.
    one = run_search(load_config(None, synthetic_sets(tmp_path, "one",
                                                      **{"search.freeze_by": "null"})))
    two = run_search(load_config(None, synthetic_sets(
        tmp_path, "two", **{"scaling.num_workers": 2, "scaling.sync_bn": "true",
                            "search.freeze_by": "null"})))
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
    assert child.meta["flops"] == child.space.flops(child.arch)


@pytest.mark.slow
def test_per_rank_policy_runs_with_ranks_in_sync(ray_local, tmp_path):
    # Ranks are checked against each other every epoch; a divergence would fail the run.
    outcome = run_search(load_config(None, synthetic_sets(
        tmp_path, "per-rank", **{"scaling.num_workers": 2, "search.sampling": "per_rank"})))
    state = final_state(tmp_path / "per-rank")["strategy"]
    assert state["step"] == 8
    assert outcome.record["meta"]["top1"] >= 0


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
