"""Task-specific end-to-end comparison at equal total epochs (the DSNAS paper's Fig. 3), on digits.

Every method ends with a deployable child network (its `export_child`, BN recalibrated on 8
training batches as the Ray loop's export does) scored on the digits validation split:

- dsnas:            one stage, E epochs (the `jobs/local.yaml` settings; `flops_budget` = the
                    FLOPs limit unless --no-dsnas-budget, so it is steered towards the same limit).
- spos+retrain:     uniform single-path supernet E/2 epochs, SPOS's evolutionary search under
                    the FLOPs limit, then the chosen child re-initialised and trained E/2 epochs.
- spos+finetune:    the same, the child fine-tuned from the supernet's weights for E/2 epochs.
- random+finetune:  the same supernet training, `population x iterations` uniform architectures
                    under the limit scored like the EA's, the best fine-tuned E/2 epochs.

The two SPOS rows share their supernet training per seed (restored into a second SPOS as from
a checkpoint before the search) and each is charged its full cost. Compute = the measured wall time
of every training step plus the search (`end_search`) time, and machine-independent sample
passes: forward+backward training passes, and forward-only passes of the search (per scored
candidate: `bn_batches` batches of BN recalibration and the validation split). The final BN
recalibration and evaluation, the same for all, are not counted. Runs the strategies' own `step`
and `end_search` in-process (no Ray), as `raydsnas.train.loop` drives them; the data are the
built-in digits as normalised tensors (`raydsnas.analysis.digits_data`) in `TensorBatches`
(no crop augmentation, unlike the Ray pipeline). The method order rotates from seed to seed.

Caveat: as in the Ray loop, SPOS and random search score their candidates on the validation
split that the final top-1 is then measured on (297 digits), so their selection sees the test
data; DSNAS never does. This favours the two-stage rows.

    python benchmarks/end_to_end.py                     # E = 12, seeds 0 1 2, ~10 min on 2 cores
    python benchmarks/end_to_end.py --epochs 20 --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, replace

import torch

from raydsnas import SearchSpace
from raydsnas.analysis import digits_data
from raydsnas.evaluation import recalibrate_bn
from raydsnas.strategies import TensorBatches, build_strategy
from raydsnas.strategies.dsnas import DSNASConfig
from raydsnas.strategies.spos import RandomSearchConfig, SPOSConfig

METHODS = ("dsnas", "spos+retrain", "spos+finetune", "random+finetune")
RECALIBRATION_BATCHES = 8


@dataclass
class Outcome:
    method: str
    seed: int
    top1: float
    flops: int
    train_steps: int
    train_s: float
    search_s: float
    fb_passes: int
    fwd_passes: int
    arch: list[int]

    @property
    def total_s(self) -> float:
        return self.train_s + self.search_s


@dataclass
class Cost:
    """What a strategy has spent so far: training steps, their wall time and samples, search."""

    steps: int = 0
    train_s: float = 0.0
    fb_passes: int = 0
    search_s: float = 0.0
    fwd_passes: int = 0


def train_epochs(strategy, data: TensorBatches, epochs: range, cost: Cost) -> None:
    for epoch in epochs:
        for images, labels in data.train(epoch):
            t0 = time.perf_counter()
            strategy.step(images, labels)
            cost.train_s += time.perf_counter() - t0
            cost.steps += 1
            cost.fb_passes += len(labels)


def run_search(strategy, data: TensorBatches, epoch: int, cost: Cost) -> None:
    """`end_search` as the loop calls it, timed; its forward passes counted from its log."""
    t0 = time.perf_counter()
    strategy.end_search(data, epoch)
    cost.search_s += time.perf_counter() - t0
    scored = len(strategy.search_log) + 1  # + the chosen path's BN statistics, once more
    per_candidate = (min(strategy.config.bn_batches, data.steps_per_epoch) * data.batch_size
                     + len(data.val_labels))
    cost.fwd_passes += scored * per_candidate


def deploy(strategy, data: TensorBatches, epoch: int) -> tuple[float, list[int]]:
    """The exported child's validation top-1, after BN recalibration (as the loop's export)."""
    arch = strategy.argmax_arch()
    child = strategy.export_child(arch)
    recalibrate_bn(child, (x for x, _ in data.train(epoch, limit=RECALIBRATION_BATCHES)))
    child.eval()
    return data.evaluate(child)["val_top1"], arch


def outcome(method: str, seed: int, strategy, data: TensorBatches, cost: Cost,
            epochs: int) -> Outcome:
    top1, arch = deploy(strategy, data, epochs)
    return Outcome(method, seed, top1, strategy.space.flops(arch), cost.steps, cost.train_s,
                   cost.search_s, cost.fb_passes, cost.fwd_passes, arch)


def run_dsnas(space, data, args, seed, limit) -> list[Outcome]:
    config = DSNASConfig(
        lr=0.1, h=0.15, alpha_lr=0.1, warmup_epochs=1, freeze_check_every=10,
        epochs=args.epochs, steps_per_epoch=data.steps_per_epoch, seed=seed,
        flops_budget=None if args.no_dsnas_budget else limit)
    strategy = build_strategy("dsnas", space, config)
    cost = Cost()
    train_epochs(strategy, data, range(args.epochs), cost)
    return [outcome("dsnas", seed, strategy, data, cost, args.epochs)]


def one_shot_config(cls, args, data, seed, limit, **extra):
    half = args.epochs // 2
    return cls(lr=0.1, warmup_epochs=1, epochs=half, steps_per_epoch=data.steps_per_epoch,
               seed=seed, flops_limit=limit, bn_batches=args.bn_batches,
               final_phase="finetune", final_epochs=args.epochs - half, **extra)


def run_spos(space, data, args, seed, limit) -> list[Outcome]:
    """Both SPOS rows from one supernet training (copied before the search)."""
    config = one_shot_config(SPOSConfig, args, data, seed, limit, population=args.population,
                             iterations=args.iterations, top_k=args.top_k,
                             mutations=args.mutations, crossovers=args.crossovers)
    finetune = build_strategy("spos", space, config)
    shared = Cost()
    half = config.epochs
    train_epochs(finetune, data, range(half), shared)
    # The same trained supernet, restored as from a checkpoint into a retrain-configured SPOS.
    # A from-scratch child gets the search's 1-epoch warm-up; fine-tuning starts warm.
    retrain = build_strategy("spos", space, replace(config, final_phase="retrain",
                                                    final_warmup_epochs=1))
    retrain.load_state_dict(finetune.state_dict())
    results = []
    for method, strategy in (("spos+finetune", finetune), ("spos+retrain", retrain)):
        cost = copy.copy(shared)
        run_search(strategy, data, half, cost)
        train_epochs(strategy, data, range(half, half + strategy.extra_epochs), cost)
        results.append(outcome(method, seed, strategy, data, cost, args.epochs))
    return results


def run_random(space, data, args, seed, limit) -> list[Outcome]:
    config = one_shot_config(RandomSearchConfig, args, data, seed, limit,
                             num_samples=args.population * args.iterations)
    strategy = build_strategy("random", space, config)
    cost = Cost()
    half = config.epochs
    train_epochs(strategy, data, range(half), cost)
    run_search(strategy, data, half, cost)
    train_epochs(strategy, data, range(half, half + strategy.extra_epochs), cost)
    return [outcome("random+finetune", seed, strategy, data, cost, args.epochs)]


def median_path_flops(space: SearchSpace, samples: int = 2000) -> float:
    """The median FLOPs of uniformly random architectures: half the space is under it."""
    g = torch.Generator().manual_seed(0)
    archs = torch.randint(space.num_choices, (samples, space.num_layers), generator=g).tolist()
    return float(statistics.median(space.flops(a) for a in archs))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="total epochs of every method")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--batch", type=int, default=64)
    # One intra-op thread: on a small, shared CPU two threads stall on each other's load.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--mutations", type=int, default=8)
    parser.add_argument("--crossovers", type=int, default=8)
    parser.add_argument("--bn-batches", type=int, default=4)
    parser.add_argument("--no-dsnas-budget", action="store_true",
                        help="DSNAS without the FLOPs cost term")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the two-stage methods split them in halves)")
    torch.set_num_threads(args.threads)

    space = SearchSpace.cifar(num_classes=10, width_mult=0.5, stage_repeats=(2, 2, 4, 2))
    digits = digits_data(space.input_size, args.batch)
    limit = median_path_flops(space)
    half = args.epochs // 2
    print(f"digits (train {len(digits.train_labels)}, val {len(digits.val_labels)}), cifar space "
          f"width 0.5 stage_repeats [2,2,4,2] ({space.num_layers} layers x {space.num_choices}), "
          f"image {space.input_size}, batch {args.batch}, lr 0.1 (warm-up 1 epoch, cosine), "
          f"threads {args.threads}")
    print(f"total epochs E={args.epochs} for every method; two-stage: {half} supernet + "
          f"{args.epochs - half} child. FLOPs limit {limit / 1e6:.3f}M (median of uniform "
          f"paths; space {space.flops(space.flops_table().smallest()) / 1e6:.3f}M-"
          f"{space.flops(space.flops_table().largest()) / 1e6:.3f}M)")
    print(f"dsnas: h 0.15, alpha_lr 0.1, freeze_check_every 10, flops_budget "
          f"{'off' if args.no_dsnas_budget else f'{limit / 1e6:.3f}M (the limit)'}; "
          f"EA: population {args.population}, iterations {args.iterations}, top-k {args.top_k}, "
          f"mutations {args.mutations}, crossovers {args.crossovers}, bn_batches "
          f"{args.bn_batches}; random: {args.population * args.iterations} samples, same "
          f"scoring; final child: BN recalibrated on {RECALIBRATION_BATCHES} batches")

    runners = [("dsnas", run_dsnas), ("spos", run_spos), ("random", run_random)]
    results: list[Outcome] = []
    for seed in range(args.seeds):
        data = TensorBatches((digits.train_images, digits.train_labels),
                             (digits.val_images, digits.val_labels), args.batch, seed=seed)
        shift = seed % len(runners)
        for _, run in runners[shift:] + runners[:shift]:
            for r in run(space, data, args, seed, limit):
                results.append(r)
                print(f"  seed {seed} {r.method:<16} top1 {r.top1:.4f} "
                      f"MFLOPs {r.flops / 1e6:.3f} steps {r.train_steps} train {r.train_s:.1f}s "
                      f"search {r.search_s:.1f}s arch {','.join(map(str, r.arch))}", flush=True)

    rows = {m: [r for r in results if r.method == m] for m in METHODS}
    base = rows["dsnas"]
    base_top1 = statistics.fmean(r.top1 for r in base)
    base_wall = statistics.fmean(r.total_s for r in base)
    base_fb = statistics.fmean(r.fb_passes for r in base)
    print(f"\n{len(base)} seeds per method; mean +- std; ratios are of the means, to dsnas")
    print(f"{'method':<16}{'top1':>15}{'MFLOPs':>15}{'<=limit':>8}{'steps':>7}"
          f"{'train_s':>9}{'search_s':>9}{'total_s':>9}{'fb_kpass':>9}{'fwd_kpass':>10}"
          f"{'d_top1_pp':>10}{'wall/dsnas':>11}{'fb/dsnas':>9}")
    for method in METHODS:
        rs = rows[method]
        top1, top1_sd = mean_std([r.top1 for r in rs])
        flops, flops_sd = mean_std([r.flops / 1e6 for r in rs])
        within = sum(r.flops <= limit for r in rs)
        total = statistics.fmean(r.total_s for r in rs)
        fb = statistics.fmean(r.fb_passes for r in rs)
        print(f"{method:<16}{top1:9.4f}+-{top1_sd:.3f}{flops:9.3f}+-{flops_sd:.3f}"
              f"{f'{within}/{len(rs)}':>8}{statistics.fmean(r.train_steps for r in rs):7.0f}"
              f"{statistics.fmean(r.train_s for r in rs):9.1f}"
              f"{statistics.fmean(r.search_s for r in rs):9.1f}{total:9.1f}{fb / 1e3:9.1f}"
              f"{statistics.fmean(r.fwd_passes for r in rs) / 1e3:10.1f}"
              f"{(top1 - base_top1) * 100:10.2f}{total / base_wall:11.3f}{fb / base_fb:9.3f}")


if __name__ == "__main__":
    main()
