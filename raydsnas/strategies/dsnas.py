"""DSNAS: discrete stochastic architecture search with one path per step (Hu, Xie et al., 2020).

Each step samples one candidate per layer from softmax(alpha), runs forward and backward on that
path only, and updates the path's weights and alpha from the same backward pass: every chosen
block's output is multiplied by a dummy scalar `one_l` (value 1), and

    dL/d alpha_l = (onehot(s_l) - softmax(alpha_l)) * dL/d(one_l).

Layers whose choice has settled (`p_top1 - p_top2 >= h`) are frozen for good and their other
candidates are pruned from the supernet and from both optimisers (progressive early stop).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from raydsnas.space import SearchSpace
from raydsnas.space.child import ChildNet
from raydsnas.strategies.collective import Collective, LocalCollective
from raydsnas.strategies.optim import drop_params, warmup_cosine, weight_param_groups

SAMPLING_POLICIES = ("shared", "per_rank")
CHILD_SCHEDULES = ("restart", "continue")
CHILD_STARTS = ("inherit", "rewind")
IDLE_GRADS = ("zero", "none")
CREDIT_DECAY = 0.98  # the credit diagnostic's running mean spans ~50 steps


@dataclass
class DSNASConfig:
    """Hyper-parameters of the DSNAS search (defaults: the paper's ImageNet recipe).

    `lr` is the weight learning rate for the *global* batch (the paper: 0.5 at batch 1024; the
    job scales it linearly). Epoch-valued settings are converted to steps with `steps_per_epoch`.

    Attributes:
        h: early-stop threshold: a layer freezes on its top choice once p_top1 - p_top2 >= h
            (its other candidates are pruned; the paper: 0.3).
        lr: weight SGD learning rate at `lr_reference_batch` (cosine decay after warm-up).
        momentum: weight SGD momentum.
        weight_decay: weight decay of conv and linear weights (not BN parameters or biases).
        alpha_lr: Adam learning rate of the architecture parameters alpha.
        alpha_betas: Adam betas of alpha (the paper: 0.5, 0.999).
        alpha_init_std: alpha starts at 1 + N(0, alpha_init_std) per entry.
        label_smoothing: label smoothing of the cross-entropy loss.
        epochs: search epochs (set by `search.epochs`).
        steps_per_epoch: set by the job from the data set size and the global batch.
        warmup_epochs: linear learning-rate warm-up before the cosine schedule.
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
        seed: seed of the weight initialisation, alpha's initialisation and path sampling.
        amp: bf16 autocast on GPUs that support it (ignored on CPU).
        channels_last: channels-last memory format on GPU (ignored on CPU).
    """

    h: float = 0.3
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 4e-5
    alpha_lr: float = 1e-3
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_init_std: float = 0.01
    label_smoothing: float = 0.1
    epochs: float = 240
    steps_per_epoch: int = 1
    warmup_epochs: float = 5
    pretrain_epochs: float = 0
    freeze_check_every: int | None = None
    freeze_by: float | None = 1 / 3
    child_schedule: str = "restart"
    child_start: str = "inherit"
    idle_grad: str = "zero"
    flops_budget: float | None = None
    flops_coef: float = 1.0
    sampling: str = "shared"
    seed: int = 0
    amp: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        self.alpha_betas = tuple(self.alpha_betas)
        _check(0 < self.h <= 1, "h", self.h, "a number in (0, 1]")
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.alpha_lr >= 0, "alpha_lr", self.alpha_lr, "a number >= 0")
        _check(len(self.alpha_betas) == 2 and all(0 <= b < 1 for b in self.alpha_betas),
               "alpha_betas", self.alpha_betas, "two numbers in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing,
               "a number in [0, 1)")
        _check(self.epochs > 0, "epochs", self.epochs, "a number > 0")
        _check(self.steps_per_epoch >= 1, "steps_per_epoch", self.steps_per_epoch,
               "an integer >= 1")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs,
               "a number >= 0 (longer than the run: warm-up over the whole run)")
        _check(0 <= self.pretrain_epochs <= self.epochs, "pretrain_epochs", self.pretrain_epochs,
               f"a number in [0, epochs={self.epochs}]")
        _check(self.freeze_check_every is None or self.freeze_check_every >= 1,
               "freeze_check_every", self.freeze_check_every, "null (every epoch) or an integer >= 1")
        _check(self.freeze_by is None or (self.freeze_by > 0 and self.freeze_epoch is not None
                                          and self.freeze_epoch <= self.epochs),
               "freeze_by", self.freeze_by, f"null, a whole epoch in [1, epochs={self.epochs}] "
               "or a fraction of the run in (0, 1)")
        _check(self.freeze_by is None or self.freeze_epoch > self.pretrain_epochs, "freeze_by",
               self.freeze_by, f"a deadline after pretrain_epochs = {self.pretrain_epochs} "
               "(alpha does not move before)")
        _check(self.child_schedule in CHILD_SCHEDULES, "child_schedule", self.child_schedule,
               f"one of {list(CHILD_SCHEDULES)}")
        _check(self.child_start in CHILD_STARTS, "child_start", self.child_start,
               f"one of {list(CHILD_STARTS)}")
        _check(self.child_start == "inherit" or self.child_schedule == "restart", "child_start",
               self.child_start, "'inherit' with child_schedule = 'continue' (a rewound child "
               "needs its own schedule: child_schedule = 'restart')")
        _check(self.idle_grad in IDLE_GRADS, "idle_grad", self.idle_grad,
               f"one of {list(IDLE_GRADS)}")
        _check(self.flops_budget is None or self.flops_budget > 0, "flops_budget",
               self.flops_budget, "null or a number > 0 (multiply-adds)")
        _check(self.flops_coef >= 0, "flops_coef", self.flops_coef, "a number >= 0")
        _check(self.sampling in SAMPLING_POLICIES, "sampling", self.sampling,
               f"one of {list(SAMPLING_POLICIES)}")

    @property
    def total_steps(self) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch))

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, round(self.warmup_epochs * self.steps_per_epoch))

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DSNASConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"search: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"search.{key} = {value!r} is not allowed; expected {allowed}")


def dsnas_alpha_grad(onehot: torch.Tensor, probs: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """The DSNAS architecture gradient `(onehot - p) * c` for `[L, n]` one-hots and probs, `[L]` costs.

    `c_l = dL/d(one_l)` is the loss's sensitivity to layer l's chosen block output scale; this is
    the score-function gradient of log p(Z_l) weighted by that credit (paper, Eq. 5-6).
    """
    return (onehot - probs) * cost.unsqueeze(-1)


def expected_flops(probs: torch.Tensor, table: torch.Tensor, fixed: float) -> torch.Tensor:
    """E_p[FLOPs] = fixed + sum_l sum_k p_lk F_lk (differentiable in `probs`)."""
    return fixed + (probs * table).sum()


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """A seed for step `step`'s path: the same on every rank for `rank=0` (shared policy)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class StepStats:
    """What one search step reports. Tensors stay on the device until the caller reads them."""

    step: int
    loss: torch.Tensor
    correct: torch.Tensor
    batch_size: int
    path: list[int]
    expected_flops: float
    entropy: float
    num_frozen: int
    newly_frozen: list[int] = field(default_factory=list)
    lr: float = 0.0
    searching: bool = True


class DSNAS:
    """Supernet weights, alpha, both optimisers, the schedule and the frozen set of one search.

    `step(images, labels)` is one DSNAS iteration; `state_dict()` / `load_state_dict()` hold
    everything needed to continue exactly, independent of the number of workers.
    """

    name = "dsnas"
    extra_epochs = 0  # no phase after the search: the searched weights are the result

    def __init__(self, space: SearchSpace, config: DSNASConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        self.space = space
        self.config = config or DSNASConfig()
        self.device = torch.device(device)
        self.collective = collective or LocalCollective()
        # bf16 autocast needs Ampere or newer; older GPUs train in fp32.
        self.use_amp = (self.config.amp and self.device.type == "cuda"
                        and torch.cuda.is_bf16_supported())
        self.channels_last = self.config.channels_last and self.device.type == "cuda"

        generator = torch.Generator().manual_seed(self.config.seed)
        torch.manual_seed(self.config.seed)  # weight init: identical on every rank
        self.supernet = space.supernet().to(self.device)
        if self.channels_last:
            self.supernet = self.supernet.to(memory_format=torch.channels_last)
        init = 1 + self.config.alpha_init_std * torch.randn(
            space.num_layers, space.num_choices, generator=generator)
        # One parameter per layer, so a frozen layer leaves the alpha optimiser entirely.
        self.alpha = nn.ParameterList(nn.Parameter(row) for row in init)
        self.frozen: dict[int, int] = {}
        self.forced: list[int] = []  # layers frozen by the `freeze_by` deadline, not by h
        self.search_end_step: int | None = None  # the step after which every layer was frozen
        self.step_count = 0
        # The credit diagnostic: a running mean of |c_l| per layer (on the device, read when
        # logged), with its bias-correction weight.
        self._credit = torch.zeros(2, space.num_layers, dtype=torch.float64, device=self.device)
        flops = space.flops_table()
        self._flops_table = flops.as_tensor()
        self._flops_fixed = float(flops.fixed)
        self._build_optimizers()

    # -- optimisers ----------------------------------------------------------------------------
    def _build_optimizers(self) -> None:
        cfg = self.config
        self.weight_opt = torch.optim.SGD(
            weight_param_groups(self.supernet, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
        rows = [self.alpha[l] for l in self.searchable_layers()]
        self.alpha_opt = torch.optim.Adam(rows, lr=cfg.alpha_lr, betas=cfg.alpha_betas,
                                          weight_decay=0.0) if rows else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.weight_opt, lambda step: self.lr_factor(step))

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

    def _refresh_lr(self) -> None:
        for group in self.weight_opt.param_groups:
            group["lr"] = self.config.lr * self.lr_factor(self.scheduler.last_epoch)

    # -- the distribution ----------------------------------------------------------------------
    def alpha_matrix(self) -> torch.Tensor:
        return torch.stack([a.detach() for a in self.alpha])

    def probs(self) -> torch.Tensor:
        """`[L, n]` probabilities; a frozen layer is one-hot on its choice."""
        p = F.softmax(self.alpha_matrix(), dim=-1)
        for l, k in self.frozen.items():
            p[l] = F.one_hot(torch.tensor(k), self.space.num_choices).to(p.dtype)
        return p

    def searchable_layers(self) -> list[int]:
        return [l for l in range(self.space.num_layers) if l not in self.frozen]

    @property
    def searching(self) -> bool:
        """False during uniform pre-training, where alpha does not move and nothing freezes."""
        return self.step_count >= self.config.pretrain_steps

    def entropy(self) -> float:
        """Mean entropy (nats) of the per-layer distributions; a frozen layer counts as 0."""
        return float(entropy_per_layer(self.probs()).mean())

    def expected_flops(self) -> float:
        return float(expected_flops(self.probs().double(), self._flops_table, self._flops_fixed))

    def argmax_arch(self) -> list[int]:
        arch = self.probs().argmax(-1).tolist()
        return [self.frozen.get(l, k) for l, k in enumerate(arch)]

    def sample_path(self) -> list[int]:
        """One candidate per layer: frozen layers their choice, the others Z ~ Categorical(p).

        In uniform pre-training every candidate is equally likely. The `shared` policy gives
        every rank the same path; `per_rank` gives each rank its own.
        """
        rank = self.collective.rank if self.config.sampling == "per_rank" else 0
        gen = torch.Generator().manual_seed(sampling_seed(self.config.seed, self.step_count, rank))
        p = self.probs() if self.searching else torch.ones(self.space.num_layers,
                                                           self.space.num_choices)
        path = torch.multinomial(p, 1, generator=gen).squeeze(-1).tolist()
        return [self.frozen.get(l, k) for l, k in enumerate(path)]

    # -- one step ------------------------------------------------------------------------------
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """One DSNAS iteration on one batch: sample, forward, one backward, two updates.

        On a GPU the host waits once a step, for the 20-number credit that the next path's
        sampling needs, and only after the all-reduce and the weight update were queued: the
        architecture gradient is formed on the device.
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
                self._apply_alpha_gradient(alpha_grad.cpu())  # the step's one host sync
        self.step_count += 1

        newly = []
        if searching and self.step_count % self.config.freeze_interval == 0:
            newly = self.freeze_settled_layers()
        newly += self._apply_deadline()
        return StepStats(
            step=self.step_count, loss=loss.detach(),
            correct=(logits.detach().argmax(-1) == labels).sum(), batch_size=len(labels),
            path=path, expected_flops=self.expected_flops(), entropy=self.entropy(),
            num_frozen=len(self.frozen), newly_frozen=newly,
            lr=self.weight_opt.param_groups[0]["lr"], searching=searching)

    def compute_gradients(self, images: torch.Tensor, labels: torch.Tensor,
                          path: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward on `path` only; returns (loss, logits, c) with c_l = dL/d(one_l).

        Leaves the weight gradients of the path in `.grad` (others stay None). `c_l` is 0 for
        frozen layers and during uniform pre-training (no dummy multipliers there).
        """
        self.supernet.train()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        track = self.searching
        ones = [torch.ones((), device=self.device, requires_grad=True)
                if track and l not in self.frozen else None for l in range(len(path))]
        with record_function("raydsnas.forward"):
            with self._autocast():
                logits = self.supernet(images, path, ones)
            loss = F.cross_entropy(_at_least_fp32(logits), labels,
                                   label_smoothing=self.config.label_smoothing)
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
        host = torch.stack([onehot * keep, p])  # one small copy to the device
        host = host.to(cost.device, non_blocking=True) if cost.device.type != "cpu" else host
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
        searched = torch.zeros(self.space.num_layers, dtype=torch.float64)
        searched[self.searchable_layers()] = 1.0
        searched = searched.to(self.device, non_blocking=True)
        decay = CREDIT_DECAY * searched + (1 - searched)  # frozen layers keep their last value
        self._credit.mul_(decay).add_(torch.stack([cost.detach().double().abs(), searched])
                                      * (1 - CREDIT_DECAY) * searched)

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
            p = F.softmax(self.alpha_matrix(), -1)
            forced = self.searchable_layers()
            for l in forced:
                self.freeze_layer(l, int(p[l].argmax()))
            self.forced += forced
        if self.search_end_step is None and not self.searchable_layers():
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
        for l in layers:
            self.alpha[l].grad = grad[l].to(self.alpha[l].dtype)
        self.alpha_opt.step()
        self.alpha_opt.zero_grad(set_to_none=True)

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
        """Average weight gradients and the alpha gradient over ranks (one all-reduce; `per_rank`
        first sums which candidates each rank ran, a second small one).

        A candidate that only some ranks ran contributes zeros from the others, so every
        gradient is that of the mean loss over the global batch. Returns the averaged alpha grad.
        """
        world = self.collective.world_size
        if world == 1:
            return alpha_grad
        used = F.one_hot(torch.tensor(path), self.space.num_choices).float()
        if self.config.sampling == "per_rank":
            used = used.to(self.device)
            self.collective.all_reduce_sum(used)
            used = used.cpu()
        params = list(self.supernet.stem.parameters()) + list(self.supernet.head.parameters())
        for l, k in zip(*torch.nonzero(used, as_tuple=True)):
            params += self.supernet.candidate_parameters(int(l), int(k))
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params] + [alpha_grad.to(self.device).float().reshape(-1)])
        self.collective.all_reduce_sum(flat)
        flat /= world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return flat[offset:].view_as(alpha_grad)

    # -- progressive early stop ----------------------------------------------------------------
    def freeze_settled_layers(self) -> list[int]:
        """Freeze every searchable layer with `p_top1 - p_top2 >= h`; returns those layers."""
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
        if self.alpha_opt is not None:
            drop_params(self.alpha_opt, [self.alpha[layer]])
        self.alpha[layer].requires_grad_(False)
        self.alpha[layer].grad = None

    def end_search(self, data: Any, epoch: int) -> dict[str, Any]:
        """The loop's hook after the last search epoch: nothing to do (no separate stage)."""
        return {}

    # -- results -------------------------------------------------------------------------------
    def export_child(self, arch: list[int] | None = None) -> ChildNet:
        """The argmax (or given) architecture as a standalone `ChildNet` with trained weights."""
        arch = self.argmax_arch() if arch is None else arch
        child = self.supernet.extract_child(arch)
        return child.to(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, arch: list[int] | None = None) -> torch.Tensor:
        """Logits of the argmax (or given) architecture, eval mode."""
        self.supernet.eval()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return _at_least_fp32(self.supernet(images, arch or self.argmax_arch()))

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "forced": list(self.forced),
            "search_end_step": self.search_end_step,
            "credit": self._credit.cpu().clone(),
            "space": self.space.to_dict(),
            "config": asdict(self.config),
            "step": self.step_count,
            "frozen": dict(self.frozen),
            "alpha": self.alpha_matrix().clone(),
            "supernet": self.supernet.state_dict(),
            "weight_opt": self.weight_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict() if self.alpha_opt is not None else None,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy", self.name) != self.name:
            raise ValueError(f"checkpoint was written by strategy {state.get('strategy')!r}, "
                             f"this run uses search.strategy = {self.name!r}")
        if SearchSpace.from_dict(state["space"]) != self.space:
            raise ValueError("checkpoint was written for a different search space: "
                             f"{state['space']} != {self.space.to_dict()}")
        for l, k in sorted((int(l), int(k)) for l, k in state["frozen"].items()):
            if l not in self.frozen:
                self.frozen[l] = k
                self.supernet.prune(l, k)
                self.alpha[l].requires_grad_(False)
        with torch.no_grad():
            for l, row in enumerate(state["alpha"]):
                self.alpha[l].copy_(row)
        self.supernet.load_state_dict(state["supernet"])
        self._build_optimizers()  # over the surviving parameters, in the order they were saved
        self.weight_opt.load_state_dict(state["weight_opt"])
        if self.alpha_opt is not None:
            self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        # Written before the search deadline existed: no layer was forced, the search ran on.
        self.forced = [int(l) for l in state.get("forced", [])]
        end = state.get("search_end_step")
        self.search_end_step = None if end is None else int(end)
        if state.get("credit") is not None:
            self._credit = state["credit"].to(self.device, torch.float64)
        # The learning rates are this run's (a resize may change them), at the restored step.
        self.scheduler.base_lrs = [self.config.lr] * len(self.weight_opt.param_groups)
        self._refresh_lr()
        for group in self.weight_opt.param_groups:
            group["initial_lr"] = self.config.lr
        for group in self.alpha_opt.param_groups if self.alpha_opt is not None else []:
            group["lr"] = self.config.alpha_lr

    def num_weight_parameters(self) -> int:
        return sum(p.numel() for p in self.supernet.parameters())


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def entropy_per_layer(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of `[L, n]` probabilities."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)

