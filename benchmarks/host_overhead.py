"""Host time of a step at negligible compute: what the strategy's own bookkeeping costs the host
(sampling, alpha update, statistics, module walks, optimizer dispatch), DSNAS against the fixed
child trained through the same `step`. On a GPU this host time is what must hide behind the
device's compute; here, on the CPU with a tiny network (width 0.1, batch 4, 32 px), it is
nearly all of the step.

    python benchmarks/host_overhead.py [--steps 60] [--rounds 5]

Variants run interleaved, in rounds of `--steps` steps each (the order rotated every round);
prints each variant's median ms/step over the rounds and the ratio to the child.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydsnas import SearchSpace
from raydsnas.strategies import STRATEGIES, build_strategy


def make(name: str, space: SearchSpace, steps: int, **extra):
    cls = STRATEGIES[name].config
    known = {f.name for f in fields(cls)}
    extra = {k: v for k, v in extra.items() if k in known}
    return build_strategy(name, space, cls(lr=0.05, epochs=1, steps_per_epoch=steps * 1000,
                                           warmup_epochs=0, **extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    space = SearchSpace(num_classes=10, input_size=32, width_mult=0.1, stem_stride=1,
                        dropout=0.0)
    arch = [0] * space.num_layers
    variants = {
        "child": make("fixed", space, args.steps, arch=tuple(arch)),
        "dsnas": make("dsnas", space, args.steps, h=1.0, freeze_by=None),
        "dsnas exact": make("dsnas", space, args.steps, h=1.0, freeze_by=None,
                            alpha_update="exact"),
        # SGD over the path only: on the CPU, `idle_grad: zero` updates every candidate's
        # weights (4x the child's), real arithmetic here that a GPU's foreach kernels absorb.
        "dsnas idle none": make("dsnas", space, args.steps, h=1.0, freeze_by=None,
                                idle_grad="none"),
    }
    if "alpha_update" not in {f.name for f in fields(STRATEGIES["dsnas"].config)}:
        del variants["dsnas exact"]  # code from before the setting existed
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    for strategy in variants.values():
        for _ in range(5):
            strategy.step(x, y)  # warm-up: optimizer state, allocator
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            strategy = variants[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                strategy.step(x, y)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    child = statistics.median(times["child"])
    print(f"{time.strftime('%Y-%m-%d')} torch {torch.__version__}, 1 thread, width 0.1, batch 4, "
          f"32 px, {args.rounds} rounds x {args.steps} steps")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:12s} {median:7.2f} ms/step  {median / child:5.3f}x child  "
              f"(rounds: {', '.join(f'{t:.2f}' for t in times[name])})")


if __name__ == "__main__":
    main()
