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
def accuracy_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [top-1 hits, top-5 hits, summed cross-entropy, count] of one batch (CPU)."""
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hits = top == labels.unsqueeze(-1)
    return torch.tensor([float(hits[:, 0].sum()), float(hits.any(-1).sum()),
                         float(F.cross_entropy(logits, labels, reduction="sum")), len(labels)],
                        dtype=torch.float64)


def accuracy_from_sums(sums: torch.Tensor) -> Accuracy:
    count = int(sums[3])
    if count == 0:
        raise ValueError("no samples were evaluated")
    return Accuracy(float(sums[0]) / count, float(sums[1]) / count, float(sums[2]) / count, count)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]) -> Accuracy:
    """Top-1 / top-5 accuracy and mean cross-entropy of `forward` (logits) over `batches`."""
    sums = torch.zeros(4, dtype=torch.float64)
    for images, labels in batches:
        sums += accuracy_sums(forward(images), labels)
    return accuracy_from_sums(sums)


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
