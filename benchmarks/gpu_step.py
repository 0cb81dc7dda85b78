"""One GPU, ImageNet-sized: images/s and peak memory of the DSNAS search step vs training the
fixed child alone vs SNAS (and ProxylessNAS, SPOS), at 224x224, batch 256, bf16 autocast,
channels_last, plus the implied GPU-hours of 240 ImageNet epochs. Fits one 10-minute run.

    python benchmarks/gpu_step.py                       # batch 256, 20 timed steps per variant
    python benchmarks/gpu_step.py --batch 128 --steps 10 --variants dsnas,child,snas

Variants run one after the other in one process, each after warm-up steps (cuDNN autotuning,
optimizer state); time is measured with CUDA events over the timed steps, memory with
`torch.cuda.max_memory_allocated` from a reset (weights, optimizer state and activations).
`dsnas-fixed` runs the DSNAS step on the path the `child` variant trains (the sampler still
runs, its draw is replaced), so their ratio isolates the search machinery; `dsnas` samples
its paths from alpha as a search does. A single-path search must know the next path on the
host before it can launch the next forward, so the host waits for the GPU once a step;
`child-sync` is the child with one such wait a step (reading its loss), which separates the
cost of that wait from the rest. Before any timing, every candidate block runs forward and
backward once, so cuDNN's autotuning (`cudnn.benchmark`) is not charged to whichever variant
first meets a candidate. Also checked on the GPU: the preflight's memory
estimate against the measured peak, a DSNAS checkpoint round trip continuing exactly, and
`GlobalBatchNorm2d` over a one-rank NCCL group under bf16.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydsnas import SearchSpace
from raydsnas.strategies import STRATEGIES, build_strategy

IMAGENET_TRAIN = 1_281_167
PAPER_ARCH = [0, 0, 3, 0, 3, 2, 0, 0, 3, 3, 2, 3, 3, 3, 2, 0, 0, 3, 3, 0]
GiB = 2**30


def strategy_config(name: str, steps: int):
    cls = STRATEGIES[name].config
    extra = {"h": 1.0} if name == "dsnas" else {}  # nothing freezes while we measure
    return cls(lr=0.5, epochs=1, steps_per_epoch=steps, warmup_epochs=0, **extra)


def run_variant(name: str, space: SearchSpace, x: torch.Tensor, y: torch.Tensor, warmup: int,
                steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if name in ("child", "child-sync"):
        model = space.child(PAPER_ARCH).cuda().to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=4e-5)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if name == "child-sync":
                float(loss.detach())  # the host waits for this step, as a path sampler must
            return loss.detach()
        holder = model
    else:
        strategy_name = "dsnas" if name == "dsnas-fixed" else name
        strategy = build_strategy(strategy_name, space, strategy_config(strategy_name, 10_000),
                                  device="cuda")
        if name == "dsnas-fixed":
            sample = strategy.sample_path

            def fixed_path():
                sample()  # its cost stays in the step
                return list(PAPER_ARCH)
            strategy.sample_path = fixed_path

        def step():
            return strategy.step(x, y).loss
        holder = strategy

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ms = start.elapsed_time(end) / steps
    result = {"variant": name, "ms_per_step": ms, "wall_ms_per_step": wall * 1e3 / steps,
              "images_per_s": x.shape[0] / (ms / 1e3),
              "peak_gib": torch.cuda.max_memory_allocated() / GiB,
              "peak_above_start_gib": (torch.cuda.max_memory_allocated() - base) / GiB,
              "loss": float(loss)}
    del holder
    return result


def prime(space: SearchSpace, x: torch.Tensor, y: torch.Tensor) -> None:
    """Run every candidate block forward and backward once (cuDNN autotuning happens here)."""
    supernet = space.supernet().cuda().to(memory_format=torch.channels_last).train()
    for k in range(space.num_choices):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = supernet(x, [k] * space.num_layers)
        F.cross_entropy(logits.float(), y).backward()
    torch.cuda.synchronize()
    del supernet


def check_estimate(space: SearchSpace, batch: int, measured_gib: float) -> dict:
    from raydsnas.preflight import estimate_memory

    est = estimate_memory(space, batch, world=1, amp=True)
    return {"estimate_gib": est.total / GiB, "measured_dsnas_peak_gib": measured_gib,
            "estimate_over_measured": est.total / GiB / measured_gib}


def check_resume(space: SearchSpace) -> dict:
    """2 steps, checkpoint through bytes (weights_only), 2 more on both: the same result."""
    from raydsnas import DSNAS, DSNASConfig

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cfg = DSNASConfig(lr=0.2, epochs=1, steps_per_epoch=100, warmup_epochs=0, h=0.9,
                      alpha_lr=0.05)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 224, 224, generator=gen).cuda(),
                torch.randint(0, 1000, (32,), generator=gen).cuda()) for _ in range(4)]
    a = DSNAS(space, cfg, device="cuda")
    for xb, yb in batches[:2]:
        a.step(xb, yb)
    buffer = io.BytesIO()
    torch.save({"strategy": a.state_dict(), "cuda_rng": torch.cuda.get_rng_state(),
                "cpu_rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    b = DSNAS(space, cfg, device="cuda")  # re-seeds the global RNGs: restore them per run
    b.load_state_dict(state["strategy"])
    paths = {}
    for name, strategy in (("a", a), ("b", b)):  # one after the other: they share the RNGs
        torch.cuda.set_rng_state(state["cuda_rng"])
        torch.set_rng_state(state["cpu_rng"])
        paths[name] = [strategy.step(xb, yb).path for xb, yb in batches[2:]]
    assert paths["a"] == paths["b"]
    weight_diff = max(float((p - q).abs().max()) for p, q in
                      zip(a.supernet.parameters(), b.supernet.parameters(), strict=True))
    torch.backends.cudnn.benchmark = True
    return {"resume_alpha_max_diff": float((a.alpha_matrix() - b.alpha_matrix()).abs().max()),
            "resume_weight_max_diff": weight_diff, "resume_step": b.step_count}


def check_nccl_global_bn() -> dict:
    """GlobalBatchNorm2d's differentiable all-reduce over NCCL (one rank) under bf16 equals
    BatchNorm2d, forward and backward."""
    import torch.distributed as dist

    from raydsnas.train.sync_bn import GlobalBatchNorm2d

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        x = torch.randn(16, 32, 14, 14, device="cuda").to(memory_format=torch.channels_last)
        plain, glob = torch.nn.BatchNorm2d(32).cuda(), GlobalBatchNorm2d(32).cuda()
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = [plain(xs[0]), glob(xs[1])]
        for out in outs:
            (out.float() ** 2).mean().backward()
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        return {"nccl_bn_out_diff": float((outs[0].float() - outs[1].float()).abs().max()),
                "nccl_bn_grad_diff": float((xs[0].grad - xs[1].grad).abs().max()),
                "nccl_all_reduce": t.tolist()}
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants",
                        default="child,child-sync,dsnas-fixed,dsnas,spos,proxyless,snas")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / GiB:.0f} GiB; torch {torch.__version__}; "
          f"bf16 autocast, channels_last; batch {args.batch} at 224x224; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    space = SearchSpace.imagenet()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=gen).cuda()
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).cuda()

    prime(space, x, y)
    results = []
    for name in args.variants.split(","):
        try:
            results.append(run_variant(name, space, x, y, args.warmup, args.steps))
        except torch.cuda.OutOfMemoryError as err:
            results.append({"variant": name, "error": f"out of memory: {err}"})
        r = results[-1]
        print(f"  {name:12s} " + (r["error"] if "error" in r else
              f"{r['ms_per_step']:8.1f} ms/step {r['images_per_s']:8.0f} img/s "
              f"peak {r['peak_gib']:6.2f} GiB"), flush=True)

    by = {r["variant"]: r for r in results if "error" not in r}
    print(f"\n{'variant':14}{'ms/step':>9}{'img/s':>9}{'peak GiB':>10}{'time/child':>12}"
          f"{'mem/child':>11}{'time/dsnas':>12}{'mem/dsnas':>11}{'GPU-h 240 ep':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:14}{r['error'][:80]}")
            continue
        c, d = by.get("child"), by.get("dsnas")
        hours = IMAGENET_TRAIN * 240 / r["images_per_s"] / 3600
        print(f"{r['variant']:14}{r['ms_per_step']:9.1f}{r['images_per_s']:9.0f}"
              f"{r['peak_gib']:10.2f}"
              f"{r['ms_per_step'] / c['ms_per_step'] if c else float('nan'):12.3f}"
              f"{r['peak_gib'] / c['peak_gib'] if c else float('nan'):11.3f}"
              f"{r['ms_per_step'] / d['ms_per_step'] if d else float('nan'):12.3f}"
              f"{r['peak_gib'] / d['peak_gib'] if d else float('nan'):11.3f}{hours:14.1f}")
    print("GPU-h 240 ep: 240 epochs x 1,281,167 images at this rate on one GPU, compute only "
          "(no data loading, no evaluation); the paper reports 420 GPU-hours end to end.")

    checks = {}
    if "dsnas" in by:
        checks.update(check_estimate(space, args.batch, by["dsnas"]["peak_gib"]))
    for check in (check_resume, check_nccl_global_bn):
        try:
            checks.update(check(space) if check is check_resume else check())
        except Exception as err:  # noqa: BLE001 (one failed check must not hide the rest)
            checks[check.__name__] = f"FAILED: {type(err).__name__}: {err}"
    print("\nchecks:", json.dumps(checks, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "checks": checks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
