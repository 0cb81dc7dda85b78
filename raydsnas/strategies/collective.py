"""How ranks talk: the few collectives a search strategy needs, behind one small interface.

`LocalCollective` is world size 1 (no communication). `TorchDistributedCollective` wraps an
initialised `torch.distributed` process group (gloo on CPU, NCCL on GPU), which is what Ray
Train sets up for each worker.
"""

from __future__ import annotations

from typing import Protocol

import torch


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
