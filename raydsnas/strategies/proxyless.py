"""ProxylessNAS with binary gates and two sampled paths (Cai, Zhu, Han, ICLR 2019,
arXiv:1812.00332, Sec. 3.2), on the same single-path ShuffleNetV2 space and loop as DSNAS.

What one `step` does, exactly:

1. Weights (one path). Sample one candidate per layer from p_l = softmax(alpha_l), forward and
   backward on that path only, SGD step (the paper's "binarised" weight update: only the active
   path is in memory).
2. Architecture (two paths; after `arch_warmup_epochs`). For every layer sample two distinct
   candidates {i, j} from p_l without replacement, then the active one of the two from the
   renormalised pair probabilities q = softmax((alpha_li, alpha_lj)). Binary gates g_l = (1, 0)
   or (0, 1) on (i, j), and the layer output is `g_li * block_i(x) + g_lj * block_j(x)` (its
   value is the active block's output). One backward gives the gate gradients
   dL/dg_lm = <dL/d out_l, block_m(x)> for m in {i, j} (BinaryConnect: the gradient w.r.t. the
   binary gate stands in for the gradient w.r.t. its probability), and

       dL/d alpha_la = sum_{m in {i, j}} dL/dg_lm * q_m * (delta_am - q_a)   for a in {i, j},

   zero for the other candidates. Adam (betas (0, 0.999), as in ProxylessNAS, so a zero
   gradient leaves an alpha unchanged) steps alpha; then the two updated alphas are shifted by
   a common offset so that sum(exp) over the pair is what it was: the probabilities of the
   unsampled candidates do not change (the paper's rescaling).

Both updates use the step's batch (single level, like DSNAS and SNAS here; ProxylessNAS takes
its architecture batch from a held-out split). Samples are seeded by (seed, step), so every rank
draws the same paths, pairs and gates; weight and gate gradients are averaged over ranks.
No latency/FLOPs loss is implemented. The result is the argmax of alpha per layer.
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


@dataclass
class ProxylessConfig(TrainingConfig):
    """ProxylessNAS hyper-parameters (weights: the DSNAS recipe; alpha: Adam lr 1e-3,
    betas (0, 0.999), initialised uniform, as in ProxylessNAS).

    Attributes:
        alpha_lr: Adam learning rate of alpha.
        alpha_betas: Adam betas of alpha (ProxylessNAS: 0, 0.999).
        alpha_init_std: alpha starts at N(0, alpha_init_std) (0: uniform).
        arch_warmup_epochs: epochs of weight-only training before alpha moves.
    """

    alpha_lr: float = 1e-3
    alpha_betas: tuple[float, float] = (0.0, 0.999)
    alpha_init_std: float = 0.0
    arch_warmup_epochs: float = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_alpha_optimizer()
        check(0 <= self.arch_warmup_epochs <= self.epochs, "arch_warmup_epochs",
               self.arch_warmup_epochs, f"a number in [0, epochs={self.epochs}]")

    @property
    def arch_warmup_steps(self) -> int:
        return round(self.arch_warmup_epochs * self.steps_per_epoch)


def binary_gate_alpha_grad(alpha: torch.Tensor, pairs: torch.Tensor,
                           gate_grad: torch.Tensor) -> torch.Tensor:
    """`[L, n]` alpha gradient from the two-path gate gradients `[L, 2]` of the `[L, 2]` pairs:
    the gradient through the pair's renormalised softmax, zero off the pair."""
    q = F.softmax(alpha.gather(1, pairs), -1)                       # [L, 2]
    weighted = gate_grad * q                                         # dL/dg_m * q_m
    pair_grad = weighted - q * weighted.sum(-1, keepdim=True)        # sum_m ... (delta - q_a)
    return torch.zeros_like(alpha).scatter(1, pairs, pair_grad)


class ProxylessNAS(AlphaSearch):
    """Binary-gate search: one path for the weights, two paths per layer for alpha."""

    name = "proxyless"

    def __init__(self, space: SearchSpace, config: ProxylessConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        super().__init__(space, config or ProxylessConfig(), device=device, collective=collective)

    @property
    def searching(self) -> bool:
        return self.step_count >= self.config.arch_warmup_steps

    def sample(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """This step's (path, pairs `[L, 2]`, active `[L]` index into the pair): the same on
        every rank."""
        gen = torch.Generator().manual_seed(sampling_seed(self.config.seed, self.step_count, 0))
        p = self.probs()
        path = torch.multinomial(p, 1, generator=gen).squeeze(-1).tolist()
        pairs = torch.multinomial(p, 2, replacement=False, generator=gen)
        q = F.softmax(self.alpha_matrix().gather(1, pairs), -1)
        active = torch.multinomial(q, 1, generator=gen).squeeze(-1)
        return path, pairs, active

    def gate_gradients(self, images: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor,
                       active: torch.Tensor) -> torch.Tensor:
        """`[L, 2]` dL/dg for the binary gates of `pairs` (value 1 on `active`), from one
        forward and backward of the two-path network; weight gradients are not touched."""
        self._train_mode()
        dtype = next(self.supernet.parameters()).dtype
        gates = F.one_hot(active, 2).to(self.device, dtype).requires_grad_(True)
        names = self.space.choices

        def two_paths(l, candidates, x):
            i, j = int(pairs[l, 0]), int(pairs[l, 1])
            return gates[l, 0] * candidates[names[i]](x) + gates[l, 1] * candidates[names[j]](x)

        with record_function("raydsnas.forward"):
            with self._autocast():
                logits = forward_layers(self.supernet, self._prepare(images), two_paths)
            loss = self._loss(logits, labels)
        with record_function("raydsnas.backward"):
            (grad,) = torch.autograd.grad(loss, gates)
        return grad

    def _apply_pair_update(self, pairs: torch.Tensor, alpha_grad: torch.Tensor) -> None:
        """Adam on alpha, then shift each pair so that its sum(exp(alpha)) is unchanged."""
        before = torch.logsumexp(self.alpha_matrix().gather(1, pairs), -1)
        self._apply_alpha_gradient(alpha_grad)
        with torch.no_grad():
            after = torch.logsumexp(self.alpha.gather(1, pairs), -1)
            shifted = self.alpha.gather(1, pairs) + (before - after).unsqueeze(-1)
            self.alpha.scatter_(1, pairs, shifted)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """One ProxylessNAS iteration: a single-path weight step, then a two-path alpha step."""
        searching = self.searching
        path, pairs, active = self.sample()
        loss, logits = self._path_step(images, labels, path)
        if searching:
            gate_grad = self.gate_gradients(images, labels, pairs, active).float().cpu()
            gate_grad = self.average_gradients([], gate_grad)
            with record_function("raydsnas.optimizer"):
                self._apply_pair_update(pairs, binary_gate_alpha_grad(self.alpha_matrix(),
                                                                      pairs, gate_grad))
        self.step_count += 1
        return self._stats(loss, logits, labels, path, searching=searching)
