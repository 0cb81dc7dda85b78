"""Preflight of a search job (`python -m raydsnas.search --dry-run`): what the job will ask for,
and whether it can fit, before a cluster spends anything on it.

It reads the data set's manifest (size, classes), builds the supernet on the CPU (parameter
count, FLOPs range of the space), measures the activation memory of the space's most expensive
path at the per-worker batch size, and checks the request against a capacity: a cluster file
(`--cluster clusters/aws.yaml`, a KubeRay manifest) read with Ray's own autoscaler code, a running
cluster (`RAY_ADDRESS`), or this machine. Problems (the job cannot run as configured) make the
dry run fail; warnings (it runs, but not as well as it could) are printed.

The memory estimate per worker is: fp32 supernet weights + SGD momentum (every candidate's, once
it has been trained) + gradients and the all-reduce buffer of one path + the tensors autograd
saves for the backward pass of the most expensive path at the per-worker batch (measured on the CPU in
fp32, halved for a GPU job with bf16 autocast, whose saved activations are bf16) + the input
batch. Checked on an H200 (benchmarks/gpu_step.py, ImageNet space, batch 256, bf16,
channels_last): measured DSNAS peak 6.61 GiB; the estimate is 7.3 GiB (fp32 alone: 14.5). CUDA context, cuDNN workspaces and
allocator fragmentation come on top: the fit check keeps `HEADROOM` of the device free for them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from raydsnas.space import SearchSpace

if TYPE_CHECKING:  # the config (and Ray Data) are not needed to estimate memory on a GPU box
    from raydsnas.config import JobConfig

GiB = 2**30
HEADROOM = 0.8  # the estimate must fit in this fraction of a device's memory
# GPU memory (GiB) of common cluster node types, and whether the GPU trains in bf16 (Ampere or
# newer; older ones run the search in fp32). Other types need --gpu-memory-gib.
GPU_MEMORY_GIB = {
    "p3.": 16, "p3dn.": 32, "g4dn.": 16, "g5.": 24, "g6.": 24, "g6e.": 48, "p4d.": 40,
    "p4de.": 80, "p5.": 80, "p5e.": 141, "p5en.": 141,
    "a2-highgpu-": 40, "a2-megagpu-": 40, "a2-ultragpu-": 80, "a3-": 80, "g2-": 24,
}
NO_BF16 = ("p3.", "p3dn.", "g4dn.")


@dataclass
class NodeType:
    """A node type a cluster may start: its Ray resources, how many at most, its GPU memory."""

    name: str
    resources: dict[str, float]
    max_nodes: int
    gpu_memory_gib: float | None = None
    bf16: bool | None = None  # None: unknown


@dataclass
class Capacity:
    """What the job may run on: `source` says where this was read from."""

    source: str
    node_types: list[NodeType]
    max_worker_nodes: int | None = None  # the cluster's global max_workers (None: no limit)
    autoscaling: bool = True
    # False for a running cluster seen from outside: nodes may still join, so a request that
    # does not fit what is there now is a warning, not a problem.
    complete: bool = True
    # The autoscaler the cluster runs: "v2" launches nothing for a request the cluster can
    # never hold whole (Ray Train asks for all `max` workers at once); None: none, or unknown.
    autoscaler: str | None = None

    def workers_fit(self, per_worker: dict[str, float]) -> tuple[int, list[str]]:
        """How many workers of `per_worker` resources the cluster can hold at its largest,
        and the node types that can hold at least one."""
        per_type = []
        for node in self.node_types:
            fit = min((math.floor(node.resources.get(k, 0) / v + 1e-9)
                       for k, v in per_worker.items() if v > 0), default=0)
            if fit > 0 and node.max_nodes > 0:
                per_type.append((fit, node))
        # The global node limit applies to worker nodes (not the head): fill the largest first.
        total, nodes_left = 0, self.max_worker_nodes
        for fit, node in sorted(per_type, key=lambda item: -item[0]):
            count = node.max_nodes if node.name != "head" else 1
            if nodes_left is not None and node.name != "head":
                count = min(count, nodes_left)
                nodes_left -= count
            total += fit * count
        return total, [node.name for _, node in per_type]


@dataclass
class MemoryEstimate:
    """Bytes per worker (see the module docstring)."""

    weights: int
    optimizer: int
    gradients: int
    activations: int
    inputs: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.inputs


@dataclass
class Preflight:
    job: JobConfig
    capacity: Capacity
    num_classes: int
    num_train: int
    num_val: int
    worker_counts: tuple[int, int]
    per_worker_resources: dict[str, float]
    steps_per_epoch: int
    supernet_params: int
    flops_range: tuple[int, int]
    params_range: tuple[int, int]
    memory: MemoryEstimate
    device_memory_gib: float | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data_error: str | None = None  # the data set could not be read (the rest is still checked)

    @property
    def ok(self) -> bool:
        return not self.problems


# The class count a dry run assumes for `num_classes: auto` when the data cannot be read.
DEFAULT_CLASSES = {"imagenet": 1000, "cifar": 10, "custom": 1000}


# -- capacities ----------------------------------------------------------------------------------
def load_cluster(path: str | Path) -> Capacity:
    """The capacity of a Ray cluster launcher YAML or a KubeRay RayCluster/RayJob manifest, read
    and validated with Ray's own autoscaler code (a file `ray up` would reject fails here)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    from raydsnas.config import ConfigError

    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except FileNotFoundError:
        raise ConfigError(f"--cluster {path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--cluster {path}: not valid YAML: {err}") from None
    ray_cr = next((d for d in docs if d.get("kind") in ("RayCluster", "RayJob")), None)
    try:
        if ray_cr is not None:
            from ray.autoscaler._private.kuberay.autoscaling_config import (
                _derive_autoscaling_config_from_ray_cr,
            )

            spec = ray_cr["spec"] if ray_cr["kind"] == "RayCluster" else \
                ray_cr["spec"]["rayClusterSpec"]
            config = _derive_autoscaling_config_from_ray_cr(
                {"metadata": {"namespace": "default", **ray_cr["metadata"]}, "spec": spec})
            autoscaling = bool(spec.get("enableInTreeAutoscaling"))
            # KubeRay runs autoscaler v1 unless told otherwise.
            version = (spec.get("autoscalerOptions") or {}).get("version", "v1")
            autoscaler = version if autoscaling else None
        else:
            logger = logging.getLogger("ray.autoscaler")
            level = logger.level
            # prepare_config logs each default it fills in, and for an external provider
            # (clusters/local-autoscaling.yaml) warns about legacy keys of its own defaults.
            logger.setLevel(logging.ERROR)
            try:
                config = prepare_config(docs[0])
            finally:
                logger.setLevel(level)
            validate_config(config)
            autoscaling = True
            # `ray up` starts autoscaler v2 since Ray 2.50 (RAY_UP_enable_autoscaler_v2=0: v1).
            autoscaler = "v1" if os.environ.get("RAY_UP_enable_autoscaler_v2") == "0" else "v2"
    except Exception as err:  # noqa: BLE001 (jsonschema's and Ray's messages name the key)
        raise ConfigError(f"--cluster {path}: Ray rejects this cluster config: "
                          f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    head = config.get("head_node_type")
    nodes = []
    for name, node in config["available_node_types"].items():
        node_config = node.get("node_config") or {}
        instance = str(node_config.get("InstanceType") or node_config.get("machineType") or "")
        nodes.append(NodeType(
            "head" if name == head else name,
            {k: float(v) for k, v in (node.get("resources") or {}).items()},
            1 if name == head else int(node.get("max_workers", 0)),
            next((gib for prefix, gib in GPU_MEMORY_GIB.items() if instance.startswith(prefix)),
                 None),
            (not instance.startswith(NO_BF16)) if instance else None))
    return Capacity(str(path), nodes, int(config.get("max_workers", 0)), autoscaling,
                    autoscaler=autoscaler)


def physical_memory_bytes() -> float:
    """This machine's RAM (what `psutil.virtual_memory().total` says). From `os.sysconf` where
    there is one: psutil comes only with Ray (its vendored copy is importable once Ray is), and
    the dry run does not import Ray."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        import ray  # noqa: F401, I001  (first: it puts its vendored psutil on sys.path)
        import psutil

        return float(psutil.virtual_memory().total)


def local_capacity() -> Capacity:
    """This machine, as a local `ray.init()` would see it."""
    resources = {"CPU": float(os.cpu_count() or 1), "memory": physical_memory_bytes()}
    gpu_gib, bf16 = None, None
    if torch.cuda.is_available():
        resources["GPU"] = float(torch.cuda.device_count())
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB
        bf16 = torch.cuda.is_bf16_supported()
    return Capacity("this machine (a local Ray)", [NodeType("head", resources, 1, gpu_gib, bf16)],
                    autoscaling=False)


def running_cluster_capacity(address: str) -> Capacity:
    """The nodes of the running cluster at `address` now. An autoscaler may add more, which
    this cannot see: requests that do not fit are warnings (pass --cluster FILE for a check
    against the cluster's limits)."""
    import ray

    from raydsnas.config import ConfigError

    source = f"the running cluster at {address} (its nodes now; it may autoscale)"
    if address.startswith(("http://", "https://")):
        # The dashboard's address (what `ray job` commands take): not a cluster to join.
        return Capacity(f"{source}: not inspected (RAY_ADDRESS is a dashboard URL)", [],
                        complete=False)
    try:
        ray.init(address=address, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"RAY_ADDRESS={address}: cannot reach the cluster ({err}); unset it "
                          "to check against this machine, or pass --cluster FILE") from None
    try:
        nodes = [NodeType(n["NodeManagerAddress"], {k: float(v) for k, v in n["Resources"].items()},
                          1) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    return Capacity(source, nodes, complete=False)


# -- measurements --------------------------------------------------------------------------------
def saved_activation_bytes(space: SearchSpace, arch: list[int], batch: int, *,
                           supernet: torch.nn.Module | None = None) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `arch` at `batch`
    (distinct storages, parameters excluded), measured on the CPU."""
    supernet = (supernet or space.supernet()).train()
    param_storages = {p.untyped_storage().data_ptr() for p in supernet.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    images = torch.randn(batch, space.in_channels, space.input_size, space.input_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = supernet(images, arch)
    del logits
    return sum(seen.values())


def estimate_memory(space: SearchSpace, batch: int, *, world: int, amp: bool = False,
                    paths: int | str = 1) -> MemoryEstimate:
    """Peak memory of one worker training `space` at per-worker `batch` (module docstring)."""
    arch = space.flops_table().largest()
    supernet = space.supernet()
    # Saved bytes are affine in the batch size: measure at 2 and 4 (BatchNorm needs > 1).
    two = saved_activation_bytes(space, arch, 2, supernet=supernet)
    four = saved_activation_bytes(space, arch, 4, supernet=supernet)
    per_sample = (four - two) / 2
    fixed = two - 2 * per_sample
    supernet_params = sum(p.numel() for p in supernet.parameters())
    path_params = space.params(arch)
    # `paths`: how many paths' activations and gradients a step holds ("all": every candidate,
    # SNAS's whole parent network).
    factor = space.num_choices if paths == "all" else int(paths)
    grads = supernet_params if paths == "all" else min(supernet_params, factor * path_params)
    return MemoryEstimate(
        weights=4 * supernet_params, optimizer=4 * supernet_params,
        gradients=4 * grads * (2 if world > 1 else 1),
        activations=max(0, round((fixed + per_sample * batch) * factor
                                 * (0.5 if amp else 1.0))),
        inputs=batch * space.in_channels * space.input_size ** 2 * (4 + 1))


# -- the preflight -------------------------------------------------------------------------------
def preflight(job: JobConfig, capacity: Capacity, *,
              gpu_memory_gib: float | None = None) -> Preflight:
    """Everything the dry run prints, with the problems that would stop the job. A data set
    that cannot be read (no bucket, no credentials, ...) is a problem, but every check that
    does not need it still runs (with the space's class count, or the preset's default)."""
    from raydsnas.data.errors import DataError
    from raydsnas.data.sources import describe_source
    from raydsnas.strategies import STRATEGIES

    data_error = None
    try:
        # Classes and split sizes: a shard set's from its manifest alone.
        facts = describe_source(job.data)
        num_classes, num_train, num_val = facts.num_classes, facts.num_train, facts.num_val
    except DataError as err:
        data_error = str(err)
        num_train = num_val = 0
        num_classes = job.space.num_classes if job.space.num_classes != "auto" else \
            DEFAULT_CLASSES[job.space.preset]
    space = job.space.build(num_classes)
    scaling, search = job.scaling, job.search
    counts = scaling.num_workers if isinstance(scaling.num_workers, tuple) else \
        (scaling.num_workers, scaling.num_workers)
    per_worker = scaling.resources_per_worker
    table = space.flops_table()
    flops = (space.flops(table.smallest()), space.flops(table.largest()))
    params_table = space.params_table()
    params = (space.params(params_table.smallest()), space.params(params_table.largest()))
    batch = search.global_batch_size // counts[0]  # the largest per-worker batch
    gpu_nodes = [n for n in capacity.node_types if n.resources.get("GPU", 0) > 0]
    # bf16 only where every GPU node type is known to train in it (else the fp32 estimate).
    amp = (scaling.use_gpu and search.config.amp and bool(gpu_nodes)
           and all(n.bf16 for n in gpu_nodes))
    memory = estimate_memory(space, batch, world=counts[0], amp=amp,
                             paths=STRATEGIES[search.strategy].paths_per_step)
    # SPOS/random hold ~selection_fraction of the training split out (the run counts the exact
    # number from the shards' keys; the dry run reads only the manifest).
    steps = (num_train - round(num_train * search.selection_fraction)) // search.global_batch_size
    if search.max_steps_per_epoch:
        steps = min(steps, search.max_steps_per_epoch)
    if gpu_memory_gib is None and scaling.use_gpu:
        known = {n.gpu_memory_gib for n in capacity.node_types
                 if n.gpu_memory_gib and n.resources.get("GPU", 0) > 0}
        gpu_memory_gib = min(known) if known else None
    result = Preflight(job, capacity, num_classes, num_train, num_val, counts, per_worker, steps,
                       memory.weights // 4, flops, params, memory, gpu_memory_gib,
                       data_error=data_error)
    _check_fit(result)
    if data_error:
        result.problems.insert(0, f"data.uri: {data_error}")
    return result


def _check_fit(pf: Preflight) -> None:
    from raydsnas.data.sources import source_kind

    job, (low, high) = pf.job, pf.worker_counts
    search, scaling = job.search, job.scaling
    problem, warn = pf.problems.append, pf.warnings.append
    classes = job.space.num_classes
    if classes != "auto" and classes < pf.num_classes:
        problem(f"space.num_classes = {classes} but {job.data.uri} has {pf.num_classes} classes")
    workers = f"scaling.num_workers = {list(scaling.num_workers) if low != high else low}"

    # The batch: every worker the same share, every world size the same global batch.
    for count in sorted({low, high}):
        if search.global_batch_size % count:
            problem(f"search.global_batch_size = {search.global_batch_size} does not divide over "
                    f"{count} workers ({workers}); use a multiple of {count}")
    odd = [w for w in range(low + 1, high) if search.global_batch_size % w]
    if odd:
        warn(f"at {odd} workers the global batch {search.global_batch_size} does not divide: "
             f"each worker takes {search.global_batch_size} // W samples and the learning rate "
             "is scaled to the smaller batch")
    if pf.data_error is None and pf.num_train < search.global_batch_size:
        problem(f"the training split has {pf.num_train} samples, fewer than one global batch "
                f"(search.global_batch_size = {search.global_batch_size})")

    # Resources: can the cluster hold the workers at all?
    fit, types = pf.capacity.workers_fit(pf.per_worker_resources)
    request = ", ".join(f"{v:g} {k}" for k, v in pf.per_worker_resources.items())
    if not pf.capacity.complete:
        problem = warn  # nodes may still join: say what does not fit now, but do not fail
    if not pf.capacity.node_types:
        warn(f"resources not checked against {pf.capacity.source}; pass --cluster FILE")
    elif not types:
        problem(f"no node of {pf.capacity.source} can hold one worker ({request}; "
                f"scaling.use_gpu = {scaling.use_gpu}, cpus_per_worker = "
                f"{scaling.cpus_per_worker:g}, gpus_per_worker = {scaling.gpus_per_worker:g})")
    elif fit < low:
        what = "GPUs" if scaling.use_gpu else "CPUs"
        need = low * pf.per_worker_resources["GPU" if scaling.use_gpu else "CPU"]
        problem(f"{workers} needs {low} workers ({need:g} {what}); {pf.capacity.source} holds "
                f"at most {fit} (its node types' max_workers and resources)")
    elif fit < high and pf.capacity.autoscaler == "v2":
        # Ray Train asks for all `high` workers at once; v2 launches nothing for a request the
        # cluster can never hold whole, so from zero worker nodes the run would never start.
        problem(f"{workers} asks Ray's autoscaler for {high} workers at once; "
                f"{pf.capacity.source} holds at most {fit} (its node types' max_workers and "
                "resources), and autoscaler v2 launches no node for a request the cluster can "
                "never hold: the job would wait at 0 workers. Set scaling.num_workers to "
                f"[{low}, {fit}], or raise max_workers in the cluster file (of node type(s) "
                f"{', '.join(t for t in types if t != 'head')}, and its own)")
    elif fit < high:
        warn(f"{pf.capacity.source} holds at most {fit} of the {high} workers: the elastic run "
             f"will stay at {fit}")
    reads_with_ray_data = source_kind(job.data.uri) != "synthetic"
    for node in pf.capacity.node_types:
        cpus = node.resources.get("CPU", 0)
        if node.name in types and cpus:
            per_node = min([high] + [math.floor(node.resources.get(k, 0) / v + 1e-9)
                                     for k, v in pf.per_worker_resources.items() if v > 0])
            if cpus - per_node * scaling.cpus_per_worker < 1 and reads_with_ray_data:
                warn(f"node type {node.name}: its {per_node} workers take all {cpus:g} CPUs; "
                     "Ray Data's read and decode tasks need free CPUs (lower "
                     "scaling.cpus_per_worker)")

    # Memory per worker.
    problem = pf.problems.append
    need = pf.memory.total
    if scaling.use_gpu:
        if pf.device_memory_gib is None:
            warn("GPU memory of the cluster's nodes is unknown; pass --gpu-memory-gib to check "
                 "the estimate against it")
        elif need > HEADROOM * pf.device_memory_gib * GiB:
            problem(f"estimated peak memory per worker {need / GiB:.1f} GiB exceeds "
                    f"{HEADROOM:.0%} of the GPU's {pf.device_memory_gib:g} GiB at a per-worker "
                    f"batch of {search.global_batch_size // low}; lower "
                    "search.global_batch_size or use more workers")
    else:
        for node in pf.capacity.node_types:
            mem = node.resources.get("memory")
            cpus = node.resources.get("CPU", 0)
            if mem and node.name in types:
                per_node = min(low, math.floor(cpus / scaling.cpus_per_worker + 1e-9))
                if need * per_node > HEADROOM * mem:
                    problem(f"estimated peak memory {need / GiB:.1f} GiB per worker x {per_node} "
                            f"workers exceeds {HEADROOM:.0%} of node {node.name}'s "
                            f"{mem / GiB:.1f} GiB")


def render(pf: Preflight) -> str:
    """The dry run's report (after the resolved config)."""
    job, (low, high) = pf.job, pf.worker_counts
    per_worker = ", ".join(f"{v:g} {k}" for k, v in pf.per_worker_resources.items())
    totals = ", ".join(f"{v * high:g} {k}" for k, v in pf.per_worker_resources.items())
    workers = f"{low}" if low == high else f"{low} to {high} (elastic)"
    batch = job.search.global_batch_size
    m = pf.memory
    device = (f"{pf.device_memory_gib:g} GiB GPU" if pf.device_memory_gib
              else "GPU memory unknown") if job.scaling.use_gpu else "CPU"
    if pf.data_error:
        data = (f"data set:          {job.data.uri}: cannot be read (below); the checks that "
                f"follow assume {pf.num_classes} classes")
    else:
        data = (f"data set:          {job.data.uri}: {pf.num_train} train / {pf.num_val} val "
                f"samples, {pf.num_classes} classes; {pf.steps_per_epoch} steps/epoch x "
                f"{job.search.epochs} epochs")
    lines = [
        data,
        f"workers:           {workers}, each {per_worker} (at most {totals} in all)",
        f"capacity:          {pf.capacity.source}",
        f"batch:             global {batch}, per worker {batch // high}..{batch // low}",
        f"supernet:          {pf.supernet_params / 1e6:.3f}M parameters "
        f"({job.space.preset} space, {len(pf.job.space.build(pf.num_classes).choices)} candidates"
        f" x {pf.job.space.build(pf.num_classes).num_layers} layers)",
        f"child networks:    {pf.flops_range[0] / 1e6:.2f}M .. {pf.flops_range[1] / 1e6:.2f}M "
        f"FLOPs, {pf.params_range[0] / 1e6:.3f}M .. {pf.params_range[1] / 1e6:.3f}M params",
        f"memory/worker:     ~{_size(m.total)} peak at batch {batch // low} ({device}): "
        f"weights {_size(m.weights)}, optimizer {_size(m.optimizer)}, "
        f"gradients {_size(m.gradients)}, saved activations {_size(m.activations)}, "
        f"inputs {_size(m.inputs)}",
    ]
    lines += [f"warning:           {w}" for w in pf.warnings]
    lines += [f"PROBLEM:           {p}" for p in pf.problems]
    lines.append("preflight: OK" if pf.ok else
                 f"preflight: FAILED ({len(pf.problems)} problem(s)); nothing was started")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"
