"""SPOS (Guo et al., "Single Path One-Shot NAS with Uniform Sampling", ECCV 2020) and random
search with shared weights (Li & Talwalkar, 2019), on the same space and loop as DSNAS.

Both train the supernet for the search epochs with uniform single-path sampling: each step one
candidate per layer, uniformly at random (the same path on every rank, seeded by step), and
with `flops_min`/`flops_max` resampled until the path's FLOPs lie in that band. After the last
search epoch (`end_search`) they pick one architecture under `flops_limit`:

- `spos`: the evolutionary search of SPOS. A random initial population of `population` (50)
  architectures under the limit; each of `iterations` (20) rounds evaluates the new ones, keeps
  the `top_k` (10) best seen so far, and makes the next population from `mutations` (25)
  mutants (a top-k parent, each layer resampled with probability `mutation_prob` 0.1),
  `crossovers` (25) children (each layer from one of two top-k parents) and random fill.
  Children over the FLOPs limit or seen before are redrawn (up to 10x as many tries).
- `random`: `num_samples` (100) uniform architectures under the limit.

Every candidate is scored the same way: BatchNorm statistics recalibrated on `bn_batches`
training batches through that path (as SPOS does before each evaluation; averaged over ranks),
then top-1 on the selection split (each rank its shard, sums all-reduced by the loop's
`Batches.evaluate`, so every rank sees the same score); ties go to the lower selection loss.
The search's random numbers are seeded by `seed`, so every rank makes the same decisions.

The selection split is the share `selection_fraction` (0.1) of the training split that the
data holds out by the hash of each sample's key (`raydsnas.data.selection`), for the whole run:
it is never trained on, in the supernet phase, the final phase or BN recalibration. So the
validation split, on which the final child is reported, plays no part in choosing it (the
SPOS paper likewise held 50k ImageNet training images out for its search). The search never
reads the validation split.

Then, optionally, `final_phase`: `finetune` keeps the supernet weights of the chosen child,
`retrain` re-initialises them; either trains the child alone for `final_epochs` more epochs
(a fresh warm-up + cosine schedule from `lr`). The supernet is pruned to the child first. The
loop counts those epochs in its schedule, reports and worker-hours.

Checkpoints: the phase, the chosen architecture and the search log are in `state_dict`. The
search runs between the last search epoch and that epoch's checkpoint, so a run interrupted
during the search resumes from the previous checkpoint and runs the last epoch and the search
again (deterministic for a seed, up to floating-point reduction order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from raydsnas.evaluation import recalibrate_bn
from raydsnas.space import SearchSpace
from raydsnas.strategies.base import (
    SearchData,
    StepStats,
    SupernetTrainer,
    TrainingConfig,
    check,
    sample_in_band,
    sampling_seed,
)
from raydsnas.strategies.collective import Collective, average_bn_buffers

FINAL_PHASES = ("none", "finetune", "retrain")


@dataclass
class OneShotConfig(TrainingConfig):
    """Supernet training with uniform sampling, a search under a FLOPs limit, an optional
    final phase. FLOPs are multiply-adds as in `SearchSpace.flops`.

    Attributes:
        flops_min: supernet training resamples paths below this many FLOPs (null: no floor).
        flops_max: ... and above this many (null: no ceiling).
        flops_limit: the search considers only architectures within this many FLOPs.
        bn_batches: training batches that recalibrate BN before each candidate is scored.
        final_phase: after the search: `none` (export with the supernet's weights),
            `finetune` (train the chosen child from the supernet's weights) or `retrain`
            (train it from a fresh initialisation).
        final_epochs: epochs of the final phase (counted in the schedule and the compute).
        final_warmup_epochs: learning-rate warm-up of the final phase.
        selection_fraction: share of the training split held out for the whole run (never
            trained on, by a stable hash of each sample's key) to score the candidates on;
            the validation split stays unseen until the final child is scored. In (0, 0.5].
    """

    flops_min: float | None = None
    flops_max: float | None = None
    flops_limit: float | None = None
    bn_batches: int = 8
    final_phase: str = "none"
    final_epochs: int = 0
    final_warmup_epochs: float = 0
    selection_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.selection_fraction <= 0.5, "selection_fraction",
               self.selection_fraction, "a number in (0, 0.5]")
        for key in ("flops_min", "flops_max", "flops_limit"):
            value = getattr(self, key)
            check(value is None or value > 0, key, value, "null or a number > 0 (multiply-adds)")
        check(self.flops_min is None or self.flops_max is None or self.flops_min <= self.flops_max,
               "flops_min", self.flops_min, f"a number <= flops_max ({self.flops_max})")
        check(self.bn_batches >= 0, "bn_batches", self.bn_batches, "an integer >= 0")
        check(self.final_phase in FINAL_PHASES, "final_phase", self.final_phase,
               f"one of {list(FINAL_PHASES)}")
        check(self.final_epochs >= (1 if self.final_phase != "none" else 0)
               and (self.final_phase != "none" or self.final_epochs == 0), "final_epochs",
               self.final_epochs, "an integer >= 1 with final_phase finetune/retrain, "
               "0 with final_phase none")
        check(self.final_warmup_epochs >= 0, "final_warmup_epochs", self.final_warmup_epochs,
               "a number >= 0")

    @property
    def selection_share(self) -> float:
        return self.selection_fraction

    @property
    def final_steps(self) -> int:
        return max(1, round(self.final_epochs * self.steps_per_epoch))

    @property
    def final_warmup_steps(self) -> int:
        return min(self.final_steps, round(self.final_warmup_epochs * self.steps_per_epoch))


@dataclass
class SPOSConfig(OneShotConfig):
    """SPOS's evolutionary search (defaults: the SPOS paper's).

    Attributes:
        population: candidates per generation.
        iterations: generations.
        top_k: the best candidates kept as parents.
        mutations: children by mutation per generation.
        mutation_prob: chance that a mutation redraws each layer's choice.
        crossovers: children by crossover of two parents per generation.
    """

    population: int = 50
    iterations: int = 20
    top_k: int = 10
    mutations: int = 25
    mutation_prob: float = 0.1
    crossovers: int = 25

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("population", "iterations", "top_k"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        for key in ("mutations", "crossovers"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        check(0 <= self.mutation_prob <= 1, "mutation_prob", self.mutation_prob,
               "a number in [0, 1]")


@dataclass
class RandomSearchConfig(OneShotConfig):
    """Random search with the shared supernet weights.

    Attributes:
        num_samples: random architectures (under `flops_limit`) scored.
    """

    num_samples: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")


@dataclass
class SearchResult:
    """The chosen architecture, its score and every (arch, score) evaluated, in order."""

    arch: list[int]
    score: Any
    evaluated: list[tuple[list[int], Any]] = field(default_factory=list)


Fitness = Callable[[list[int]], Any]  # higher is better; any comparable value


class _Candidates:
    """Draws unseen architectures under the FLOPs limit from one seeded generator."""

    def __init__(self, space: SearchSpace, flops_limit: float | None, seed: int):
        self.space, self.limit = space, flops_limit
        self.rng = np.random.default_rng([seed, 7919])
        self.seen: set[tuple[int, ...]] = set()
        table = space.flops_table()
        if flops_limit is not None and table.total(table.smallest()) > flops_limit:
            raise ValueError(f"search.flops_limit = {flops_limit!r} is not allowed; expected a "
                             f"number >= {table.total(table.smallest())}, the smallest "
                             "architecture's FLOPs in this space")

    def admit(self, arch: Sequence[int]) -> list[int] | None:
        key = tuple(int(k) for k in arch)
        if key in self.seen or (self.limit is not None and self.space.flops(key) > self.limit):
            return None
        self.seen.add(key)
        return list(key)

    def draw(self, count: int, make: Callable[[], Sequence[int]]) -> list[list[int]]:
        out: list[list[int]] = []
        for _ in range(10 * count):
            if len(out) == count:
                break
            arch = self.admit(make())
            if arch is not None:
                out.append(arch)
        return out

    def uniform(self) -> list[int]:
        return self.rng.integers(0, self.space.num_choices, self.space.num_layers).tolist()


def random_search(space: SearchSpace, fitness: Fitness, *, num_samples: int,
                  flops_limit: float | None = None, seed: int = 0) -> SearchResult:
    """Score `num_samples` distinct uniform architectures under `flops_limit`; the best wins."""
    pool = _Candidates(space, flops_limit, seed)
    evaluated = [(arch, fitness(arch)) for arch in pool.draw(num_samples, pool.uniform)]
    best = max(evaluated, key=lambda item: item[1])  # first of equals: the earliest drawn
    return SearchResult(best[0], best[1], evaluated)


def evolution_search(space: SearchSpace, fitness: Fitness, *, flops_limit: float | None = None,
                     population: int = 50, iterations: int = 20, top_k: int = 10,
                     mutations: int = 25, mutation_prob: float = 0.1, crossovers: int = 25,
                     seed: int = 0) -> SearchResult:
    """SPOS's evolutionary search: every evaluated architecture is under `flops_limit` and
    scored once; returns the best seen. Deterministic for a seed and a deterministic fitness."""
    pool = _Candidates(space, flops_limit, seed)
    rng = pool.rng
    scores: dict[tuple[int, ...], Any] = {}
    evaluated: list[tuple[list[int], Any]] = []
    candidates = pool.draw(population, pool.uniform)
    top: list[list[int]] = []
    for _ in range(iterations):
        for arch in candidates:
            score = fitness(arch)
            scores[tuple(arch)] = score
            evaluated.append((arch, score))
        # Stable sort: among equal scores the earlier-evaluated one ranks first.
        top = [a for a, _ in sorted(((list(k), s) for k, s in scores.items()),
                                    key=lambda item: item[1], reverse=True)][:top_k]

        candidates = (pool.draw(mutations, partial(_mutate, rng, top, space, mutation_prob))
                      + pool.draw(crossovers, partial(_crossover, rng, top, space)))
        candidates += pool.draw(max(0, population - len(candidates)), pool.uniform)
    best = top[0]
    return SearchResult(best, scores[tuple(best)], evaluated)


def _mutate(rng: np.random.Generator, parents: list[list[int]], space: SearchSpace,
            prob: float) -> list[int]:
    """A random parent with each layer resampled uniformly with probability `prob`."""
    parent = parents[rng.integers(len(parents))]
    flip = rng.random(space.num_layers) < prob
    fresh = rng.integers(0, space.num_choices, space.num_layers)
    return [int(f) if m else int(p) for p, f, m in zip(parent, fresh, flip)]


def _crossover(rng: np.random.Generator, parents: list[list[int]],
               space: SearchSpace) -> list[int]:
    """Each layer from one of two random parents, with equal probability."""
    a, b = parents[rng.integers(len(parents))], parents[rng.integers(len(parents))]
    pick = rng.random(space.num_layers) < 0.5
    return [int(x) if m else int(y) for x, y, m in zip(a, b, pick)]


class SPOS(SupernetTrainer):
    """Uniform single-path supernet training, then the evolutionary search (and a final phase)."""

    name = "spos"

    def __init__(self, space: SearchSpace, config: OneShotConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        super().__init__(space, config or SPOSConfig(), device=device, collective=collective)
        cfg = self.config
        table = space.flops_table()
        low, high = table.total(table.smallest()), table.total(table.largest())
        check(cfg.flops_min is None or cfg.flops_min <= high, "flops_min", cfg.flops_min,
                     f"a number <= {high}, the largest architecture's FLOPs in this space")
        check(cfg.flops_max is None or cfg.flops_max >= low, "flops_max", cfg.flops_max,
                     f"a number >= {low}, the smallest architecture's FLOPs in this space")
        _Candidates(space, cfg.flops_limit, cfg.seed)  # checks the limit is reachable
        self.phase = "supernet"  # -> "searched" (no final phase) or "final"
        self.chosen: list[int] | None = None
        self.search_log: list[dict[str, Any]] = []

    @property
    def extra_epochs(self) -> int:
        return self.config.final_epochs if self.config.final_phase != "none" else 0

    # -- the architecture "distribution" -------------------------------------------------------
    def probs(self) -> torch.Tensor:
        """Uniform while training the supernet; one-hot on the chosen architecture after."""
        if self.chosen is None:
            return super().probs()
        return nn.functional.one_hot(torch.tensor(self.chosen), self.space.num_choices).float()

    def argmax_arch(self) -> list[int]:
        """The chosen architecture; before the search, candidate 0 everywhere (no preference)."""
        return list(self.chosen) if self.chosen is not None else [0] * self.space.num_layers

    def sample_path(self) -> list[int]:
        if self.chosen is not None:
            return list(self.chosen)
        gen = torch.Generator().manual_seed(sampling_seed(self.config.seed, self.step_count, 0))
        return sample_in_band(self.space, gen, self.config.flops_min, self.config.flops_max)

    # -- one step ------------------------------------------------------------------------------
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """One single-path step: a uniform path in the FLOPs band (or the chosen child in the
        final phase), forward, backward, gradients averaged over ranks, SGD."""
        path = self.sample_path()
        loss, logits = self._path_step(images, labels, path)
        self.step_count += 1
        return self._stats(loss, logits, labels, path, searching=self.phase == "supernet")

    # -- the search ----------------------------------------------------------------------------
    def evaluate_arch(self, arch: list[int], data: SearchData,
                      bn_images: Sequence[torch.Tensor]) -> dict[str, float]:
        """Selection-split metrics (`select_top1`, ...) of `arch` with the shared weights, BN
        recalibrated on `bn_images` through that path (and averaged over ranks)."""
        if bn_images:
            with self._autocast():
                recalibrate_bn(self.supernet, bn_images,
                               forward=lambda x: self.supernet(self._prepare(x), arch))
            average_bn_buffers(self.supernet, self.collective)
        return data.evaluate(lambda x: self.predict(x, arch), self.collective, split="select")

    def search_architecture(self, fitness: Fitness) -> SearchResult:
        cfg = self.config
        return evolution_search(
            self.space, fitness, flops_limit=cfg.flops_limit, population=cfg.population,
            iterations=cfg.iterations, top_k=cfg.top_k, mutations=cfg.mutations,
            mutation_prob=cfg.mutation_prob, crossovers=cfg.crossovers, seed=cfg.seed)

    def end_search(self, data: SearchData, epoch: int) -> dict[str, Any]:
        """Search the trained supernet for the best architecture under the FLOPs limit (scored
        on the selection split), leave the supernet's BN statistics on it, and start the final
        phase if one is configured. The metrics name the split that scored the candidates."""
        if self.chosen is not None:  # already searched (resumed after the search)
            return {}
        cfg = self.config
        bn_images = [images for images, _ in data.train(epoch, limit=cfg.bn_batches)] \
            if cfg.bn_batches else []

        def fitness(arch: list[int]) -> tuple[float, float]:
            metrics = self.evaluate_arch(arch, data, bn_images)
            self.search_log.append({"arch": arch, "select_top1": metrics["select_top1"],
                                    "select_loss": metrics["select_loss"]})
            return metrics["select_top1"], -metrics["select_loss"]

        result = self.search_architecture(fitness)
        self.chosen = list(result.arch)
        self.frozen = dict(enumerate(self.chosen))
        chosen = self.evaluate_arch(self.chosen, data, bn_images)  # BN statistics of the path
        self.phase = "searched"
        if cfg.final_phase != "none":
            self._start_final_phase(reinitialise=cfg.final_phase == "retrain")
        return {"search_evaluated": len(self.search_log), "search_split": "select",
                "search_select_top1": float(result.score[0]),
                "search_select_loss": -float(result.score[1]),
                "search_select_samples": int(chosen["select_samples"]),
                "search_flops": self.space.flops(self.chosen)}

    def _start_final_phase(self, reinitialise: bool) -> None:
        """Prune the supernet to the chosen child (re-initialised for `retrain`) and start a
        fresh weight schedule over `final_epochs`."""
        for l, k in enumerate(self.chosen):
            self.supernet.prune(l, k)
        if reinitialise:
            torch.manual_seed(self.config.seed + 1)  # identical on every rank
            for module in self.supernet.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.phase = "final"
        self._build_weight_optimizer(self.config.final_steps, self.config.final_warmup_steps)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "phase": self.phase, "chosen": self.chosen,
                "search_log": list(self.search_log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase, self.search_log = state["phase"], list(state["search_log"])
        self.chosen = list(state["chosen"]) if state["chosen"] is not None else None
        if self.chosen is not None:
            self.frozen = dict(enumerate(self.chosen))
        if self.phase == "final":
            for l, k in enumerate(self.chosen):
                self.supernet.prune(l, k)
        super().load_state_dict(state)


class RandomSearch(SPOS):
    """SPOS's supernet training, then `num_samples` random architectures under the limit."""

    name = "random"

    def __init__(self, space: SearchSpace, config: RandomSearchConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        super().__init__(space, config or RandomSearchConfig(), device=device,
                         collective=collective)

    def search_architecture(self, fitness: Fitness) -> SearchResult:
        cfg = self.config
        return random_search(self.space, fitness, num_samples=cfg.num_samples,
                             flops_limit=cfg.flops_limit, seed=cfg.seed)
