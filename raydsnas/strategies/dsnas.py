"""DSNAS: discrete stochastic architecture search with one path per step (Hu, Xie et al., 2020).

Each step samples one candidate per layer from softmax(alpha), runs forward and backward on that
path only, and updates the path's weights and alpha from the same backward pass: every chosen
block's output is multiplied by a dummy scalar `one_l` (value 1), and

    dL/d alpha_l = (onehot(s_l) - softmax(alpha_l)) * dL/d(one_l).

Layers whose choice has settled (`p_top1 - p_top2 >= h`) are frozen for good and their other
candidates are pruned from the supernet and from both optimisers (progressive early stop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from raydsnas.space import SearchSpace
from raydsnas.strategies.base import (
                                      HostCopy,
                                      StepStats,
                                      SupernetTrainer,
                                      TrainingConfig,
                                      check,
                                      expected_flops,
                                      initial_alpha,
                                      sampling_seed,
                                      to_device,
)
from raydsnas.strategies.collective import Collective
from raydsnas.strategies.optim import RowAdam, drop_params, warmup_cosine

SAMPLING_POLICIES = ("shared", "per_rank")
CHILD_SCHEDULES = ("restart", "continue")
CHILD_STARTS = ("inherit", "rewind")
IDLE_GRADS = ("zero", "none")
ALPHA_UPDATES = ("stale", "exact")
CREDIT_DECAY = 0.98  # the credit diagnostic's running mean spans ~50 steps


@dataclass
class DSNASConfig(TrainingConfig):
    """Hyper-parameters of the DSNAS search (defaults: the paper's ImageNet recipe), beside the
    weight recipe of `TrainingConfig` (`lr` is for the *global* batch: the paper's 0.5 at batch
    1024; the job scales it linearly). Epoch-valued settings are converted to steps with
    `steps_per_epoch`.

    Attributes:
        h: early-stop threshold: a layer freezes on its top choice once p_top1 - p_top2 >= h
            (its other candidates are pruned; the paper: 0.3).
        alpha_lr: Adam learning rate of the architecture parameters alpha.
        alpha_betas: Adam betas of alpha (the paper: 0.5, 0.999).
        alpha_init_std: alpha starts at 1 + N(0, alpha_init_std) per entry.
        pretrain_epochs: epochs of uniform path sampling with alpha still, before the search.
        freeze_check_every: steps between early-stop checks (null: once an epoch).
        freeze_by: the search's deadline: at the end of this epoch every layer not yet frozen
            is frozen on its argmax, so the rest of the run trains the chosen child alone. A
            whole number >= 1 is an epoch; a number in (0, 1) a fraction of `epochs`, rounded to
            a whole epoch (the reference code searches 80 of 240 epochs: 1/3). Null: no
            deadline (layers freeze only by h).
        child_schedule: the weight learning rate once the search has ended (every layer
            frozen, by h or by `freeze_by`): `restart` a cosine from `lr` over the rest of
            the run (as the reference code trains its child; a search that ends inside the
            warm-up lets the warm-up finish first) or `continue` the run's cosine.
        child_start: the child's weights once the search has ended: `inherit` those the
            search trained (the paper and its reference code) or `rewind` them to their
            initialisation (the seed's, as `strategy: fixed` starts from: BN statistics reset,
            SGD momentum cleared) and train them on a new warm-up and cosine over the rest of
            the run. The search's path-mixing steps move the shared weights by more than their
            own norm early in training, which the child does not recover from at small
            budgets (README, "One stage against its alternatives"). `rewind` needs
            `child_schedule: restart`.
        idle_grad: the gradient of candidates off this step's path: `zero` (the reference
            DSNAS code: SGD momentum and weight decay still move them every step) or `none`
            (SPOS's convention: untouched until sampled again).
        flops_budget: multiply-adds; while E_p[FLOPs] exceeds it, alpha also gets the exact
            gradient of `flops_coef * E_p[FLOPs] / flops_budget` (null: no cost term).
        flops_coef: weight of that FLOPs term.
        sampling: `shared` (every worker runs the same path: W workers compute the update of
            one worker with the whole batch) or `per_rank` (each worker samples its own path:
            more samples of Z per step, as the paper's code does).
        alpha_update: when a step's alpha gradient is applied. `stale`: at the end of the next
            step, so the path after it is drawn from alpha one update behind (each gradient is
            still the unbiased estimate for the alpha its path was drawn from, applied one step
            late; at alpha_lr 1e-3 p moves < 3e-4 a step), and a GPU never waits for the step
            it has just been given; `exact`: before the next path is drawn (the paper's order;
            on a GPU the host waits for every step's end, ~6 ms a step on an H200 at batch
            256). Either way alpha is brought up to date before each early-stop check.
    """

    h: float = 0.3
    alpha_lr: float = 1e-3
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_init_std: float = 0.01
    pretrain_epochs: float = 0
    freeze_check_every: int | None = None
    freeze_by: float | None = 1 / 3
    child_schedule: str = "restart"
    child_start: str = "inherit"
    idle_grad: str = "zero"
    flops_budget: float | None = None
    flops_coef: float = 1.0
    sampling: str = "shared"
    alpha_update: str = "stale"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.h <= 1, "h", self.h, "a number in (0, 1]")
        self.check_alpha_optimizer()
        check(0 <= self.pretrain_epochs <= self.epochs, "pretrain_epochs", self.pretrain_epochs,
               f"a number in [0, epochs={self.epochs}]")
        check(self.freeze_check_every is None or self.freeze_check_every >= 1,
               "freeze_check_every", self.freeze_check_every, "null (every epoch) or an integer >= 1")
        check(self.freeze_by is None or (self.freeze_by > 0 and self.freeze_epoch is not None
                                          and self.freeze_epoch <= self.epochs),
               "freeze_by", self.freeze_by, f"null, a whole epoch in [1, epochs={self.epochs}] "
               "or a fraction of the run in (0, 1)")
        check(self.freeze_by is None or self.freeze_epoch > self.pretrain_epochs, "freeze_by",
               self.freeze_by, f"a deadline after pretrain_epochs = {self.pretrain_epochs} "
               "(alpha does not move before)")
        check(self.child_schedule in CHILD_SCHEDULES, "child_schedule", self.child_schedule,
               f"one of {list(CHILD_SCHEDULES)}")
        check(self.child_start in CHILD_STARTS, "child_start", self.child_start,
               f"one of {list(CHILD_STARTS)}")
        check(self.child_start == "inherit" or self.child_schedule == "restart", "child_start",
               self.child_start, "'inherit' with child_schedule = 'continue' (a rewound child "
               "needs its own schedule: child_schedule = 'restart')")
        check(self.idle_grad in IDLE_GRADS, "idle_grad", self.idle_grad,
               f"one of {list(IDLE_GRADS)}")
        check(self.flops_budget is None or self.flops_budget > 0, "flops_budget",
               self.flops_budget, "null or a number > 0 (multiply-adds)")
        check(self.flops_coef >= 0, "flops_coef", self.flops_coef, "a number >= 0")
        check(self.sampling in SAMPLING_POLICIES, "sampling", self.sampling,
               f"one of {list(SAMPLING_POLICIES)}")
        check(self.alpha_update in ALPHA_UPDATES, "alpha_update", self.alpha_update,
              f"one of {list(ALPHA_UPDATES)}")

    @property
    def same_path_on_every_rank(self) -> bool:
        return self.sampling == "shared"

    @property
    def pretrain_steps(self) -> int:
        return round(self.pretrain_epochs * self.steps_per_epoch)

    @property
    def freeze_interval(self) -> int:
        return self.freeze_check_every or self.steps_per_epoch

    @property
    def freeze_epoch(self) -> int | None:
        """`freeze_by` as a whole epoch (a fraction of `epochs` is rounded, at least 1);
        None without a deadline."""
        if self.freeze_by is None:
            return None
        if self.freeze_by < 1:
            return max(1, round(self.freeze_by * self.epochs))
        return int(self.freeze_by) if float(self.freeze_by).is_integer() else None

    @property
    def freeze_step(self) -> int | None:
        """The step at the end of which every layer is frozen (None: no deadline)."""
        epoch = self.freeze_epoch
        return None if epoch is None else epoch * self.steps_per_epoch


def dsnas_alpha_grad(onehot: torch.Tensor, probs: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """The DSNAS architecture gradient `(onehot - p) * c` for `[L, n]` one-hots and probs, `[L]` costs.

    `c_l = dL/d(one_l)` is the loss's sensitivity to layer l's chosen block output scale; this is
    the score-function gradient of log p(Z_l) weighted by that credit (paper, Eq. 5-6).
    """
    return (onehot - probs) * cost.unsqueeze(-1)


class DSNAS(SupernetTrainer):
    """Supernet weights, alpha, both optimisers, the schedule and the frozen set of one search.

    `step(images, labels)` is one DSNAS iteration; `state_dict()` / `load_state_dict()` hold
    everything needed to continue exactly, independent of the number of workers.
    """

    name = "dsnas"
    extra_epochs = 0  # no phase after the search: the searched weights are the result

    def __init__(self, space: SearchSpace, config: DSNASConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        config = config or DSNASConfig()
        # On the host: the sampler reads it every step. Each row is its own Adam parameter
        # (`RowAdam`), so a frozen layer's row leaves the optimiser.
        self.alpha = initial_alpha(space, config)
        # The last step's averaged alpha gradient on its way to the host, applied at the end
        # of the next step (`alpha_update: stale`).
        self._pending: HostCopy | None = None
        self.forced: list[int] = []  # layers frozen by the `freeze_by` deadline, not by h
        self.search_end_step: int | None = None  # the step after which every layer was frozen
        super().__init__(space, config, device=device, collective=collective)
        # The credit diagnostic: a running mean of |c_l| per layer (on the device, read when
        # logged), with its bias-correction weight.
        self._credit = torch.zeros(2, space.num_layers, dtype=torch.float64, device=self.device)
        self._searched_mask: tuple[tuple[int, ...], torch.Tensor] | None = None

    # -- optimisers ----------------------------------------------------------------------------
    def _build_optimizers(self) -> None:
        """SGD over the surviving weights and Adam over the rows of the searched layers."""
        cfg = self.config
        self._build_weight_optimizer(cfg.total_steps, cfg.warmup_steps)
        self.alpha_opt = RowAdam(self.alpha, cfg.alpha_lr, cfg.alpha_betas)
        for layer in self.frozen:
            self.alpha_opt.drop(layer)

    def _rebuild_optimizers(self, state: dict[str, Any]) -> None:
        self._build_optimizers()  # over the surviving parameters, in the order they were saved

    def lr_factor(self, step: int) -> float:
        """The weight learning rate at `step` over `lr`: warm-up and cosine over the run, and
        with `child_schedule: restart` a new cosine from the step the search ended (after the
        warm-up: the jump from the warm-up's small rate to `lr` it replaced cost the inherited
        child 3.3 points on the built-in shapes over 5 seeds at lr 0.1, up to 6.6 in one;
        benchmarks/results/end_to_end_shapes_cpu.txt)."""
        cfg = self.config
        run = warmup_cosine(cfg.total_steps, cfg.warmup_steps)
        start = self.child_schedule_start
        if start is None or step < start:
            return run(step)
        warmup = cfg.warmup_steps if cfg.child_start == "rewind" else 0
        return warmup_cosine(cfg.total_steps - start, warmup)(step - start)

    @property
    def child_schedule_start(self) -> int | None:
        """The step from which `restart` runs the child's new cosine: where the search ended,
        but never inside the warm-up (a search that ends there lets the warm-up finish, and
        the cosine that follows is the run's own; a rewound child starts its own warm-up where
        the search ended). None: no restart (yet, or `continue`)."""
        if self.search_end_step is None or self.config.child_schedule == "continue":
            return None
        if self.config.child_start == "rewind":
            return self.search_end_step
        return max(self.search_end_step, self.config.warmup_steps)

    # -- the distribution ----------------------------------------------------------------------
    def alpha_matrix(self) -> torch.Tensor:
        return self.alpha.clone()

    def probs(self) -> torch.Tensor:
        """`[L, n]` probabilities; a frozen layer is one-hot on its choice."""
        p = F.softmax(self.alpha, dim=-1)
        for l, k in self.frozen.items():
            p[l] = F.one_hot(torch.tensor(k), self.space.num_choices).to(p.dtype)
        return p

    def searchable_layers(self) -> list[int]:
        return [l for l in range(self.space.num_layers) if l not in self.frozen]

    @property
    def searching(self) -> bool:
        """False during uniform pre-training, where alpha does not move and nothing freezes."""
        return self.step_count >= self.config.pretrain_steps

    def sample_path(self, rank: int | None = None) -> list[int]:
        """One candidate per layer: frozen layers their choice, the others Z ~ Categorical(p).

        In uniform pre-training every candidate is equally likely. The `shared` policy gives
        every rank the same path; `per_rank` gives each rank its own, a function of (seed,
        step, rank) and alpha, which every rank holds: any rank can tell any other's path
        (`rank`; default this one's).
        """
        if self.config.sampling != "per_rank":
            rank = 0
        elif rank is None:
            rank = self.collective.rank
        gen = torch.Generator().manual_seed(sampling_seed(self.config.seed, self.step_count, rank))
        p = self.probs() if self.searching else torch.ones(self.space.num_layers,
                                                           self.space.num_choices)
        path = torch.multinomial(p, 1, generator=gen).squeeze(-1).tolist()
        return [self.frozen.get(l, k) for l, k in enumerate(path)]

    # -- one step ------------------------------------------------------------------------------
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """One DSNAS iteration on one batch: sample, forward, one backward, two updates.

        With `alpha_update: stale` the host never waits for the step it has just queued: the
        architecture gradient is formed and averaged on the device and copied to pinned host
        memory behind the weight update; the one from the step before updates alpha, a wait
        (an event) for that earlier step's end at most, while this step's work stays queued:
        the host runs at most one step ahead. `exact` waits for this step's own end (the
        device then idles while the host prepares the next step).
        """
        searching = self.searching
        path = self.sample_path()
        loss, logits, cost = self.compute_gradients(images, labels, path)
        alpha_grad = self.alpha_gradient(path, cost)
        if searching:
            self._track_credit(cost)
        alpha_grad = self._synchronise(path, alpha_grad)
        if self.config.idle_grad == "zero":
            self._zero_idle_gradients()
        with record_function("raydsnas.optimizer"):
            self.weight_opt.step()
            self.scheduler.step()
            if searching:
                arriving = HostCopy(alpha_grad)
                if self.config.alpha_update == "exact":
                    self._apply_alpha_gradient(arriving.wait())  # the step's one host sync
                else:
                    self.apply_pending_alpha_gradient()
                    self._pending = arriving
        self.step_count += 1

        newly = []
        if searching and self.step_count % self.config.freeze_interval == 0:
            newly = self.freeze_settled_layers()
        newly += self._apply_deadline()
        return self._stats(loss, logits, labels, path, searching, newly_frozen=newly)

    def apply_pending_alpha_gradient(self) -> None:
        """Apply the alpha gradient still on its way (`alpha_update: stale`), if any: alpha as
        `exact` would have it after the last step."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._apply_alpha_gradient(pending.wait())

    def compute_gradients(self, images: torch.Tensor, labels: torch.Tensor,
                          path: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward on `path` only; returns (loss, logits, c) with c_l = dL/d(one_l).

        Leaves the weight gradients of the path in `.grad` (others stay None). `c_l` is 0 for
        frozen layers and during uniform pre-training (no dummy multipliers there).
        """
        self._train_mode()
        images = self._prepare(images)
        track = self.searching
        # One fill for all the dummy 1s; each is its own leaf, whose .grad is c_l.
        filled = torch.ones(len(path), device=self.device).unbind() if track else ()
        ones = [filled[l].detach().requires_grad_(True)
                if track and l not in self.frozen else None for l in range(len(path))]
        with record_function("raydsnas.forward"):
            with self._autocast():
                logits = self.supernet(images, path, ones)
            loss = self._loss(logits, labels)
        # Idle candidates keep their zero gradients with `idle_grad: zero` (see _zero_idle_gradients).
        self.weight_opt.zero_grad(set_to_none=self.config.idle_grad == "none")
        with record_function("raydsnas.backward"):
            loss.backward()
        cost = torch.stack([one.grad if one is not None and one.grad is not None
                            else torch.zeros((), device=self.device) for one in ones])
        return loss, logits, cost

    def alpha_gradient(self, path: list[int], cost: torch.Tensor) -> torch.Tensor:
        """`[L, n]` gradient for alpha (frozen rows zero), on `cost`'s device (no host sync)."""
        keep = torch.ones(self.space.num_layers, 1)
        for l in self.frozen:
            keep[l] = 0
        onehot = F.one_hot(torch.tensor(path), self.space.num_choices).float()
        p = F.softmax(self.alpha_matrix(), -1) * keep
        host = to_device(torch.stack([onehot * keep, p]), cost.device)  # one small copy
        return dsnas_alpha_grad(host[0], host[1], cost.detach().float())

    def _zero_idle_gradients(self) -> None:
        """Give every weight off this step's path a zero gradient (once; `zero_grad` keeps it
        zero after), so SGD's momentum and weight decay move it as the reference code does."""
        for group in self.weight_opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _track_credit(self, cost: torch.Tensor) -> None:
        """Fold |c_l| of the searched layers into the running mean (device-side, no sync)."""
        searched = self._searched_on_device()
        decay = CREDIT_DECAY * searched + (1 - searched)  # frozen layers keep their last value
        self._credit.mul_(decay).add_(torch.stack([cost.detach().double().abs(), searched])
                                      * (1 - CREDIT_DECAY) * searched)

    def _searched_on_device(self) -> torch.Tensor:
        """`[L]` float64 on the device: 1 for the searched layers (copied when they change)."""
        layers = tuple(self.searchable_layers())
        if self._searched_mask is None or self._searched_mask[0] != layers:
            searched = torch.zeros(self.space.num_layers, dtype=torch.float64)
            searched[list(layers)] = 1.0
            self._searched_mask = (layers, to_device(searched, self.device))
        return self._searched_mask[1]

    def credit_magnitude(self) -> list[float | None]:
        """Per layer, the running mean of |dL/d(one_l)| over the steps it was searched (~the
        last 50): how strongly the loss steers that layer's choice; None if never searched.
        A layer whose credit is orders of magnitude below the others is steered by noise."""
        mean, weight = self._credit.cpu()
        return [float(m / w) if w > 0 else None for m, w in zip(mean, weight)]

    def _apply_deadline(self) -> list[int]:
        """At `freeze_by`, freeze every layer still searched on its argmax; once no layer is
        searched, the search has ended (and `restart` begins the child's cosine). Returns the
        layers frozen by the deadline."""
        deadline = self.config.freeze_step
        forced = []
        if deadline is not None and self.step_count >= deadline and self.searchable_layers():
            self.apply_pending_alpha_gradient()
            p = F.softmax(self.alpha_matrix(), -1)
            forced = self.searchable_layers()
            for l in forced:
                self.freeze_layer(l, int(p[l].argmax()))
            self.forced += forced
        if self.search_end_step is None and not self.searchable_layers():
            self._pending = None
            self.search_end_step = self.step_count
            if self.config.child_start == "rewind":
                self.rewind_child()
            self._refresh_lr()
        return forced

    def rewind_child(self) -> None:
        """The surviving weights back to their initialisation: the supernet the seed built
        (rebuilt, outside the global random stream), BN statistics included; SGD momentum
        cleared. The pruned supernet is then `fixed`'s network at its first step."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            initial = self.space.supernet().state_dict()
        with torch.no_grad():
            for name, tensor in self.supernet.state_dict().items():
                tensor.copy_(initial[name])
        self.weight_opt.state.clear()
        self._init_momentum()

    @property
    def search_ended(self) -> bool:
        return self.search_end_step is not None

    def _apply_alpha_gradient(self, alpha_grad: torch.Tensor) -> None:
        cfg = self.config
        layers = self.searchable_layers()
        if not layers:
            return
        grad = alpha_grad.clone()
        if cfg.flops_budget is not None and cfg.flops_coef > 0:
            grad += self.flops_gradient()
        self.alpha_opt.step(grad)  # the searched rows only

    def flops_gradient(self) -> torch.Tensor:
        """`[L, n]` gradient of `flops_coef * E[FLOPs] / flops_budget` w.r.t. alpha, applied
        only while E[FLOPs] exceeds the budget (exact: autograd through the softmax)."""
        cfg = self.config
        alpha = self.alpha_matrix().double().requires_grad_(True)
        p = F.softmax(alpha, -1)
        searchable = torch.ones(self.space.num_layers, 1, dtype=torch.float64)
        fixed = self._flops_fixed
        for l, k in self.frozen.items():
            searchable[l] = 0
            fixed += float(self._flops_table[l, k])
        total = expected_flops(p * searchable, self._flops_table, fixed)
        if cfg.flops_budget is None or float(total.detach()) <= cfg.flops_budget:
            return torch.zeros(self.space.num_layers, self.space.num_choices)
        (cfg.flops_coef * total / cfg.flops_budget).backward()
        return alpha.grad.float()

    def _synchronise(self, path: list[int], alpha_grad: torch.Tensor) -> torch.Tensor:
        """Average weight gradients and the alpha gradient over ranks, in one all-reduce.

        A candidate that only some ranks ran contributes zeros from the others, so every
        gradient is that of the mean loss over the global batch. Returns the averaged alpha grad.
        """
        if self.collective.world_size == 1:
            return alpha_grad
        used = {(l, k) for l, k in enumerate(path)}
        if self.config.sampling == "per_rank":
            # Every rank draws every rank's path from the same (seed, step, rank) and alpha:
            # the union of candidates run is known without asking.
            for rank in range(self.collective.world_size):
                used.update(enumerate(self.sample_path(rank)))
        params = list(self.supernet.stem.parameters()) + list(self.supernet.head.parameters())
        for l, k in sorted(used):
            params += self.supernet.candidate_parameters(l, k)
        # On the device: the host's one wait comes after the weight update is queued.
        return self.average_gradients(params, alpha_grad, extra_on_device=True)

    # -- progressive early stop ----------------------------------------------------------------
    def freeze_settled_layers(self) -> list[int]:
        """Freeze every searchable layer with `p_top1 - p_top2 >= h`; returns those layers.
        Alpha is brought up to date first (`alpha_update: stale`)."""
        self.apply_pending_alpha_gradient()
        p = F.softmax(self.alpha_matrix(), -1)
        top2 = p.topk(2, dim=-1).values if self.space.num_choices > 1 else None
        settled = [l for l in self.searchable_layers()
                   if top2 is None or float(top2[l, 0] - top2[l, 1]) >= self.config.h]
        for l in settled:
            self.freeze_layer(l, int(p[l].argmax()))
        return settled

    def freeze_layer(self, layer: int, choice: int) -> None:
        """Fix `layer` to `choice` for good: prune its other candidates and its alpha row
        from the supernet and from both optimisers."""
        self.frozen[layer] = choice
        removed = self.supernet.prune(layer, choice)
        drop_params(self.weight_opt, removed)
        self.alpha_opt.drop(layer)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "forced": list(self.forced),
            "search_end_step": self.search_end_step,
            "credit": self._credit.cpu().clone(),
            "alpha_opt": self.alpha_opt.state_dict(),
            # `alpha_update: stale`: the last step's gradient, applied at the end of the next.
            "alpha_pending": self._pending.wait().clone() if self._pending is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The frozen layers pruned and alpha restored first (they shape the supernet and the
        optimisers), then the base's weights, optimisers and schedule."""
        self.check_checkpoint(state)
        for l, k in sorted((int(l), int(k)) for l, k in state["frozen"].items()):
            if l not in self.frozen:
                self.frozen[l] = k
                self.supernet.prune(l, k)
        self.alpha.copy_(state["alpha"])
        # Written before the search deadline existed: no layer was forced, the search ran on.
        self.forced = [int(l) for l in state.get("forced", [])]
        end = state.get("search_end_step")
        self.search_end_step = None if end is None else int(end)
        super().load_state_dict(state)
        if state.get("alpha_opt") is not None:  # None: no layer was searched any more
            self.alpha_opt.load_state_dict(state["alpha_opt"])
        pending = state.get("alpha_pending")
        self._pending = HostCopy(pending) if pending is not None else None
        if state.get("credit") is not None:
            self._credit = state["credit"].to(self.device, torch.float64)
