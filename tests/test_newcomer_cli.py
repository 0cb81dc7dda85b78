"""What a newcomer sees running `python -m raydsnas.search` in a terminal: progress and the
summary without Ray's noise, and Ctrl-C that says where a rerun resumes, stops the local Ray
it started and exits 130. Each run in its own process with its own Ray, as users run it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydsnas.config import load_config
from raydsnas.train.launcher import latest_checkpoint_epoch
from tests.test_search_job import checkpoints, final_state, synthetic_sets

# One each: Ray's token-auth notice, Ray Train's preemption watcher's error line, Ray Train's
# per-report dump, runpy's warning about a module imported twice.
NOISE = ("Token authentication is", "PreemptionWatcher", "TrainingReport(", "RuntimeWarning")


def start_search(sets: list[str], home: Path, log: str) -> tuple[subprocess.Popen, Path, Path]:
    """`python -m raydsnas.search --set ...` from `home` (also its HOME), stdout and stderr to
    files; its own process group, as a terminal's foreground job is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAYDSNAS_CACHE=str(home / "cache"))
    out, err = home / f"{log}.out", home / f"{log}.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raydsnas.search", *[a for s in sets for a in ("--set", s)]],
            cwd=home, env=env, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    return proc, out, err


def ray_processes(pid: int) -> list:
    """The raylet and GCS server among `pid`'s descendants (psutil.Process objects)."""
    import psutil  # Ray's bundled copy: on sys.path once ray is imported (the launcher does)

    return [p for p in psutil.Process(pid).children(recursive=True)
            if p.name() in ("raylet", "gcs_server")]


def alive(processes: list) -> list[str]:
    import psutil

    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.name()} ({p.pid})")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.slow
def test_a_run_shows_progress_and_summary_and_none_of_rays_noise(tmp_path):
    proc, out, err = start_search(synthetic_sets(tmp_path, "run"), tmp_path, "run")
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    text = out.read_text() + err.read_text()
    assert "[raydsnas] epoch 1/2 done:" in text and "[raydsnas] epoch 2/2 done:" in text
    assert "raydsnas: search 'run' finished in" in text
    assert f"  child network: {tmp_path / 'run' / 'subnet'}" in text
    assert [n for n in NOISE if n in text] == [], text[-4000:]

    # The README's next step on the result.
    export = subprocess.run([sys.executable, "-m", "raydsnas.export", "run/subnet"],
                            cwd=tmp_path, check=False, capture_output=True, text=True,
                            timeout=120)
    assert export.returncode == 0, export.stderr
    assert [n for n in NOISE if n in export.stdout + export.stderr] == [], export.stderr


@pytest.mark.slow
def test_ctrl_c_says_where_to_resume_stops_the_local_ray_and_the_rerun_resumes(tmp_path):
    sets = synthetic_sets(tmp_path, "run", **{"search.epochs": 6})
    job = load_config(None, sets)
    proc, out, err = start_search(sets, tmp_path, "first")
    try:
        deadline = time.time() + 600
        # A registered checkpoint (Ray Train resumes from nothing else), the next one written.
        while not (latest_checkpoint_epoch(job) >= 1 and any(
                c.name.startswith("epoch_000002") for c in checkpoints(tmp_path / "run"))):
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in 600 s"
            time.sleep(0.2)
        ray_procs = ray_processes(proc.pid)
        assert {p.name() for p in ray_procs} == {"raylet", "gcs_server"}
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=120) == 130, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    epoch = latest_checkpoint_epoch(job)
    assert 1 <= epoch < 6
    ours = [line for line in err.read_text().splitlines() if line.startswith("raydsnas:")]
    assert ours == [f"raydsnas: interrupted: rerun the same command to resume from epoch {epoch}"]
    assert "Traceback" not in err.read_text()
    deadline = time.time() + 10
    while alive(ray_procs) and time.time() < deadline:
        time.sleep(0.5)
    assert alive(ray_procs) == []

    proc, out, err = start_search(sets, tmp_path, "rerun")
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
    text = out.read_text() + err.read_text()
    assert f"[raydsnas] resumed from epoch {epoch} (step {4 * epoch})" in text
    assert "[raydsnas] epoch 6/6 done:" in text and "raydsnas: search 'run' finished in" in text
    assert final_state(tmp_path / "run")["strategy"]["step"] == 6 * 4
    assert (tmp_path / "run" / "subnet" / "arch.json").exists()
