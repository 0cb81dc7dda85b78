"""The floor every search strategy stands on: the loop's interface, the shared vocabulary,
the weight recipe and the supernet plumbing.

`SearchStrategy` is the interface `raydsnas.train.loop` uses; `DSNAS` and every baseline
(`SNAS`, `ProxylessNAS`, `SPOS`, `RandomSearch`, `FixedArchitecture`) satisfy it. The loop runs
`step` for `search.epochs` epochs, then calls `end_search(data, epoch)` once (SPOS and random
search pick their architecture there and may switch to a retrain/finetune phase), then runs
`extra_epochs` more epochs of `step` (counted in the schedule, the reports and the exported
worker-hours).

The vocabulary: `StepStats` (what a step reports), `check` (a config value's error),
`entropy_per_layer`, `expected_flops`, `sampling_seed`. `TrainingConfig` is the weight recipe
every strategy's config extends. `SupernetTrainer` is what every strategy is built on: one
supernet, an SGD optimiser with the DSNAS recipe (momentum, weight decay off BN, warm-up +
cosine), bf16 autocast and channels_last on recent GPUs, gradient averaging over ranks,
prediction and child export, checkpoint state. `AlphaSearch` adds one alpha matrix and its Adam
optimiser (SNAS, ProxylessNAS); DSNAS keeps one alpha row per layer, to prune them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from raydsnas import checks
from raydsnas.space import SearchSpace
from raydsnas.space.child import ChildNet
from raydsnas.strategies.collective import Collective, GradientAverager, LocalCollective
from raydsnas.strategies.optim import warmup_cosine, weight_param_groups

Batch = tuple[torch.Tensor, torch.Tensor]


# -- the shared vocabulary -----------------------------------------------------------------------
def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A strategy config's error: `search.<key> = <value> is not allowed; expected <allowed>`."""
    checks.check(ok, f"search.{key}", value, allowed)


@dataclass
class StepStats:
    """What one search step reports. Tensors stay on the device until the caller reads them;
    `entropy` and `expected_flops` (host arithmetic over alpha) are computed when first read,
    from the strategy as it is then, so a step that nobody logs does not pay for them."""

    step: int
    loss: torch.Tensor
    correct: torch.Tensor
    batch_size: int
    path: list[int]
    num_frozen: int
    newly_frozen: list[int] = field(default_factory=list)
    lr: float = 0.0
    searching: bool = True
    summary: Callable[[], tuple[float, float]] | None = field(default=None, repr=False)
    _summary_value: tuple[float, float] | None = field(default=None, repr=False)

    def _summarise(self) -> tuple[float, float]:
        if self._summary_value is None:
            self._summary_value = self.summary() if self.summary is not None else (0.0, 0.0)
        return self._summary_value

    @property
    def entropy(self) -> float:
        """Mean entropy (nats) of the architecture distribution per layer."""
        return self._summarise()[0]

    @property
    def expected_flops(self) -> float:
        """E_p[FLOPs] of the architecture distribution."""
        return self._summarise()[1]


def entropy_per_layer(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of `[L, n]` probabilities."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def expected_flops(probs: torch.Tensor, table: torch.Tensor, fixed: float) -> torch.Tensor:
    """E_p[FLOPs] = fixed + sum_l sum_k p_lk F_lk (differentiable in `probs`)."""
    return fixed + (probs * table).sum()


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """A seed for step `step`'s path: the same on every rank for `rank=0` (shared policy)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def initial_alpha(space: SearchSpace, config: Any) -> torch.Tensor:
    """`[L, n]` architecture parameters at 1 + N(0, `config.alpha_init_std`), from their own
    generator seeded by `config.seed` (the global stream, which initialises the weights, is
    left alone)."""
    generator = torch.Generator().manual_seed(config.seed)
    return 1 + config.alpha_init_std * torch.randn(space.num_layers, space.num_choices,
                                                   generator=generator)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 if it is a half-precision tensor (logits under autocast), else as is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without making the host wait: on a GPU through pinned
    memory (a copy from pageable memory synchronises the stream); on the CPU the tensor itself.
    The caching host allocator keeps the pinned block until the copy has run."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor on its way to the host: the copy into pinned memory is queued behind
    the work already queued, and `wait()` returns the host tensor once that copy has run
    (waiting for it alone, not for anything queued later). On the CPU it is the tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda":
            self._host, self._event = tensor.detach(), None
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor.detach(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


class SearchData(Protocol):
    """The batches a strategy may read after the search epochs (BN recalibration, candidate
    evaluation). `raydsnas.train.loop.Batches` is one; `raydsnas.data.tensors.TensorBatches` is
    another.

    Splits: `train` (never holds a selection-split sample), `val` (what the final child is
    reported on) and, when the data was built with a selection fraction, `select`: training
    samples held out of all training, on which the two-stage baselines score candidates."""

    def train(self, epoch: int, limit: int | None = None) -> Iterator[Batch]:
        """This rank's training batches of `epoch` (only the first `limit`)."""

    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor], collective: Collective,
                 prefix: str | None = None, split: str = "val") -> dict[str, float]:
        """`{prefix}_top1`, `_top5`, `_loss`, `_samples` over `split` (`val` or `select`;
        `prefix` defaults to the split's name), summed over every rank (so every rank gets the
        same numbers). A `select` without a selection split raises `ValueError`."""


class SearchStrategy(Protocol):
    """What the per-worker loop uses. Architectures are lists of choice indices per layer."""

    space: SearchSpace
    device: torch.device
    channels_last: bool
    supernet: nn.Module
    weight_opt: torch.optim.Optimizer
    step_count: int
    frozen: dict[int, int]
    extra_epochs: int

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats: ...
    def probs(self) -> torch.Tensor: ...
    def alpha_matrix(self) -> torch.Tensor: ...
    def entropy(self) -> float: ...
    def expected_flops(self) -> float: ...
    def argmax_arch(self) -> list[int]: ...
    def predict(self, images: torch.Tensor, arch: list[int] | None = None) -> torch.Tensor: ...
    def export_child(self, arch: list[int] | None = None) -> ChildNet: ...
    def end_search(self, data: SearchData, epoch: int) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingConfig:
    """The weight-training recipe every baseline shares with DSNAS (same keys, same defaults:
    the paper's ImageNet recipe). `lr` is for the global batch; epochs convert to steps with
    `steps_per_epoch`.

    Attributes:
        lr: weight SGD learning rate at `lr_reference_batch` (cosine decay after warm-up).
        momentum: weight SGD momentum.
        weight_decay: weight decay of conv and linear weights (not BN parameters or biases).
        label_smoothing: label smoothing of the cross-entropy loss.
        epochs: search epochs (set by `search.epochs`).
        steps_per_epoch: set by the job from the data set size and the global batch.
        warmup_epochs: linear learning-rate warm-up before the cosine schedule.
        seed: seed of the weight initialisation and of every sampling decision.
        amp: bf16 autocast on GPUs that support it (ignored on CPU).
        channels_last: channels-last memory format on GPU (ignored on CPU).
    """

    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 4e-5
    label_smoothing: float = 0.1
    epochs: float = 240
    steps_per_epoch: int = 1
    warmup_epochs: float = 5
    seed: int = 0
    amp: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", self.lr, "a number > 0")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "a number in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing,
               "a number in [0, 1)")
        check(self.epochs > 0, "epochs", self.epochs, "a number > 0")
        check(self.steps_per_epoch >= 1, "steps_per_epoch", self.steps_per_epoch,
               "an integer >= 1")
        check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs,
              "a number >= 0 (longer than the run: warm-up over the whole run)")

    def check_alpha_optimizer(self) -> None:
        """Validate (and normalise) the `alpha_lr`, `alpha_betas`, `alpha_init_std` keys of a
        strategy config that learns alpha with Adam (`AlphaSearch`)."""
        self.alpha_betas = tuple(self.alpha_betas)
        check(self.alpha_lr >= 0, "alpha_lr", self.alpha_lr, "a number >= 0")
        check(len(self.alpha_betas) == 2 and all(0 <= b < 1 for b in self.alpha_betas),
               "alpha_betas", self.alpha_betas, "two numbers in [0, 1)")
        check(self.alpha_init_std >= 0, "alpha_init_std", self.alpha_init_std, "a number >= 0")

    @property
    def same_path_on_every_rank(self) -> bool:
        """Whether every rank runs the same blocks each step (what global BatchNorm needs)."""
        return True

    @property
    def selection_share(self) -> float:
        """The share of the training split the strategy holds out to choose on (0: none)."""
        return 0.0

    def check_space(self, space: SearchSpace) -> None:
        """Refuse settings that cannot fit `space` (a `ValueError` naming the key); the job's
        config check calls it with the configured space."""

    @property
    def total_steps(self) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch))

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, round(self.warmup_epochs * self.steps_per_epoch))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        checks.check_known("search", data, sorted(f.name for f in fields(cls)))
        return cls(**data)


def forward_layers(supernet: nn.Module, images: torch.Tensor,
                   layer: Callable[[int, nn.ModuleDict, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Stem, then `layer(l, supernet.layers[l], x)` for every choice layer, then the head: the
    supernet with a custom mix of candidates per layer (SNAS, ProxylessNAS's gates)."""
    x = supernet.stem(images)
    for l, candidates in enumerate(supernet.layers):
        x = layer(l, candidates, x)
    return supernet.head(x)


def sample_in_band(space: SearchSpace, generator: torch.Generator, low: float | None,
                   high: float | None, max_tries: int = 10_000) -> list[int]:
    """A uniformly random architecture with FLOPs in [low, high] (rejection sampling)."""
    table = space.flops_table()
    for _ in range(max_tries):
        arch = torch.randint(space.num_choices, (space.num_layers,), generator=generator).tolist()
        flops = table.total(arch)
        if (low is None or flops >= low) and (high is None or flops <= high):
            return arch
    raise ValueError(f"no architecture with FLOPs in [{low}, {high}] in {max_tries} uniform "
                     f"samples (the space spans {table.total(table.smallest())} to "
                     f"{table.total(table.largest())})")


class SupernetTrainer:
    """Supernet, weight optimiser and schedule, ranks, prediction, export, checkpoint state.

    Subclasses implement `step` and the architecture distribution (`probs`, `argmax_arch`,
    `alpha_matrix`); they add optimisers in `_build_optimizers` and change the learning rate's
    shape in `lr_factor`. `state_dict()` / `load_state_dict()` here hold the weights, optimiser,
    schedule and step; subclasses add their own entries.
    """

    name: ClassVar[str] = ""
    extra_epochs: int = 0

    def __init__(self, space: SearchSpace, config: TrainingConfig, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        self.space = space
        self.config = config
        self.device = torch.device(device)
        self.collective = collective or LocalCollective()
        self._averager = GradientAverager(self.collective)
        # bf16 autocast needs Ampere or newer; older GPUs train in fp32.
        self.use_amp = (config.amp and self.device.type == "cuda"
                        and torch.cuda.is_bf16_supported())
        self.channels_last = config.channels_last and self.device.type == "cuda"
        torch.manual_seed(config.seed)  # weight init: identical on every rank
        self.supernet = space.supernet().to(self.device)
        if self.channels_last:
            self.supernet = self.supernet.to(memory_format=torch.channels_last)
        self.frozen: dict[int, int] = {}
        self.step_count = 0
        table = space.flops_table()
        self._flops_table, self._flops_fixed = table.as_tensor(), float(table.fixed)
        self._build_optimizers()

    # -- optimisers and the learning rate -------------------------------------------------------
    def _build_optimizers(self) -> None:
        """The weight optimiser over the supernet's trainable parameters, with the run's
        schedule (subclasses add theirs, e.g. alpha's Adam)."""
        self._build_weight_optimizer(self.config.total_steps, self.config.warmup_steps)

    def _build_weight_optimizer(self, total_steps: int, warmup_steps: int) -> None:
        cfg = self.config
        self.weight_opt = torch.optim.SGD(weight_param_groups(self.supernet, cfg.weight_decay),
                                          lr=cfg.lr, momentum=cfg.momentum, foreach=True)
        self._schedule = (total_steps, warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.weight_opt, lambda step: self.lr_factor(step))
        self._init_momentum()

    def _init_momentum(self) -> None:
        """A zero momentum buffer for every weight that has none yet. SGD's first update of a
        zero buffer gives the gradient itself, as its lazy creation does, but with every buffer
        present a GPU step stays on SGD's foreach path (a parameter without one makes it fall
        back to one small update per tensor, ~470 ops instead of ~7)."""
        if not self.config.momentum:
            return
        for group in self.weight_opt.param_groups:
            for p in group["params"]:
                state = self.weight_opt.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)

    def lr_factor(self, step: int) -> float:
        """The weight learning rate at `step` over `lr`: warm-up, then cosine to 0."""
        return warmup_cosine(*self._schedule)(step)

    def _refresh_lr(self) -> None:
        """Set this run's learning rate (a resize may change `lr`) at the scheduler's step."""
        for group in self.weight_opt.param_groups:
            group["lr"] = self.config.lr * self.lr_factor(self.scheduler.last_epoch)

    # -- the architecture distribution (subclasses override) ------------------------------------
    def probs(self) -> torch.Tensor:
        return torch.full((self.space.num_layers, self.space.num_choices),
                          1.0 / self.space.num_choices)

    def alpha_matrix(self) -> torch.Tensor:
        return torch.zeros(self.space.num_layers, self.space.num_choices)

    def argmax_arch(self) -> list[int]:
        return self.probs().argmax(-1).tolist()

    def entropy(self) -> float:
        return float(entropy_per_layer(self.probs()).mean())

    def expected_flops(self) -> float:
        return float(expected_flops(self.probs().double(), self._flops_table, self._flops_fixed))

    def end_search(self, data: SearchData, epoch: int) -> dict[str, Any]:
        """Called once after the last search epoch; nothing to do for a gradient-based search."""
        return {}

    # -- training helpers ----------------------------------------------------------------------
    def _train_mode(self) -> None:
        """The supernet in training mode, without walking its ~1 000 modules every step (every
        mode change in the package is a whole-supernet `train()` / `eval()`)."""
        if not self.supernet.training:
            self.supernet.train()

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(logits), labels,
                               label_smoothing=self.config.label_smoothing)

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def path_parameters(self, path: Sequence[int]) -> list[nn.Parameter]:
        """Stem, head and the candidates on `path`: what a single-path step trains."""
        params = list(self.supernet.stem.parameters()) + list(self.supernet.head.parameters())
        for l, k in enumerate(path):
            params += self.supernet.candidate_parameters(l, k)
        return params

    def average_gradients(self, params: Iterable[nn.Parameter],
                          extra: torch.Tensor | None = None, *,
                          extra_on_device: bool = False) -> torch.Tensor | None:
        """Average the `.grad` of `params` (None counts as zeros) and `extra` over ranks, in one
        all-reduce through the trainer's persistent flat buffer; returns the averaged `extra`
        (on the CPU, or with `extra_on_device` on the device, so the host need not wait for
        the all-reduce yet). Every rank passes the same list."""
        if self.collective.world_size == 1:
            return extra
        on_device = None if extra is None else extra.to(self.device, torch.float32)
        averaged = self._averager(list(params), on_device)
        if extra is None:
            return None
        averaged = averaged.clone()  # the buffer is reused by the next step
        return averaged if extra_on_device else averaged.cpu().to(extra.dtype)

    def _weight_step(self) -> None:
        self.weight_opt.step()
        self.scheduler.step()

    def _path_step(self, images: torch.Tensor, labels: torch.Tensor,
                   path: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward on `path`, gradients averaged over ranks, one weight update;
        returns (loss, logits)."""
        self._train_mode()
        self.weight_opt.zero_grad(set_to_none=True)
        with record_function("raydsnas.forward"):
            with self._autocast():
                logits = self.supernet(self._prepare(images), path)
            loss = self._loss(logits, labels)
        with record_function("raydsnas.backward"):
            loss.backward()
        self.average_gradients(self.path_parameters(path))
        with record_function("raydsnas.optimizer"):
            self._weight_step()
        return loss, logits

    def _stats(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
               path: list[int], searching: bool, newly_frozen: Sequence[int] = ()) -> StepStats:
        return StepStats(
            step=self.step_count, loss=loss.detach(),
            correct=(logits.detach().argmax(-1) == labels).sum(), batch_size=len(labels),
            path=path, summary=lambda: (self.entropy(), self.expected_flops()),
            num_frozen=len(self.frozen), newly_frozen=list(newly_frozen),
            lr=self.weight_opt.param_groups[0]["lr"], searching=searching)

    # -- results -------------------------------------------------------------------------------
    def export_child(self, arch: list[int] | None = None) -> ChildNet:
        """The argmax (or given) architecture as a standalone `ChildNet` with trained weights."""
        arch = self.argmax_arch() if arch is None else arch
        return self.supernet.extract_child(arch).to(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, arch: list[int] | None = None) -> torch.Tensor:
        """Logits of the argmax (or given) architecture, eval mode."""
        self.supernet.eval()
        with self._autocast():
            return at_least_fp32(self.supernet(self._prepare(images), arch or self.argmax_arch()))

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name, "space": self.space.to_dict(), "config": asdict(self.config),
            "step": self.step_count, "frozen": dict(self.frozen),
            "alpha": self.alpha_matrix().clone(), "schedule": list(self._schedule),
            "supernet": self.supernet.state_dict(), "weight_opt": self.weight_opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def check_checkpoint(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another strategy or space, with what differs. Checkpoints
        from before the `strategy` key existed were all written by DSNAS."""
        written_by = state.get("strategy", "dsnas")
        if written_by != self.name:
            raise ValueError(f"checkpoint was written by strategy {written_by!r}, "
                             f"this run uses search.strategy = {self.name!r}")
        if SearchSpace.from_dict(state["space"]) != self.space:
            raise ValueError("checkpoint was written for a different search space: "
                             f"{state['space']} != {self.space.to_dict()}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weights, optimiser and schedule. Subclasses restore their own part
        first when it changes the supernet's shape (pruned layers, a final phase)."""
        self.check_checkpoint(state)
        self.supernet.load_state_dict(state["supernet"])
        self._rebuild_optimizers(state)
        self.weight_opt.load_state_dict(state["weight_opt"])
        self._init_momentum()  # checkpoints hold buffers only for weights already stepped
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        # This run's learning rate (a resize may change it), at the restored step.
        self.scheduler.base_lrs = [self.config.lr] * len(self.weight_opt.param_groups)
        self._refresh_lr()
        for group in self.weight_opt.param_groups:
            group["initial_lr"] = self.config.lr

    def _rebuild_optimizers(self, state: dict[str, Any]) -> None:
        """The optimisers over the restored parameters, with the checkpoint's schedule, before
        their states are loaded."""
        self._build_weight_optimizer(*state["schedule"])

    def num_weight_parameters(self) -> int:
        return sum(p.numel() for p in self.supernet.parameters())


class AlphaSearch(SupernetTrainer):
    """A baseline with architecture parameters `alpha` `[L, n]` and their Adam optimiser
    (SNAS, ProxylessNAS). The config must have `alpha_lr`, `alpha_betas`, `alpha_init_std`."""

    def __init__(self, space: SearchSpace, config, *, device: torch.device | str = "cpu",
                 collective: Collective | None = None):
        super().__init__(space, config, device=device, collective=collective)
        self.alpha = nn.Parameter(initial_alpha(space, config))
        self.alpha_opt = torch.optim.Adam([self.alpha], lr=config.alpha_lr,
                                          betas=tuple(config.alpha_betas), weight_decay=0.0)

    def alpha_matrix(self) -> torch.Tensor:
        return self.alpha.detach().clone()

    def probs(self) -> torch.Tensor:
        return F.softmax(self.alpha_matrix(), -1)

    def _apply_alpha_gradient(self, grad: torch.Tensor) -> None:
        self.alpha.grad = grad.to(self.alpha.dtype)
        self.alpha_opt.step()
        self.alpha_opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha_opt": self.alpha_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.alpha.copy_(state["alpha"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        for group in self.alpha_opt.param_groups:
            group["lr"] = self.config.alpha_lr
