"""Optimiser plumbing shared by the search strategies."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def weight_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only; none on BN parameters and biases."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor per step: linear warm-up from ~0 to 1, then cosine down to 0 at `total_steps`."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

    return factor


def drop_params(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Remove `params` from the optimiser's groups and state; returns how many were removed."""
    gone = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in gone]
        removed += len(group["params"]) - len(kept)
        group["params"] = kept
    for p in [p for p in optimizer.state if id(p) in gone]:
        del optimizer.state[p]
    return removed


class RowAdam:
    """Adam over the rows of one `[L, n]` matrix, each row its own parameter, as one vectorised
    update on the host: what `torch.optim.Adam` over the list of rows computes, element for
    element (no weight decay, no amsgrad), without its ~9 host ops per row. A row leaves for
    good with `drop(row)` (a frozen layer); `step(grad)` updates the rows still active.

    `state_dict()` holds the moments and per-row step counts; `load_state_dict` also reads a
    `torch.optim.Adam` state dict over the active rows in order (checkpoints written before).
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float],
                 eps: float = 1e-8):
        if param.dim() != 2:
            raise ValueError(f"RowAdam needs a [L, n] matrix, got shape {tuple(param.shape)}")
        self.param, self.lr, self.betas, self.eps = param, lr, tuple(betas), eps
        self.active = torch.ones(param.shape[0], dtype=torch.bool)
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = torch.zeros(param.shape[0], dtype=torch.float32)  # as Adam keeps `step`

    def drop(self, row: int) -> None:
        self.active[row] = False

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """One Adam update of the active rows of `param` by the same rows of `grad`."""
        rows = self.active.nonzero().squeeze(-1)
        if len(rows) == 0:
            return
        beta1, beta2 = self.betas
        self.steps[rows] += 1
        # Rows share a step count unless some were added later; one update per distinct count.
        for count in self.steps[rows].unique().tolist():
            sel = rows[self.steps[rows] == count]
            g = grad[sel].to(self.param.dtype)
            exp_avg, exp_avg_sq = self.exp_avg[sel], self.exp_avg_sq[sel]
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1**count
            bias_correction2_sqrt = (1 - beta2**count) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            value = self.param[sel]
            value.addcdiv_(exp_avg, denom, value=-(self.lr / bias_correction1))
            self.param[sel], self.exp_avg[sel], self.exp_avg_sq[sel] = value, exp_avg, exp_avg_sq

    def state_dict(self) -> dict:
        return {"format": "row_adam", "active": self.active.clone(),
                "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "steps": self.steps.clone()}

    def load_state_dict(self, state: dict) -> None:
        """This class's own state, or a `torch.optim.Adam` state dict whose parameters were the
        currently active rows, in order (the `lr` in it is ignored: the run's own applies)."""
        if state.get("format") == "row_adam":
            self.active = state["active"].clone().bool()
            self.exp_avg.copy_(state["exp_avg"])
            self.exp_avg_sq.copy_(state["exp_avg_sq"])
            self.steps.copy_(state["steps"])
            return
        rows = self.active.nonzero().squeeze(-1).tolist()
        indices = [i for group in state["param_groups"] for i in group["params"]]
        if len(indices) != len(rows):
            raise ValueError(f"the checkpoint's alpha optimiser has {len(indices)} rows, "
                             f"this run searches {len(rows)} layers")
        for index, row in zip(indices, rows):
            saved = state["state"].get(index)
            if saved is None:  # never stepped
                continue
            self.exp_avg[row] = saved["exp_avg"]
            self.exp_avg_sq[row] = saved["exp_avg_sq"]
            self.steps[row] = float(saved["step"])
