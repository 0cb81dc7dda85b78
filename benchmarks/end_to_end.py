"""One stage against its alternatives at equal total epochs, over seeds (the DSNAS paper's Fig. 3,
and the product's promise: the searched child as good as its architecture trained alone).

Every method ends with a deployable child network (its `export_child`, BN recalibrated on 8
training batches as the Ray loop's export does) scored on the validation split, which no
method sees before that score:

- dsnas            one stage, E epochs: the product's recipe (`space.bn_eps` 1e-2, search
                   deadline `freeze_by` 1/3, the child rewound to its initialisation where
                   the search ended and trained on its own warm-up and cosine
                   (`child_start: rewind`), zero gradients for idle candidates),
                   `flops_budget` = the FLOPs limit below.
- fixed-same       the architecture dsnas found (same seed), trained alone for E epochs
                   (`search.strategy: fixed`, the same recipe and data order).
- fixed-random     a uniformly random architecture (seeded), trained alone for E epochs.
- spos+retrain     uniform single-path supernet E/2 epochs, SPOS's evolutionary search under
                   the FLOPs limit, then the chosen child re-initialised and trained E/2 epochs.
- spos+finetune    the same supernet and search; the child fine-tuned E/2 epochs.
- random+finetune  the same supernet training, `population x iterations` uniform architectures
                   under the limit, the best fine-tuned E/2 epochs.
  The two-stage methods score candidates on a held-out part of the training split
  (`selection_fraction`, never trained on), never on the validation split.
- ablations (`--ablations`, changes to dsnas one at a time): dsnas-inherit (the child keeps
  the weights the search trained, as the paper and its reference code), dsnas-eps1e-5 (PyTorch's BN
  epsilon), dsnas-idle-none (SPOS's idle-gradient convention), dsnas-baseline (a per-layer
  running-mean baseline subtracted from the credit c_l: unbiased, lower variance), and
  dsnas-landed (the recipe before the deadline existed: eps 1e-5, no deadline, one cosine,
  idle gradients None, inherited weights).

Compute: the wall time of every training step and of the search (`end_search`), and
machine-independent sample passes (forward+backward training passes; forward-only passes of
the search: per scored candidate `bn_batches` batches of BN recalibration and the selection
split). The final BN recalibration and evaluation, the same for all, are not counted.

Runs the strategies' own `step` and `end_search` in-process (no Ray), as `raydsnas.train.loop`
drives them, on the built-in data as normalised tensors (`raydsnas.analysis.load_data`, no crop
augmentation). All methods of a seed see the same data order. Every finished run is appended
to a JSON-lines file, so groups of methods can run in parallel processes and be reported
together; `--report` prints the table, the paired difference dsnas - fixed-same with a 95%
t-interval, and PASS/MISS for the targets:

    python benchmarks/end_to_end.py --data digits --seeds 5 --group one-stage --ablations \
        --out runs/e2e-digits-a.jsonl
    python benchmarks/end_to_end.py --data digits --seeds 5 --group two-stage \
        --out runs/e2e-digits-b.jsonl
    python benchmarks/end_to_end.py --report runs/e2e-digits-a.jsonl runs/e2e-digits-b.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from raydsnas import SearchSpace
from raydsnas.analysis import load_data
from raydsnas.data.tensors import TensorBatches
from raydsnas.evaluation import recalibrate_bn
from raydsnas.strategies import DSNAS, build_strategy
from raydsnas.strategies.dsnas import DSNASConfig
from raydsnas.strategies.fixed import FixedConfig
from raydsnas.strategies.spos import RandomSearchConfig, SPOSConfig

RECALIBRATION_BATCHES = 8
ONE_STAGE = ("dsnas", "fixed-same", "fixed-random")
TWO_STAGE = ("spos+retrain", "spos+finetune", "random+finetune")
ABLATIONS = ("dsnas-inherit", "dsnas-eps1e-5", "dsnas-idle-none", "dsnas-baseline",
             "dsnas-landed", "dsnas-exact")
# The built-in sets as the jobs run them: (uri, image size, classes, total epochs E).
DATA = {"digits": ("builtin:digits", 32, 10, 12), "shapes": ("builtin:shapes", 16, 24, 8)}
# The weight learning rate of the data set's job at batch 64. Shapes: 0.05, chosen on a part of
# its training split held out (0.1 diverged mid-run in some seeds; never chosen on val).
LR = {"digits": 0.1, "shapes": 0.05}


@dataclass
class Outcome:
    data: str
    method: str
    seed: int
    epochs: int
    top1: float
    flops: int
    train_steps: int
    train_s: float
    search_s: float
    fb_passes: int
    fwd_passes: int
    arch: list[int]
    frozen_by_deadline: int = 0
    lr: float = 0.1  # runs recorded before --lr existed all used 0.1
    search_end_step: int | None = None

    @property
    def total_s(self) -> float:
        return self.train_s + self.search_s


@dataclass
class Cost:
    steps: int = 0
    train_s: float = 0.0
    fb_passes: int = 0
    search_s: float = 0.0
    fwd_passes: int = 0


class BaselineDSNAS(DSNAS):
    """DSNAS with a per-layer baseline subtracted from the credit: `(onehot - p)(c_l - b_l)`,
    `b_l` a running mean of c_l over earlier steps. Unbiased (E[onehot - p] = 0 and b_l does
    not depend on this step's sample); studied here, not a product option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._baseline = torch.zeros(self.space.num_layers)
        self._baseline_seen = torch.zeros(self.space.num_layers)

    def alpha_gradient(self, path, cost):
        c = cost.detach().float().cpu()
        searched = torch.zeros(self.space.num_layers)
        searched[self.searchable_layers()] = 1.0
        seen = self._baseline_seen > 0
        adjusted = torch.where(seen, c - self._baseline, c)  # no baseline before a layer's 1st
        updated = torch.where(seen, 0.9 * self._baseline + 0.1 * c, c)
        self._baseline = torch.where(searched > 0, updated, self._baseline)
        self._baseline_seen += searched
        return super().alpha_gradient(path, adjusted.to(cost.device))


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
                     + len(data.select_labels))
    cost.fwd_passes += scored * per_candidate


def outcome(data_name: str, method: str, seed: int, strategy, data: TensorBatches, cost: Cost,
            epochs: int) -> Outcome:
    """The exported child's validation top-1, after BN recalibration (as the loop's export)."""
    arch = strategy.argmax_arch()
    child = strategy.export_child(arch)
    recalibrate_bn(child, (x for x, _ in data.train(epochs, limit=RECALIBRATION_BATCHES)))
    child.eval()
    top1 = data.evaluate(child)["val_top1"]
    return Outcome(data_name, method, seed, epochs, top1, strategy.space.flops(arch), cost.steps,
                   cost.train_s, cost.search_s, cost.fb_passes, cost.fwd_passes, arch,
                   len(getattr(strategy, "forced", [])), strategy.config.lr,
                   getattr(strategy, "search_end_step", None))


def dsnas_config(args, data, seed, limit, **changes) -> DSNASConfig:
    """The product's DSNAS recipe on the built-in data (`jobs/local.yaml`)."""
    base = DSNASConfig(lr=args.lr, h=0.15, alpha_lr=0.1, warmup_epochs=1, freeze_check_every=10,
                       epochs=args.epochs, steps_per_epoch=data.steps_per_epoch, seed=seed,
                       flops_budget=limit, freeze_by=args.freeze_by, child_start="rewind")
    return replace(base, **changes)


def run_dsnas(method, space, data, args, seed, limit) -> Outcome:
    changes, strategy_space, cls = {}, space, DSNAS
    if method in ("dsnas-eps1e-5", "dsnas-landed"):
        strategy_space = replace(space, bn_eps=1e-5)
    if method in ("dsnas-idle-none", "dsnas-landed"):
        changes["idle_grad"] = "none"
    if method in ("dsnas-inherit", "dsnas-landed"):
        changes["child_start"] = "inherit"
    if method == "dsnas-exact":  # alpha updated before the next path is drawn (the paper's order)
        changes["alpha_update"] = "exact"
    if method == "dsnas-landed":
        changes.update(freeze_by=None, child_schedule="continue")
    if method == "dsnas-baseline":
        cls = BaselineDSNAS
    strategy = cls(strategy_space, dsnas_config(args, data, seed, limit, **changes))
    cost = Cost()
    train_epochs(strategy, data, range(args.epochs), cost)
    return outcome(args.data, method, seed, strategy, data, cost, args.epochs)


def run_fixed(method, space, data, args, seed, arch) -> Outcome:
    config = FixedConfig(lr=args.lr, warmup_epochs=1, epochs=args.epochs,
                         steps_per_epoch=data.steps_per_epoch, seed=seed, arch=tuple(arch))
    strategy = build_strategy("fixed", space, config)
    cost = Cost()
    train_epochs(strategy, data, range(args.epochs), cost)
    return outcome(args.data, method, seed, strategy, data, cost, args.epochs)


def one_shot_config(cls, args, data, seed, limit, **extra):
    half = args.epochs // 2
    return cls(lr=args.lr, warmup_epochs=1, epochs=half, steps_per_epoch=data.steps_per_epoch,
               seed=seed, flops_limit=limit, bn_batches=args.bn_batches,
               selection_fraction=args.selection_fraction, final_phase="finetune",
               final_epochs=args.epochs - half, **extra)


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
        results.append(outcome(args.data, method, seed, strategy, data, cost, args.epochs))
    return results


def run_random(space, data, args, seed, limit) -> Outcome:
    config = one_shot_config(RandomSearchConfig, args, data, seed, limit,
                             num_samples=args.population * args.iterations)
    strategy = build_strategy("random", space, config)
    cost = Cost()
    half = config.epochs
    train_epochs(strategy, data, range(half), cost)
    run_search(strategy, data, half, cost)
    train_epochs(strategy, data, range(half, half + strategy.extra_epochs), cost)
    return outcome(args.data, "random+finetune", seed, strategy, data, cost, args.epochs)


def median_path_flops(space: SearchSpace, samples: int = 2000) -> float:
    """The median FLOPs of uniformly random architectures: half the space is under it."""
    g = torch.Generator().manual_seed(0)
    archs = torch.randint(space.num_choices, (samples, space.num_layers), generator=g).tolist()
    return float(statistics.median(space.flops(a) for a in archs))


def random_arch(space: SearchSpace, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(10_007 + seed)
    return torch.randint(space.num_choices, (space.num_layers,), generator=g).tolist()


# -- the report ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval of the mean of paired differences."""
    from scipy.stats import t

    mean, sd = mean_std(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def paired(rows: dict[str, dict[int, Outcome]], a: str, b: str) -> list[float]:
    seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
    return [rows[a][s].top1 - rows[b][s].top1 for s in seeds]


def report(results: list[Outcome]) -> str:
    lines = []
    for data_name, lr in sorted({(r.data, r.lr) for r in results}):
        mine = [r for r in results if (r.data, r.lr) == (data_name, lr)]
        rows: dict[str, dict[int, Outcome]] = {}
        for r in mine:
            rows.setdefault(r.method, {})[r.seed] = r  # a rerun of a seed replaces it
        order = [m for m in (*ONE_STAGE, *TWO_STAGE, *ABLATIONS) if m in rows]
        base = rows.get("dsnas", {})
        base_wall = statistics.fmean(r.total_s for r in base.values()) if base else math.nan
        base_fb = statistics.fmean(r.fb_passes for r in base.values()) if base else math.nan
        epochs = sorted({r.epochs for r in mine})
        lines.append(f"\n== {data_name}, lr {lr}: E={epochs} total epochs for every method; "
                     f"mean +- std over seeds; ratios are of the means, to dsnas")
        lines.append(f"{'method':<17}{'seeds':>6}{'top1':>16}{'MFLOPs':>9}{'train_s':>9}"
                     f"{'search_s':>9}{'fb_kpass':>9}{'fwd_kpass':>10}{'d_top1_pp':>10}"
                     f"{'wall/dsnas':>11}{'fb/dsnas':>9}")
        base_top1 = statistics.fmean(r.top1 for r in base.values()) if base else math.nan
        for method in order:
            rs = list(rows[method].values())
            top1, sd = mean_std([r.top1 for r in rs])
            lines.append(
                f"{method:<17}{len(rs):>6}{top1:10.4f}+-{sd:.3f}"
                f"{statistics.fmean(r.flops for r in rs) / 1e6:9.3f}"
                f"{statistics.fmean(r.train_s for r in rs):9.1f}"
                f"{statistics.fmean(r.search_s for r in rs):9.1f}"
                f"{statistics.fmean(r.fb_passes for r in rs) / 1e3:9.1f}"
                f"{statistics.fmean(r.fwd_passes for r in rs) / 1e3:10.1f}"
                f"{(top1 - base_top1) * 100:10.2f}"
                f"{statistics.fmean(r.total_s for r in rs) / base_wall:11.3f}"
                f"{statistics.fmean(r.fb_passes for r in rs) / base_fb:9.3f}")
        lines.append("paired differences of top-1 (points), mean [95% t-interval]:")
        for a, b in [("dsnas", "fixed-same"), ("dsnas", "spos+retrain"),
                     ("fixed-same", "fixed-random"), *[(m, "dsnas") for m in ABLATIONS]]:
            diffs = paired(rows, a, b)
            if diffs:
                mean, low, high = t_interval(diffs)
                lines.append(f"  {a} - {b}: {mean * 100:+.2f} [{low * 100:+.2f}, "
                             f"{high * 100:+.2f}] over {len(diffs)} seeds")
        forced = [r.frozen_by_deadline for r in base.values()]
        if forced:
            lines.append(f"dsnas layers frozen by the deadline (not by h): {forced} per seed")

        def mean_of(method):
            return statistics.fmean(r.top1 for r in rows[method].values())

        targets = [("dsnas >= fixed-same - 0.5 point", ("dsnas", "fixed-same"),
                    lambda: mean_of("dsnas") >= mean_of("fixed-same") - 0.005),
                   ("dsnas >= spos+retrain", ("dsnas", "spos+retrain"),
                    lambda: mean_of("dsnas") >= mean_of("spos+retrain")),
                   ("fixed-same >= fixed-random", ("fixed-same", "fixed-random"),
                    lambda: mean_of("fixed-same") >= mean_of("fixed-random"))]
        lines.append("targets (means over seeds):")
        for name, needs, check in targets:
            if all(m in rows for m in needs):
                a, b = (mean_of(m) for m in needs)
                lines.append(f"  {'PASS' if check() else 'MISS'}  {name}  "
                             f"({a:.4f} vs {b:.4f}, {(a - b) * 100:+.2f} points)")
    return "\n".join(lines)


def read_results(paths: list[str]) -> list[Outcome]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                out.append(Outcome(**json.loads(line)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="digits")
    parser.add_argument("--epochs", type=int, help="total epochs of every method "
                        "(default: the data set's laptop budget, digits 12, shapes 8)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--group", choices=("one-stage", "two-stage", "all"), default="all")
    parser.add_argument("--ablations", action="store_true", help="also the dsnas ablations")
    parser.add_argument("--methods", type=lambda v: tuple(v.split(",")),
                        help="comma-separated methods to run instead of --group/--ablations "
                        f"(of {', '.join(ONE_STAGE + TWO_STAGE + ABLATIONS)}; spos+retrain "
                        "also gives spos+finetune), to balance parallel processes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, help="weight learning rate of every method at "
                        "--batch (default: the data set's job: digits 0.1, shapes 0.05)")
    # One intra-op thread: on a small, shared CPU two threads stall on each other's load.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--mutations", type=int, default=8)
    parser.add_argument("--crossovers", type=int, default=8)
    parser.add_argument("--bn-batches", type=int, default=4)
    parser.add_argument("--selection-fraction", type=float, default=0.1)
    parser.add_argument("--freeze-by", type=lambda v: int(v) if v.isdigit() else float(v),
                        default=1 / 3,
                        help="dsnas's search deadline (a fraction of E, or an epoch)")
    parser.add_argument("--out", help="append every finished run to this JSON-lines file")
    parser.add_argument("--report", nargs="+", metavar="JSONL",
                        help="print the report of these result files (with --methods: only "
                        "those methods' rows) and exit")
    args = parser.parse_args()
    if args.report:
        results = read_results(args.report)
        if args.methods:  # only these methods' rows (e.g. leaving out an older recipe's ablations)
            results = [r for r in results if r.method in args.methods]
        print(report(results))
        return
    uri, image_size, classes, epochs = DATA[args.data]
    args.epochs = args.epochs or epochs
    args.lr = args.lr or LR[args.data]
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the two-stage methods split them in halves)")
    torch.set_num_threads(args.threads)

    space = SearchSpace.from_dict({**SearchSpace.cifar(classes, 0.5, (2, 2, 4, 2)).to_dict(),
                                   "input_size": image_size})
    tensors = load_data(uri, image_size, args.batch)
    limit = median_path_flops(space)
    print(f"{args.data} (train {len(tensors.train_labels)}, val {len(tensors.val_labels)}, "
          f"{classes} classes, image {image_size}), cifar space width 0.5 stage_repeats "
          f"[2,2,4,2] ({space.num_layers} layers x {space.num_choices}), batch {args.batch}, "
          f"lr {args.lr} (warm-up 1 epoch, cosine), threads {args.threads}")
    print(f"E={args.epochs} total epochs for every method; two-stage: {args.epochs // 2} "
          f"supernet + {args.epochs - args.epochs // 2} child, candidates scored on "
          f"{args.selection_fraction:.0%} of the training split held out. FLOPs limit "
          f"{limit / 1e6:.3f}M (median of uniform paths)", flush=True)
    methods = {"one-stage": ONE_STAGE, "two-stage": TWO_STAGE,
               "all": ONE_STAGE + TWO_STAGE}[args.group]
    methods += ABLATIONS if args.ablations else ()
    if args.methods:
        unknown = sorted(set(args.methods) - set(ONE_STAGE + TWO_STAGE + ABLATIONS))
        if unknown:
            parser.error(f"--methods: unknown {unknown}")
        methods = args.methods

    results: list[Outcome] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        def batches(selection: float = 0.0) -> TensorBatches:
            extra = {"selection_fraction": selection} if selection else {}
            return TensorBatches((tensors.train_images, tensors.train_labels),
                                 (tensors.val_images, tensors.val_labels), args.batch,
                                 seed=seed, **extra)

        runs: list[Outcome] = []
        found = None
        for method in methods:
            if method == "dsnas" or method in ABLATIONS:
                runs.append(run_dsnas(method, space, batches(), args, seed, limit))
                found = runs[-1].arch if method == "dsnas" else found
            elif method == "fixed-same":
                if found is None:
                    found = run_dsnas("dsnas", space, batches(), args, seed, limit).arch
                runs.append(run_fixed(method, space, batches(), args, seed, found))
            elif method == "fixed-random":
                runs.append(run_fixed(method, space, batches(), args, seed,
                                      random_arch(space, seed)))
            elif method in ("spos+retrain", "spos+finetune"):
                if any(r.method == method for r in runs):
                    continue  # both rows come from one run_spos
                runs += run_spos(space, batches(args.selection_fraction), args, seed, limit)
            elif method == "random+finetune":
                runs.append(run_random(space, batches(args.selection_fraction), args, seed,
                                       limit))
        for r in runs:
            results.append(r)
            print(f"  seed {seed} {r.method:<16} top1 {r.top1:.4f} MFLOPs {r.flops / 1e6:.3f} "
                  f"steps {r.train_steps} train {r.train_s:.1f}s search {r.search_s:.1f}s "
                  f"arch {','.join(map(str, r.arch))}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(asdict(r)) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
