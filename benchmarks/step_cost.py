"""Cost of one training step of every strategy, and of training the fixed child alone.

`dsnas`, `spos`, `proxyless`, `snas` and `child` (the fixed child network of DSNAS's sampled
path, trained alone with the same recipe) run side by side in one process on the same batch and
space, interleaved: each round runs every variant once, in an order rotated every round, so
drift in machine load falls on all alike. Reported per variant (medians over the timed rounds):

- step: wall time of one `strategy.step(x, y)` (no profiler running).
- fwd / bwd / opt: the `raydsnas.forward` / `.backward` / `.optimizer` ranges the strategies
  label with `torch.profiler.record_function`, from separate profiled steps (so they carry the
  profiler's overhead; they are a breakdown, the step column is the cost). `other` is what the
  step spends outside those ranges (sampling, statistics, the early-stop check).
- eval: one eval-mode forward (`predict`, no grad) of this round's DSNAS path, the same
  architecture for every variant.
- saved: peak bytes of distinct storages autograd holds for the backward pass during one step
  (weights included; ProxylessNAS's two passes do not add up, their peak counts).
- rss: on CPU, growth of the process's peak RSS over a few training steps, each variant in a
  fresh subprocess: the model is built and warmed by one eval forward, the kernel's peak-RSS
  mark is reset (`/proc/self/clear_refs`), then peak VmHWM minus VmRSS at the reset. (Without
  the reset, `ru_maxrss` would hide growth below the peak left by imports and model building.)
- cuda peak: on GPU, `torch.cuda.max_memory_allocated` over one step minus what was allocated
  before it.

DSNAS and the child run the same path each round (the child is rebuilt for DSNAS's next path);
SPOS samples uniform paths and ProxylessNAS its own, so their per-step FLOPs vary around the
mean. On `--device cuda` every variant uses bf16 autocast and channels_last, as the strategies do.

    python benchmarks/step_cost.py                       # CIFAR space, width 1.0, batch 64, CPU
    python benchmarks/step_cost.py --space imagenet --batch 16 --steps 6
    python benchmarks/step_cost.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from raydsnas import SearchSpace
from raydsnas.strategies import build_strategy
from raydsnas.strategies.dsnas import DSNASConfig
from raydsnas.strategies.optim import warmup_cosine, weight_param_groups
from raydsnas.strategies.proxyless import ProxylessConfig
from raydsnas.strategies.snas import SNASConfig
from raydsnas.strategies.spos import SPOSConfig

VARIANTS = ("dsnas", "child", "spos", "proxyless", "snas")
PHASES = ("forward", "backward", "optimizer")
COLUMNS = (*PHASES, "other")  # other: the profiled step outside the three ranges
RECIPE = {"lr": 0.1, "epochs": 1, "steps_per_epoch": 10_000, "warmup_epochs": 0}


def build_space(name: str, width: float) -> SearchSpace:
    if name == "imagenet":
        return SearchSpace.imagenet()
    return SearchSpace.cifar(num_classes=10, width_mult=width)


def build_search(name: str, space: SearchSpace, device: str):
    config = {
        # h = 1: no layer freezes, so DSNAS keeps searching (and pruning) nothing for the run.
        "dsnas": DSNASConfig(h=1.0, **RECIPE),
        "spos": SPOSConfig(**RECIPE),
        "proxyless": ProxylessConfig(**RECIPE),
        "snas": SNASConfig(**RECIPE),
    }[name]
    return build_strategy(name, space, config, device=device)


class ChildTrainer:
    """The fixed child trained alone with the strategies' recipe (SGD, weight decay off BN,
    warm-up + cosine, label smoothing 0.1, bf16 autocast and channels_last on GPU)."""

    def __init__(self, space: SearchSpace, path: list[int], device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"
        torch.manual_seed(0)
        self.net = space.child(path).to(device)
        if self.on_gpu:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(weight_param_groups(self.net, 4e-5), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(10_000, 0))

    def _autocast(self):
        if self.on_gpu and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.on_gpu else x

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.net.train()
        with record_function("raydsnas.forward"):
            with self._autocast():
                logits = self.net(self._prepare(x))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        self.opt.zero_grad(set_to_none=True)
        with record_function("raydsnas.backward"):
            loss.backward()
        with record_function("raydsnas.optimizer"):
            self.opt.step()
            self.scheduler.step()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, arch=None) -> torch.Tensor:
        self.net.eval()
        with self._autocast():
            return self.net(self._prepare(x)).float()


class SavedTensorPeak:
    """Peak bytes of distinct storages autograd holds for backward while the hook is active:
    each saved tensor is wrapped in a holder whose release (graph freed) decrements its storage."""

    def __init__(self):
        self.refs: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, holders]
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.refs.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        return _Held(self, key, t)

    def release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[key]

    def measure(self, fn: Callable[[], object]) -> int:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor):
            fn()
        return self.peak


class _Held:
    __slots__ = ("key", "owner", "tensor")

    def __init__(self, owner: SavedTensorPeak, key: int, tensor: torch.Tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):
        self.owner.release(self.key)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def phase_times(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Seconds in each `raydsnas.<phase>` range during one profiled `fn()`: GPU time of the
    ranges on CUDA (when the profiler reports it), wall time on the CPU thread otherwise."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - t0
    cpu = dict.fromkeys(PHASES, 0.0)
    gpu = dict.fromkeys(PHASES, 0.0)
    for event in prof.events():
        if not event.name.startswith("raydsnas."):
            continue
        phase = event.name.removeprefix("raydsnas.")
        if phase not in cpu:
            continue
        on_gpu = str(event.device_type).endswith("CUDA")
        (gpu if on_gpu else cpu)[phase] += event.time_range.elapsed_us() * 1e-6
    found = gpu if device.type == "cuda" and any(gpu.values()) else cpu
    return {**found, "other": wall - sum(found.values())}


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def batch(space: SearchSpace, size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, space.input_size, space.input_size, generator=g)
    y = torch.randint(0, space.num_classes, (size,), generator=g)
    return x.to(device), y.to(device)


def rss_probe(args) -> None:
    """In a fresh process: peak-RSS growth (bytes) of `--rss-steps` training steps of one variant."""
    device = torch.device("cpu")
    space = build_space(args.space, args.width)
    x, y = batch(space, args.batch, device)
    path = [int(k) for k in args.path.split(",")]
    runner = (ChildTrainer(space, path, device) if args.rss_probe == "child"
              else build_search(args.rss_probe, space, "cpu"))
    runner.predict(x, path)  # load kernels and thread pools before the baseline
    before = reset_peak_rss()
    for _ in range(args.rss_steps):
        runner.step(x, y)
    print(json.dumps({"variant": args.rss_probe, "rss_delta": peak_rss() - before}))


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux) and return the current RSS in bytes; without the
    reset, the current peak (`ru_maxrss`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_deltas(args, path: list[int], repeats: int) -> dict[str, float]:
    """Median over `repeats` fresh subprocesses per variant, in a rotating order."""
    found: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for name in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            out = subprocess.run(
                [sys.executable, __file__, "--rss-probe", name, "--space", args.space,
                 "--width", str(args.width), "--batch", str(args.batch),
                 "--threads", str(args.threads), "--path", ",".join(map(str, path)),
                 "--rss-steps", str(args.rss_steps)],
                check=True, capture_output=True, text=True).stdout
            found[name].append(json.loads(out.strip().splitlines()[-1])["rss_delta"])
    return {v: statistics.median(found[v]) for v in VARIANTS}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--width", type=float, default=1.0, help="CIFAR space width multiplier")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed rounds")
    parser.add_argument("--profiled", type=int, default=3, help="profiled rounds (phases)")
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--rss-repeats", type=int, default=2, help="subprocesses per variant")
    parser.add_argument("--rss-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rss-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args)
        return

    device = torch.device(args.device)
    space = build_space(args.space, args.width)
    x, y = batch(space, args.batch, device)
    strategies = {name: build_search(name, space, str(device))
                  for name in VARIANTS if name != "child"}
    dsnas = strategies["dsnas"]
    first_path = dsnas.sample_path()

    step_s = {v: [] for v in VARIANTS}
    eval_s = {v: [] for v in VARIANTS}
    phases = {v: {p: [] for p in COLUMNS} for v in VARIANTS}
    saved = {v: [] for v in VARIANTS}
    cuda_peak = {v: [] for v in VARIANTS}
    warmup = 2
    rounds = warmup + args.steps + args.profiled + args.memory_rounds
    for i in range(rounds):
        path = dsnas.sample_path()  # the path DSNAS's next step will run
        child = ChildTrainer(space, path, device)
        child.step(x, y)  # its optimiser state exists, like the supernet's
        runners = {**strategies, "child": child}
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
        kind = ("warmup" if i < warmup else "timed" if i < warmup + args.steps
                else "profiled" if i < warmup + args.steps + args.profiled else "memory")
        for name in order:
            runner = runners[name]

            def one_step(runner=runner):
                return runner.step(x, y)

            if kind in ("warmup", "timed"):
                seconds = timed(one_step, device)
                if kind == "timed":
                    step_s[name].append(seconds)
                    eval_s[name].append(timed(
                        lambda runner=runner, path=path: runner.predict(x, path), device))
            elif kind == "profiled":
                for phase, seconds in phase_times(one_step, device).items():
                    phases[name][phase].append(seconds)
            else:  # one step: its saved-tensor peak and, on GPU, its allocator peak
                counter = SavedTensorPeak()
                if device.type == "cuda":
                    cuda_peak[name].append(cuda_peak_bytes(
                        lambda counter=counter, one_step=one_step: counter.measure(one_step),
                        device))
                else:
                    counter.measure(one_step)
                saved[name].append(counter.peak)
        assert dsnas.step_count == i + 1 and not dsnas.frozen  # one step a round, no pruning

    rss = rss_deltas(args, first_path, args.rss_repeats) if device.type == "cpu" else None

    def med(values):
        return statistics.median(values) if values else float("nan")

    t = {v: med(step_s[v]) for v in VARIANTS}
    m = {v: med(saved[v]) for v in VARIANTS}
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"space={args.space} width={args.width if args.space == 'cifar' else 1.0} "
          f"input={space.input_size} layers={space.num_layers} candidates={space.num_choices} "
          f"batch={args.batch} device={name} threads={args.threads} timed_rounds={args.steps} "
          f"profiled_rounds={args.profiled} memory_rounds={args.memory_rounds}"
          + (f" rss: {args.rss_repeats} subprocesses x {args.rss_steps} steps per variant"
             if rss else ""))
    mem_cols = "  cuda_MB" if device.type == "cuda" else "   rss_MB"
    print(f"{'variant':<10}{'step_ms':>9}{'fwd_ms':>9}{'bwd_ms':>9}{'opt_ms':>9}{'other_ms':>9}"
          f"{'eval_ms':>9}{'saved_MB':>10}{mem_cols}{'time/dsnas':>11}{'saved/dsnas':>12}"
          f"{'rss/dsnas' if rss else 'cuda/dsnas':>11}")
    second = rss if rss else {v: med(cuda_peak[v]) for v in VARIANTS}
    for v in VARIANTS:
        ph = {p: med(phases[v][p]) for p in COLUMNS}
        print(f"{v:<10}{t[v] * 1e3:9.1f}{ph['forward'] * 1e3:9.1f}{ph['backward'] * 1e3:9.1f}"
              f"{ph['optimizer'] * 1e3:9.1f}{ph['other'] * 1e3:9.1f}{med(eval_s[v]) * 1e3:9.1f}"
              f"{m[v] / 2**20:10.1f}{second[v] / 2**20:9.1f}{t[v] / t['dsnas']:11.3f}"
              f"{m[v] / m['dsnas']:12.3f}{second[v] / second['dsnas']:11.3f}")

    if device.type == "cuda":
        print("note: on CUDA the fwd/bwd/opt/other columns are the profiler's host-side ranges "
              "(kernel launches; backward runs on autograd's own thread and reads ~0), not GPU "
              "time; step_ms is the GPU-synchronised step time")

    mem2 = "rss" if rss else "cuda peak"
    checks = [
        ("dsnas/child time", t["dsnas"] / t["child"], "<= 1.05", lambda r: r <= 1.05),
        ("dsnas/child saved", m["dsnas"] / m["child"], "<= 1.05", lambda r: r <= 1.05),
        (f"dsnas/child {mem2}", second["dsnas"] / second["child"], "<= 1.05",
         lambda r: r <= 1.05),
        ("snas/dsnas time", t["snas"] / t["dsnas"], ">= 3", lambda r: r >= 3),
        ("snas/dsnas saved", m["snas"] / m["dsnas"], ">= 3", lambda r: r >= 3),
        (f"snas/dsnas {mem2}", second["snas"] / second["dsnas"], ">= 3", lambda r: r >= 3),
        ("proxyless/dsnas time", t["proxyless"] / t["dsnas"], "~ 2 (1.5-2.5)",
         lambda r: 1.5 <= r <= 2.5),
        ("proxyless/dsnas saved", m["proxyless"] / m["dsnas"], "~ 2 (1.5-2.5)",
         lambda r: 1.5 <= r <= 2.5),
        (f"proxyless/dsnas {mem2}", second["proxyless"] / second["dsnas"], "~ 2 (1.5-2.5)",
         lambda r: 1.5 <= r <= 2.5),
    ]
    print(f"{'target':<26}{'ratio':>8}  {'wanted':<15}result")
    for label, ratio, wanted, ok in checks:
        print(f"{label:<26}{ratio:8.3f}  {wanted:<15}{verdict(ok(ratio))}")


if __name__ == "__main__":
    main()
