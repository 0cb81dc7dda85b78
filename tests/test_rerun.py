"""Rerunning a run name: the rerun is compared with the run's recorded configuration
(`<storage>/<name>/job.json`) before Ray starts. Identical resumes (a finished run does
nothing), a change to what the run trains is refused with exit 2 and nothing written, and
`--resume-with-changes` extends a run and records the change in the child's metadata."""

import json
from pathlib import Path

import pytest

from raydsnas import load_child
from raydsnas.config import load_config, parse_config
from raydsnas.train.launcher import run_uri
from raydsnas.train.provenance import RUN_FILE, RunConflictError, differences, reconcile
from tests.test_search_job import run_cli, synthetic_sets

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def job_of(tmp_path: Path, **extra):
    return load_config(None, synthetic_sets(tmp_path, "run", **extra))


JOBS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if "sweep" not in p.name)  # not sweeps


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_resolved_config_is_a_valid_config_with_the_same_settings(path):
    job = load_config(path)
    resolved = job.resolved()
    assert parse_config(resolved).resolved() == resolved
    assert resolved["search"]["epochs"] == job.search.epochs
    assert resolved["space"]["bn_eps"] == job.space.build(10).bn_eps


def test_new_run_records_its_configuration_only_once_committed(tmp_path):
    job = job_of(tmp_path)
    state = reconcile(job, run_uri(job), 0)
    assert state.new and not state.finished and not (tmp_path / "run").exists()
    state.commit()
    recorded = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert recorded == {"config": job.resolved(), "changes": []}


def test_rerun_with_the_same_or_operational_settings_resumes(tmp_path):
    first = job_of(tmp_path)
    reconcile(first, run_uri(first), 0).commit()
    before = snapshot(tmp_path)
    for extra in ({}, {"scaling.num_workers": 2, "search.log_every": 1,
                       "scaling.max_failures": 5}):
        job = job_of(tmp_path, **extra)
        state = reconcile(job, run_uri(job), 1)
        assert not state.new and not state.finished and state.changes == []
        state.commit()
    assert snapshot(tmp_path) == before


def test_rerun_that_changes_training_is_refused_naming_the_keys(tmp_path):
    first = job_of(tmp_path)
    reconcile(first, run_uri(first), 0).commit()
    before = snapshot(tmp_path)
    job = job_of(tmp_path, **{"search.h": 0.29, "search.epochs": 3})
    for flag in (False, True):  # --resume-with-changes does not make h safe
        with pytest.raises(RunConflictError) as err:
            reconcile(job, run_uri(job), 2, resume_with_changes=flag)
        message = str(err.value)
        assert "search.h 0.15 -> 0.29" in message and "search.epochs 2 -> 3" in message
        assert "trained to epoch 2" in message and "--set name=run-2" in message
    assert snapshot(tmp_path) == before


def test_extending_epochs_needs_the_flag_and_is_recorded(tmp_path):
    first = job_of(tmp_path)
    reconcile(first, run_uri(first), 0).commit()
    longer = job_of(tmp_path, **{"search.epochs": 5})
    with pytest.raises(RunConflictError, match="search.epochs can be applied to the existing "
                       "run from epoch 2 with --resume-with-changes"):
        reconcile(longer, run_uri(longer), 2)
    shorter = job_of(tmp_path, **{"search.epochs": 1})
    with pytest.raises(RunConflictError, match="it has already trained 2 epochs"):
        reconcile(shorter, run_uri(shorter), 2, resume_with_changes=True)
    state = reconcile(longer, run_uri(longer), 2, resume_with_changes=True)
    state.commit()
    recorded = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert recorded["config"] == longer.resolved()
    assert recorded["changes"] == state.changes == [
        {"key": "search.epochs", "old": 2, "new": 5, "from_epoch": 2}]
    # The extended run, rerun as extended, resumes without the flag.
    assert reconcile(longer, run_uri(longer), 3).changes == state.changes


def test_differences_are_dotted_keys():
    a = {"search": {"h": 0.1, "arch": [0, 1]}, "storage": {"options": {"region": "x"}}}
    b = {"search": {"h": 0.1, "arch": [0, 2]}, "storage": {"options": {}}}
    assert [(c.key, c.kind) for c in differences(a, b)] == [
        ("search.arch", "training"), ("storage.options", "operational")]


@pytest.mark.slow
def test_rerun_of_a_finished_run_through_the_command_line(tmp_path):
    """The user's view: a finished run rerun as is does nothing (exit 0, its child untouched);
    with a changed h, exit 2, one line naming the key, storage unchanged; with more epochs and
    --resume-with-changes it trains on and its child records the change."""
    env = {"RAYDSNAS_CACHE": str(tmp_path / "cache")}
    sets = synthetic_sets(tmp_path / "runs", "run", **{"search.epochs": 1})
    first = run_cli(sets, tmp_path, env)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    run = tmp_path / "runs" / "run"
    before = snapshot(run)

    again = run_cli(sets, tmp_path, env)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "had already finished with these settings" in out and "[raydsnas] epoch" not in out
    assert snapshot(run) == before

    changed = run_cli(sets + ["search.h=0.29"], tmp_path, env)
    out, _ = changed.communicate(timeout=300)
    assert changed.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("raydsnas:")]
    assert len(errors) == 1 and "search.h 0.15 -> 0.29" in errors[0], out[-3000:]
    assert "Traceback" not in out and snapshot(run) == before

    longer = run_cli(sets + ["search.epochs=2"], tmp_path, env)
    out, _ = longer.communicate(timeout=300)
    assert longer.returncode == 2 and "--resume-with-changes" in out, out[-3000:]
    longer = run_cli([*sets, "search.epochs=2"], tmp_path, env, extra_args=[
        "--resume-with-changes"])
    out, _ = longer.communicate(timeout=600)
    assert longer.returncode == 0, out[-3000:]
    assert "resumed from epoch 1" in out and "epoch 2/2 done" in out
    child = load_child(str(run / "subnet"))
    assert child.meta["config"]["search"]["epochs"] == 2 and child.meta["epochs"] == 2
    assert child.meta["config_changes"] == [
        {"key": "search.epochs", "old": 1, "new": 2, "from_epoch": 1}]


def test_unregistered_checkpoint_folders_are_removed_on_rerun(tmp_path):
    """A folder written but never named in Ray Train's snapshot (the run was interrupted in
    between) is neither resumed from nor rotated by Ray Train: the rerun deletes it, and
    keeps the registered ones and everything else."""
    from raydsnas.train.checkpoint import SNAPSHOT_FILE
    from raydsnas.train.launcher import remove_unregistered_checkpoints

    job = job_of(tmp_path)
    run = tmp_path / "run"
    names = ["epoch_000001-0000000a", "epoch_000002-0000000a", "epoch_000003-0000000b"]
    for name in names:
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x")
    (run / "events").mkdir()
    registered = [{"checkpoint_dir_name": n, "metrics": {}} for n in names[:2]]
    (run / SNAPSHOT_FILE).write_text(json.dumps({
        "checkpoint_results": registered, "latest_checkpoint_result": registered[-1],
        "pending_training_results": []}))
    assert remove_unregistered_checkpoints(job) == [names[2]]
    assert sorted(p.name for p in run.iterdir()) == sorted([*names[:2], "events", SNAPSHOT_FILE])
    assert remove_unregistered_checkpoints(job) == []
    (run / SNAPSHOT_FILE).unlink()  # no snapshot: Ray Train starts afresh, nothing is touched
    (run / names[2]).mkdir()
    assert remove_unregistered_checkpoints(job) == []
