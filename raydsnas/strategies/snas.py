"""SNAS: stochastic NAS with the Gumbel-softmax relaxation (Xie, Zheng, Liu, Lin, ICLR 2019),
on the same single-path ShuffleNetV2 space and loop as DSNAS, as a baseline.

Each step draws one Gumbel vector `G_l` per layer (shared by the batch and by every rank),
relaxes the one-hot choice to

    z_l = softmax((alpha_l + G_l) / tau)

and runs the *whole parent network*: layer l's output is `sum_k z_lk * block_lk(x)`. One
backward pass gives the gradients of the weights of every candidate and of alpha (through the
relaxation, the reparameterisation gradient); SGD updates the weights and Adam updates alpha on
the same batch (single level, as in SNAS and DSNAS). This costs ~n times the compute and
memory of one path (DSNAS paper, Table 1 and Table 4).

The temperature anneals from `tau_start` to `tau_end` over the run (`tau_schedule`:
`exponential` (geometric), `linear` or `constant`). `hard: true` uses the straight-through
variant (forward with the one-hot argmax of z, backward through the soft z); the default is the
soft relaxation of SNAS. The result is the argmax of alpha per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from raydsnas.space import SearchSpace
from raydsnas.strategies.base import (
    AlphaSearch,
    StepStats,
    TrainingConfig,
    check,
    forward_layers,
    sampling_seed,
)
from raydsnas.strategies.collective import Collective

TAU_SCHEDULES = ("exponential", "linear", "constant")


@dataclass
class SNASConfig(TrainingConfig):
    """SNAS hyper-parameters (the weight recipe is DSNAS's; alpha Adam lr 3e-4 as in SNAS).

    Attributes:
        alpha_lr: Adam learning rate of alpha.
        alpha_betas: Adam betas of alpha.
        alpha_init_std: alpha starts at 1 + N(0, alpha_init_std) per entry.
        tau_start: Gumbel-softmax temperature at the first step.
        tau_end: temperature at the last step.
        tau_schedule: `exponential` (geometric), `linear` or `constant` annealing.
        hard: straight-through: forward the one-hot argmax, backward through the soft weights.
    """

    alpha_lr: float = 3e-4
    alpha_betas: tuple[float, float] = (0.5, 0.999)
    alpha_init_std: float = 0.01
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_schedule: str = "exponential"
    hard: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_alpha_optimizer()
        check(self.tau_start > 0, "tau_start", self.tau_start, "a number > 0")
        check(self.tau_end > 0, "tau_end", self.tau_end, "a number > 0")
        check(self.tau_schedule in TAU_SCHEDULES, "tau_schedule", self.tau_schedule,
               f"one of {list(TAU_SCHEDULES)}")


def temperature(step: int, total_steps: int, start: float, end: float, schedule: str) -> float:
    """tau at `step` of `total_steps`: `start` at step 0, `end` at the last step."""
    t = min(1.0, step / max(1, total_steps - 1))
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * t
    return start * (end / start) ** t


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel samples -log(-log U), U ~ Uniform(0, 1) (clamped away from 0 and 1)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-10, 1 - 1e-10)
    return (-torch.log(-torch.log(u))).float()


def relaxed_choice(alpha: torch.Tensor, gumbel: torch.Tensor, tau: float,
                   hard: bool = False) -> torch.Tensor:
    """`[L, n]` Gumbel-softmax weights softmax((alpha + G) / tau); `hard`: straight-through."""
    z = F.softmax((alpha + gumbel) / tau, dim=-1)
    if not hard:
        return z
    onehot = F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
    return onehot - z.detach() + z


class SNAS(AlphaSearch):
    """Whole-parent Gumbel-softmax search: every candidate of every layer runs every step."""

    name = "snas"

    def __init__(self, space: SearchSpace, config: SNASConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        super().__init__(space, config or SNASConfig(), device=device, collective=collective)

    def temperature(self) -> float:
        cfg = self.config
        return temperature(self.step_count, cfg.total_steps, cfg.tau_start, cfg.tau_end,
                           cfg.tau_schedule)

    def sample_gumbel(self) -> torch.Tensor:
        """This step's `[L, n]` Gumbel noise: the same on every rank."""
        gen = torch.Generator().manual_seed(sampling_seed(self.config.seed, self.step_count, 0))
        return gumbel_noise((self.space.num_layers, self.space.num_choices), gen)

    def forward_mixed(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Logits of the parent network with layer l's output `sum_k weights[l, k] * block_k(x)`."""
        names = self.space.choices

        def mix(l, candidates, x):
            return sum(weights[l, k] * candidates[names[k]](x) for k in range(len(names)))

        return forward_layers(self.supernet, self._prepare(images), mix)

    def compute_gradients(self, images: torch.Tensor, labels: torch.Tensor,
                          gumbel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward the relaxed parent network and backward once: weight gradients in `.grad`,
        alpha's in `self.alpha.grad`. Returns (loss, logits)."""
        self._train_mode()
        self.weight_opt.zero_grad(set_to_none=True)
        self.alpha_opt.zero_grad(set_to_none=True)
        with record_function("raydsnas.forward"):
            z = relaxed_choice(self.alpha, gumbel.to(self.alpha.device), self.temperature(),
                               self.config.hard)
            with self._autocast():
                logits = self.forward_mixed(images, z.to(self.device))
            loss = self._loss(logits, labels)
        with record_function("raydsnas.backward"):
            loss.backward()
        return loss, logits

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """One SNAS iteration: sample G, relaxed forward of the whole parent, one backward,
        SGD on the weights and Adam on alpha."""
        gumbel = self.sample_gumbel()
        loss, logits = self.compute_gradients(images, labels, gumbel)
        alpha_grad = self.average_gradients(self.supernet.parameters(), self.alpha.grad.detach())
        with record_function("raydsnas.optimizer"):
            self._apply_alpha_gradient(alpha_grad)
            self._weight_step()
        self.step_count += 1
        path = (self.alpha.detach() + gumbel).argmax(-1).tolist()
        return self._stats(loss, logits, labels, path, searching=True)

    def state_dict(self):
        return {**super().state_dict(), "tau": self.temperature()}

