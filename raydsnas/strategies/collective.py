"""How ranks talk: the few collectives a search strategy needs, behind one small interface.

`LocalCollective` is world size 1 (no communication). `TorchDistributedCollective` wraps an
initialised `torch.distributed` process group (gloo on CPU, NCCL on GPU), which is what Ray
Train sets up for each worker. `mean_over_ranks` is the one routine that averages tensors over
ranks (gradients, BatchNorm statistics); `average_bn_buffers` applies it to a module's
BatchNorm running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class Collective(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all ranks, in place."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Copy rank `src`'s `tensor` to every rank, in place."""


class LocalCollective:
    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        pass

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        pass


class TorchDistributedCollective:
    """Collectives over the default `torch.distributed` process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; use LocalCollective instead")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._dist.broadcast(tensor, src=src)


def default_collective() -> Collective:
    """The process group if one is initialised with more than one rank, else local."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedCollective()
    return LocalCollective()


def mean_over_ranks(tensors: Sequence[torch.Tensor], collective: Collective) -> list[torch.Tensor]:
    """Each tensor's mean over ranks, in float32, from one all-reduce of them all flattened
    together: views of one buffer, shaped as the inputs (which all live on one device). World
    size 1: the tensors themselves."""
    if collective.world_size == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    collective.all_reduce_sum(flat)
    flat /= collective.world_size
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors)]


def average_bn_buffers(module: nn.Module, collective: Collective) -> None:
    """Average BatchNorm running statistics over ranks, so that every rank (and the checkpoint
    rank 0 writes) holds the same, better-estimated statistics."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var) if b is not None]
    if collective.world_size == 1 or not buffers:
        return
    for buffer, mean in zip(buffers, mean_over_ranks(buffers, collective)):
        buffer.copy_(mean)
