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
