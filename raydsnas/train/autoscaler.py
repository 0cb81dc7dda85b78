"""What Ray's autoscaler says about a run's workers, told to the user in the run's own terms.

Ray Train 2.60 asks the autoscaler for all `max` workers of an elastic run at once (a cluster
resource constraint), and a fixed-size run for one placement group of all its workers. Ray's
autoscaler v2 (what `ray up` and KubeRay's `version: v2` run) treats either request as one
whole: when no set of the cluster's node types can ever hold it, it launches **no node at all**
for it, and a run on a cluster that starts with no worker nodes waits at 0 workers forever. Ray
only logs `No available node types can fulfill cluster constraint: {...}*N` every few seconds.

`AutoscalerWatch` reads the autoscaler's own report (the `infeasible_*` lists of its state in the
GCS) while the run trains and says once what it means for this run and what to change. The dry
run (`--dry-run --cluster FILE`) refuses such a configuration before anything starts; this is for
clusters whose file the job does not see.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping


def infeasible_request(gcs_address: str, per_worker: Mapping[str, float],
                       timeout_s: int = 10) -> tuple[str, int] | None:
    """The autoscaler's report that it can never fulfil a request made of `per_worker` bundles:
    (what kind of request, how many bundles), or None. Only autoscaler v2 reports this (v1
    launches what it can and reports nothing here)."""
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(address=gcs_address).get_cluster_status(timeout_s=timeout_s))
    state = reply.autoscaling_state

    def ours(request) -> bool:
        bundle = dict(request.resources_bundle)
        return set(bundle) == set(per_worker) and all(
            abs(bundle[k] - float(v)) < 1e-9 for k, v in per_worker.items())

    for constraint in state.infeasible_cluster_resource_constraints:
        count = sum(r.count for r in constraint.resource_requests if ours(r.request))
        if count:
            return "elastic", count
    for gang in state.infeasible_gang_resource_requests:
        count = sum(1 for r in gang.requests if ours(r))
        if count:
            return "placement group", count
    if any(ours(r.request) for r in state.infeasible_resource_requests):
        return "worker", 1
    return None


def explain(kind: str, count: int, per_worker: Mapping[str, float]) -> str:
    shape = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    if kind == "worker":
        return (f"raydsnas: Ray's autoscaler reports that no node type of this cluster can hold "
                f"one worker ({shape}): no worker will start. Lower scaling.cpus_per_worker / "
                "scaling.resources, or add a node type that holds them.")
    ask = ("scaling.num_workers' max" if kind == "elastic"
           else "scaling.num_workers (one placement group)")
    return (f"raydsnas: Ray's autoscaler reports it can never fulfil this run's request for "
            f"{count} workers ({shape} each, from {ask}) at once: no set of the cluster's node "
            "types holds them all, and autoscaler v2 then launches no node for it. The run goes "
            "on with the workers the cluster has now and never grows past them; on a cluster "
            "that starts without worker nodes it waits at 0 workers. Lower scaling.num_workers "
            "to what the cluster holds (`python -m raydsnas.search --config ... --dry-run "
            "--cluster FILE` says how many), or raise the node types' max_workers.")


class AutoscalerWatch:
    """Polls `infeasible_request` every `interval_s` while a run trains (a daemon thread) and
    prints each distinct finding once to stderr (a submitted job's log)."""

    def __init__(self, gcs_address: str, per_worker: Mapping[str, float],
                 interval_s: float = 10.0):
        self.gcs_address, self.per_worker, self.interval_s = gcs_address, dict(per_worker), \
            interval_s
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydsnas-autoscaler-watch",
                                        daemon=True)

    def __enter__(self) -> AutoscalerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 15)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                found = infeasible_request(self.gcs_address, self.per_worker)
            except Exception:  # noqa: BLE001 (a GCS hiccup or an older Ray: say nothing)
                continue
            if found is None:
                continue
            message = explain(*found, self.per_worker)
            if message not in self.messages:
                self.messages.append(message)
                print(message, file=sys.stderr, flush=True)
