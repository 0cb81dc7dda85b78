"""Step-time overhead of the search on Ray Train (2 workers, gloo, one all-reduce a step) vs the
same DSNAS steps in one plain process, at the same global batch, side by side in one run.

Both sides use the synthetic data set (no I/O) and the CIFAR-sized space; the Ray side's step
time comes from the loop's own per-epoch timer (training steps only: no evaluation, no
checkpoint). On a 2-core machine the plain process gets both cores (2 torch threads) and each
Ray worker one.

    python benchmarks/train_overhead.py [--batch 64] [--epochs 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def plain_steps(args, space, cfg) -> float:
    from raydsnas import DSNAS
    from raydsnas.data.pipeline import normalize
    from raydsnas.data.synthetic import SyntheticData

    torch.set_num_threads(args.workers)
    data = SyntheticData(10, args.batch * args.steps, 64, 32, 0)
    d = DSNAS(space, cfg)
    times = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        for batch in data.train_batches(epoch, 0, 1, args.batch, args.steps):
            d.step(normalize(batch["image"]), batch["label"])
        times.append((time.perf_counter() - t0) / args.steps)
    return statistics.median(times[1:])


def ray_steps(args) -> float:
    import ray

    from raydsnas.config import load_config
    from raydsnas.train.launcher import run_search

    with tempfile.TemporaryDirectory() as folder:
        sets = ["name=overhead", f"storage={folder}",
                f"data.uri=synthetic:10/{args.batch * args.steps}/64", "data.image_size=32",
                "space.preset=cifar", "space.width_mult=0.5", "space.stage_repeats=[2,2,4,2]",
                f"search.epochs={args.epochs}", f"search.global_batch_size={args.batch}",
                "search.lr=0.1", f"search.lr_reference_batch={args.batch}", "search.h=1.0",
                "search.bn_recalibration_batches=0", "search.log_every=1000",
                f"scaling.num_workers={args.workers}", "scaling.cpus_per_worker=1"]
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}})
        run_search(load_config(None, sets))
        ray.shutdown()
        state = torch.load(sorted(Path(folder, "overhead").glob("epoch_*"))[-1] / "state.pt",
                           weights_only=True)
    history = json.loads(state["history"])
    per_step = [args.batch / h["images_per_s"] for h in history]
    return statistics.median(per_step[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from raydsnas import DSNASConfig, SearchSpace

    space = SearchSpace.cifar(num_classes=10, width_mult=0.5, stage_repeats=(2, 2, 4, 2))
    cfg = DSNASConfig(lr=0.1, epochs=args.epochs, steps_per_epoch=args.steps, h=1.0)
    ray_t = ray_steps(args)
    plain_t = plain_steps(args, space, cfg)
    print(f"global batch {args.batch}, {args.steps} steps x {args.epochs} epochs, "
          f"median step time after the first epoch, CPU")
    print(f"{'':34}{'step (ms)':>10}{'ratio':>8}")
    print(f"{'plain process, ' + str(args.workers) + ' threads':34}{plain_t * 1e3:10.1f}{1.0:8.3f}")
    print(f"{'Ray Train, ' + str(args.workers) + ' workers x 1 thread':34}{ray_t * 1e3:10.1f}"
          f"{ray_t / plain_t:8.3f}")


if __name__ == "__main__":
    main()
