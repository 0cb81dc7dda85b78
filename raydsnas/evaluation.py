"""Evaluating a network on batches, and BatchNorm recalibration before export."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Accuracy:
    top1: float
    top5: float
    loss: float
    count: int


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]) -> Accuracy:
    """Top-1 / top-5 accuracy and mean cross-entropy of `forward` (logits) over `batches`."""
    top1 = top5 = loss = 0.0
    count = 0
    for images, labels in batches:
        logits = forward(images).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == labels.unsqueeze(-1)
        top1 += float(hits[:, 0].sum())
        top5 += float(hits.any(-1).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        count += len(labels)
    if count == 0:
        raise ValueError("evaluate() got no batches")
    return Accuracy(top1 / count, top5 / count, loss / count, count)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor],
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Recompute every BatchNorm's running statistics from `batches` (cumulative average).

    No parameter changes. `forward` defaults to `model`; pass e.g. a supernet path's forward.
    Returns the number of images used. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all recalibration batches
    model.train()
    seen = 0
    try:
        for images in batches:
            (forward or model)(images)
            seen += len(images)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    return seen
