"""The search job through its command line, each run in its own process with its own Ray (as
users run it): resume after the driver is killed, elastic resizing on a multi-node cluster, and
the no-argument default. No in-process Ray here (see the `ray_local` fixture's note)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raydsnas import load_child
from tests.test_search_job import checkpoints, final_state, run_cli, synthetic_sets


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_result_as_an_uninterrupted_run(tmp_path):
    # h = 1: no layer settles by itself, the deadline (end of epoch 3) freezes them all; the
    # kill lands at or before it, so the resumed run must reach the same deadline.
    extra = {"search.epochs": 4, "search.sampling": "shared", "data.uri": "builtin:digits",
             "data.preserve_order": "true", "data.image_size": 16, "search.max_steps_per_epoch": 3,
             "search.global_batch_size": 32, "space.num_classes": "auto", "search.h": 1.0,
             "search.freeze_by": 3}
    env = {"RAYDSNAS_CACHE": str(tmp_path / "cache")}
    reference = run_cli(synthetic_sets(tmp_path / "a", "run", **extra), tmp_path, env)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

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
    # Ray Train registers a reported checkpoint shortly after it is written, so the run resumes
    # from the last *registered* one: epoch 1 or 2 here, never from scratch.
    resumed_from = re.search(r"resumed from epoch (\d+)", out)
    assert resumed_from and 1 <= int(resumed_from.group(1)) <= 3, out[-3000:]
    a = final_state(tmp_path / "a" / "run")["strategy"]
    b = final_state(tmp_path / "b" / "run")["strategy"]
    assert a["step"] == b["step"] == 12
    torch.testing.assert_close(b["alpha"], a["alpha"], rtol=1e-5, atol=1e-6)
    assert a["frozen"] == b["frozen"] and len(a["frozen"]) == 5  # stage_repeats [1,1,2,1]
    assert a["search_end_step"] == b["search_end_step"] == 9  # 3 epochs x 3 steps
    assert a["forced"] == b["forced"] == list(range(5))


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
        # The search deadline at epoch 20 of 40 (h = 1: no layer settles by itself) must hold
        # across the restarts that every resize is.
        proc = run_cli(synthetic_sets(tmp_path, "elastic", **{
            "scaling.num_workers": "[1,2]", "scaling.elastic_resize_interval_s": 2,
            "scaling.max_failures": 6, "search.epochs": 40, "search.h": 1.0,
            "search.freeze_by": 0.5}),
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
    history = _history(run_dir)
    assert [h["epoch"] for h in history] == list(range(1, 41))
    assert [h["frozen"] for h in history] == [0] * 19 + [5] * 21
    assert {h.get("search_end_epoch") for h in history[19:]} == {20}
    assert {h.get("search_end_step") for h in history[19:]} == {20 * 4}
    assert (run_dir / "subnet" / "arch.json").exists()


@pytest.mark.slow
def test_default_run_with_no_arguments_writes_an_accurate_child(tmp_path):
    proc = run_cli([], tmp_path, {"RAYDSNAS_CACHE": str(tmp_path / "cache")})
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:]
    subnet = tmp_path / "runs" / "dsnas-digits" / "subnet"
    assert f"child network: {subnet}" in out
    child = load_child(str(subnet))
    top1 = child.meta["top1"]
    assert top1 > 0.6  # 10 classes: chance is 0.1
    # The convergence guarantee: the search ended (every layer frozen) by its deadline, so the
    # child's weights are its own, rewound there and trained alone for the rest of the run.
    assert child.meta["search_end_step"] is not None
    assert "[raydsnas] search ended at step" in out
    assert "its weights rewound to their initialisation, a new warm-up and cosine" in out
    assert (tmp_path / "runs" / "dsnas-digits" / "events").is_dir()

    # The README's next steps on this run: verify and run the artifact from the command line,
    # and TensorBoard reads the events (what `tensorboard --logdir` shows).
    cli = subprocess.run([sys.executable, "-m", "raydsnas.export", "runs/dsnas-digits/subnet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["arch"] == list(child.arch)
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    events = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs"))
    events.Reload()
    tags = {tag for run in events.Runs().values() for tag in run.get("scalars", [])}
    assert {"entropy", "frozen", "train_loss", "val_top1"} <= tags, tags
    assert any(tag.startswith("credit/layer_") for tag in tags), tags
    images = {tag for run in events.Runs().values() for tag in run.get("images", [])}
    assert images, "the alpha heatmap"
