"""Ray's own autoscaler (v2, as `ray up` runs it) on its fake multi-node provider: the README's
one-machine cluster (`bash clusters/local-autoscaling.sh`, clusters/local-autoscaling.yaml)
launches the nodes a submitted search asks for from zero, the elastic run grows from 1 to 2
workers as they come, a node that gets a preemption notice and is then killed is replaced, and
the job still SUCCEEDS, resumed from its checkpoint, with a child network that loads. Nodes are
removed when idle; a request the cluster can never hold is reported by the job itself.

Each test stops exactly what it started: the head's process group (the fake nodes' Ray
processes are in it too), never `ray stop`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from raydsnas import load_child
from tests.test_job_submit import BIN, ROOT, free_port, submit_job, wait_for_dashboard

SCRIPT = ROOT / "clusters" / "local-autoscaling.sh"
HEAD_ID = "f" * 51 + "00000"  # the fake provider's head; its nodes count up from ...00001


@dataclass
class Cluster:
    dashboard: str
    gcs: str
    head: subprocess.Popen
    env: dict
    log: Path
    t0: float = field(default_factory=time.time)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.dashboard}{path}", timeout=20) as response:
            return json.loads(response.read())

    def worker_nodes(self) -> list[str]:
        """Ids of the alive Ray nodes other than the head."""
        nodes = self.get("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]
        return sorted(n["node_id"] for n in nodes
                      if n["state"] == "ALIVE" and n["node_id"] != HEAD_ID)

    def job_logs(self, submission: str) -> str:
        return self.get(f"/api/jobs/{submission}/logs")["logs"]

    def job_status(self, submission: str) -> str:
        return self.get(f"/api/jobs/{submission}")["status"]

    def kill_node(self, node_id: str) -> int:
        """SIGKILL every process of one fake node (its raylet and the workers it started all
        carry the node's id in their environment), as a reclaimed machine vanishes."""
        killed = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if os.getpgid(int(proc.name)) != self.head.pid:
                    continue
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ProcessLookupError):
                continue
            if f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in environ:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        return killed


def clean_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a driver that joins at 127.0.0.1:PORT stays on
    # loopback (else Ray swaps in the host's address, where this cluster is not).
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAYDSNAS_CACHE", None)
    return env


@contextmanager
def autoscaling_cluster(tmp_path: Path, config: Path | None = None,
                        head_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """The README's `bash clusters/local-autoscaling.sh` on free ports (and optionally another
    cluster file of the same form, and more `ray start` arguments), in its own process group;
    stopped (the group) afterwards."""
    env = clean_env(tmp_path)
    gcs, dashboard = free_port(), free_port()
    head_env = {**env, "RAY_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dashboard)}
    if config is not None:
        head_env["RAYDSNAS_AUTOSCALING_CONFIG"] = str(config)
    log = tmp_path / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            ["bash", str(SCRIPT), f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats", *head_args],
            cwd=env["HOME"], env=head_env, start_new_session=True, stdout=out,
            stderr=subprocess.STDOUT)
    cluster = Cluster(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", head, env, log)
    try:
        wait_for_dashboard(cluster.dashboard, head)
        yield cluster
    finally:
        stop_group(head)


def stop_group(head: subprocess.Popen) -> None:
    """SIGTERM to the head's group (`--block` then stops its Ray, for up to ~30 s), then SIGKILL
    whatever of the group is left (fake nodes' processes outlive the head)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 45
    while time.time() < deadline:
        head.poll()
        try:
            os.killpg(head.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


def wait_until(condition, timeout: float, what: str, cluster: Cluster, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert cluster.head.poll() is None, f"the head exited: {cluster.log.read_text()[-3000:]}"
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


def epochs_done(logs: str) -> list[tuple[int, int, int]]:
    """(epoch, step, world size) of each `epoch E/N done` line (once, though every fake node's
    log repeats it: they share one log folder)."""
    seen = re.findall(r"epoch (\d+)/\d+ done: epoch \d+ step (\d+) world_size (\d+)", logs)
    return sorted({(int(e), int(s), int(w)) for e, s, w in seen})


def live_config(cluster: Cluster) -> Path:
    """The cluster file the head's autoscaler re-reads on every update (the script's copy)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == cluster.head.pid:
                args = (proc / "cmdline").read_bytes().split(b"\0")
                for arg in args:
                    if arg.startswith(b"--autoscaling-config="):
                        return Path(arg.split(b"=", 1)[1].decode())
        except (OSError, ProcessLookupError):
            continue
    raise AssertionError("no --autoscaling-config in the head's process group")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_autoscaler_launches_grows_replaces_a_preempted_node_and_the_job_succeeds(tmp_path):
    """The head holds one worker's resources and the worker type may not launch at first, so
    the run starts on 1 worker whatever the timing; then the cluster file allows one node (the
    autoscaler re-reads it), the autoscaler launches it, and the run grows to 2."""
    config = yaml.safe_load((ROOT / "clusters" / "local-autoscaling.yaml").read_text())
    config["available_node_types"]["ray.head.default"]["resources"] = {"CPU": 3, "fakegpu": 1}
    config["available_node_types"]["worker"]["max_workers"] = 0
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(config))
    head = ("--num-cpus=3", '--resources={"fakegpu": 1}')  # the head's resources, as above
    with autoscaling_cluster(tmp_path, path, head) as cluster:
        env = cluster.env
        assert cluster.worker_nodes() == []  # nothing but the head
        submission = f"raydsnas-test-{uuid.uuid4().hex[:8]}"
        t0 = time.time()
        submit = submit_job(cluster.dashboard, submission, {"env_vars": {
            "RAYDSNAS_CACHE": str(tmp_path / "cache")}}, env, [
            "python", "-m", "raydsnas.search", "--config", "jobs/local-autoscaling.yaml",
            "--set", "search.epochs=8"], wait=False)  # 8 of its 12 epochs: time enough
        assert submit.returncode == 0, submit.stderr[-3000:]
        timings = {}
        wait_until(lambda: any(w == 1 for _, _, w in epochs_done(
            cluster.job_logs(submission))), 240, "an epoch on 1 worker", cluster)
        timings["submit -> first epoch on 1 worker (the head's)"] = time.time() - t0
        assert cluster.worker_nodes() == []

        live = live_config(cluster)  # the port filled in: change only the one value
        allowed = yaml.safe_load(live.read_text())
        allowed["available_node_types"]["worker"]["max_workers"] = 1
        (tmp_path / "allowed.yaml").write_text(yaml.safe_dump(allowed))
        os.replace(tmp_path / "allowed.yaml", live)
        t1 = time.time()
        wait_until(cluster.worker_nodes, 120, "a node for the run", cluster)
        timings["node allowed -> node up"] = time.time() - t1

        def at_two():
            done = epochs_done(cluster.job_logs(submission))
            return done if any(w == 2 for _, _, w in done) else None

        wait_until(at_two, 240, "an epoch on 2 workers", cluster)
        timings["node allowed -> first epoch on 2 workers"] = time.time() - t1
        assert cluster.job_status(submission) == "RUNNING"

        # A preemption notice for the run's node (as a cloud's spot reclaim sends), then the
        # node vanishes.
        logs = cluster.job_logs(submission)
        before = epochs_done(logs)
        (victim,) = cluster.worker_nodes()
        drain = subprocess.run(
            [str(BIN / "ray"), "drain-node", "--address", cluster.gcs, "--node-id", victim,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
             "--deadline-remaining-seconds", "5"],
            env=env, check=False, capture_output=True, text=True, timeout=60)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        notice = time.time()
        time.sleep(5)
        assert cluster.kill_node(victim) > 0

        def resumed():
            found = re.findall(r"resumed from epoch (\d+) \(step (\d+)\), world size (\d+)",
                               cluster.job_logs(submission))
            after = [tuple(map(int, f)) for f in found if int(f[0]) >= before[-1][0]]
            return after[-1] if after else None

        epoch, step, world = wait_until(resumed, 240, "the run resumed", cluster)
        timings["preemption notice -> run resumed"] = time.time() - notice
        # From the last checkpoint it had before the notice (every epoch checkpoints).
        assert (epoch, step) >= before[-1][:2], (epoch, step, before)

        wait_until(lambda: cluster.job_status(submission) in ("SUCCEEDED", "FAILED", "STOPPED"),
                   480, "the job's end", cluster, every=3)
        logs = cluster.job_logs(submission)
        assert cluster.job_status(submission) == "SUCCEEDED", logs[-5000:]
        timings["submit -> job succeeded"] = time.time() - t0
        replacement = [n for n in cluster.worker_nodes() if n > victim]
        runs = cluster.get("/api/train/v2/runs/v1")["train_runs"]

    (run,) = [r for r in runs if r["name"] == "dsnas-digits-autoscaling"]
    sizes = [len(a["workers"]) for a in run["attempts"]]
    print(json.dumps({"timings_s": {k: round(v, 1) for k, v in timings.items()},
                      "attempt_sizes": sizes, "resumed_at": [epoch, step, world],
                      "last_epoch_before_notice": before[-1],
                      "replacement_nodes": replacement}, indent=1))
    assert run["status"] == "FINISHED", run["status"]
    # Ray Train's own record: started on 1 worker, grew to 2, went on after the node was lost.
    assert sizes[0] == 1 and sizes[1] == 2 and len(sizes) >= 3, sizes
    assert replacement, "the autoscaler launched no node in place of the reclaimed one"

    subnet = Path(env["HOME"]) / "runs" / "dsnas-digits-autoscaling" / "subnet"
    assert f"child network: {subnet}" in logs
    record = json.loads((subnet / "arch.json").read_text())
    assert record["meta"]["steps"] == 8 * 23
    model = load_child(str(subnet))
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_come_from_zero_go_when_idle_and_an_impossible_request_is_reported(tmp_path):
    """A task that needs a node type's resource gets a node from zero, which goes again after
    `idle_timeout_minutes`; a run asking for more workers than the cluster can ever hold gets
    no node, and its job log says why and what to change (not only Ray's own repeated line)."""
    config = yaml.safe_load((ROOT / "clusters" / "local-autoscaling.yaml").read_text())
    config["idle_timeout_minutes"] = 0.1
    path = tmp_path / "fast-idle.yaml"
    path.write_text(yaml.safe_dump(config))
    with autoscaling_cluster(tmp_path, path) as cluster:
        env = cluster.env
        assert cluster.worker_nodes() == []
        task = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "f = ray.remote(num_cpus=1, resources={'fakegpu': 1})(lambda: 42); "
                "print(ray.get(f.remote()))")
        t0 = time.time()
        ran = subprocess.run([sys.executable, "-c", task, cluster.gcs], env=env, check=False,
                             capture_output=True, text=True, timeout=180)
        assert ran.returncode == 0 and ran.stdout.split()[-1] == "42", ran.stderr[-3000:]
        launched = time.time() - t0
        assert len(cluster.worker_nodes()) == 1
        wait_until(lambda: cluster.worker_nodes() == [], 120, "the idle node's removal",
                   cluster, every=2)
        print(json.dumps({"task on a node from zero (s)": round(launched, 1),
                          "idle node removed after (s)": round(time.time() - t0, 1)}))

        submission = f"raydsnas-test-{uuid.uuid4().hex[:8]}"
        submit = submit_job(cluster.dashboard, submission, {"env_vars": {
            "RAYDSNAS_CACHE": str(tmp_path / "cache")}}, env, [
            "python", "-m", "raydsnas.search", "--config", "jobs/local-autoscaling.yaml",
            "--set", "scaling.num_workers=[1,4]"], wait=False)
        assert submit.returncode == 0, submit.stderr[-3000:]
        said = "raydsnas: Ray's autoscaler reports it can never fulfil this run's request for 4"
        wait_until(lambda: said in cluster.job_logs(submission), 120, "the job's report",
                   cluster, every=2)
        logs = cluster.job_logs(submission)
        assert "from scaling.num_workers' max" in logs and "Lower scaling.num_workers" in logs
        assert logs.count(said) == 1  # said once, not every poll
        assert cluster.worker_nodes() == []  # autoscaler v2 launched nothing for it
        stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster.dashboard,
                               submission], env=env, check=False, capture_output=True,
                              text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr[-2000:]
