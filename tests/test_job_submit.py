"""`ray job submit --working-dir . -- python -m raydsnas.search --config jobs/local.yaml` against a
real head started with `ray start --head --block` (its own process group, so stopping it stops
exactly this cluster): the job SUCCEEDS, the child network lands in the head's home directory
(the job's working directory is Ray's temporary copy), and it loads and runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from raydsnas import load_child

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the dashboard at {url} did not come up in {timeout} s")


@contextmanager
def ray_head(env: dict, cwd) -> Iterator[str]:
    """`ray start --head --block` on free ports; yields its dashboard URL once it answers and
    stops the head (its whole process group) afterwards."""
    dashboard = f"http://127.0.0.1:{free_port()}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", "--disable-usage-stats",
         # Not the default 52365: another Ray on the machine may hold it (then the head has no
         # job agent, and every submit answers "No available agent").
         f"--dashboard-agent-listen-port={free_port()}"],
        env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_dashboard(dashboard, head)
        yield dashboard
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def submit_job(dashboard: str, submission: str, runtime_env: dict, env: dict,
               entrypoint: list[str], wait: bool = True) -> subprocess.CompletedProcess:
    """The README's `ray job submit --address ... --working-dir . -- <entrypoint>` from the
    repository root, with a submission id and a runtime environment (`wait=False`: returns
    once the job is submitted, `--no-wait`)."""
    for _ in range(6):
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", ".",
             "--submission-id", submission, "--runtime-env-json", json.dumps(runtime_env),
             *([] if wait else ["--no-wait"]), "--", *entrypoint],
            cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)
        # The dashboard answers before the head's job agent has registered (seen on a loaded
        # machine): Ray says so and asks to try again later.
        if "No available agent to submit job" not in submit.stderr:
            break
        time.sleep(10)
    return submit


@pytest.mark.slow
def test_ray_job_submit_runs_the_local_job_on_a_real_head(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               GLOO_SOCKET_IFNAME="lo")
    env.pop("RAYDSNAS_CACHE", None)
    cache = tmp_path / "cache"  # reaches the job through its runtime environment only
    with ray_head(env, tmp_path) as dashboard:
        submission = f"raydsnas-test-{uuid.uuid4().hex[:8]}"
        # The README's command, plus a submission id, a runtime environment and a shorter run.
        runtime_env = {"env_vars": {"RAYDSNAS_CACHE": str(cache)}}
        submit = submit_job(dashboard, submission, runtime_env, env, [
            "python", "-m", "raydsnas.search", "--config", "jobs/local.yaml",
            "--set", "search.epochs=1", "--set", "search.max_steps_per_epoch=6",
            "--set", "search.bn_recalibration_batches=2"])
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        with urllib.request.urlopen(f"{dashboard}/api/jobs/{submission}", timeout=10) as r:
            assert json.loads(r.read())["status"] == "SUCCEEDED"
        logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", dashboard,
                               submission], env=env, check=False, capture_output=True,
                              text=True, timeout=60)
        subnet = home / "runs" / "dsnas-digits" / "subnet"
        assert f"child network: {subnet}" in logs.stdout, logs.stdout[-3000:]

    assert (cache / "builtin").is_dir()  # the job saw the runtime environment's variable
    record = json.loads((subnet / "arch.json").read_text())
    assert record["meta"]["steps"] == 6 and 0 <= record["meta"]["top1"] <= 1
    model = load_child(str(subnet))
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
