"""How ranks talk: the few collectives a search strategy needs, behind one small interface.

`LocalCollective` is world size 1 (no communication). `TorchDistributedCollective` wraps an
initialised `torch.distributed` process group (gloo on CPU, NCCL on GPU), which is what Ray
Train sets up for each worker. Two routines average over ranks: `GradientAverager`, every
step's gradients through one persistent flat buffer (in place, nothing allocated), and
`mean_over_ranks`, occasional tensors (BatchNorm statistics: `average_bn_buffers` applies it
to a module's running statistics).
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

    def all_reduce_mean(self, tensor: torch.Tensor) -> None:
        """Average `tensor` over all ranks, in place."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Copy rank `src`'s `tensor` to every rank, in place."""


class LocalCollective:
    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        pass

    def all_reduce_mean(self, tensor: torch.Tensor) -> None:
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
        self._avg = dist.get_backend() == "nccl"  # gloo has no ReduceOp.AVG

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)

    def all_reduce_mean(self, tensor: torch.Tensor) -> None:
        """NCCL averages in the reduction itself (`ReduceOp.AVG`); gloo has no AVG: sum, then
        divide."""
        if self._avg:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.AVG)
        else:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
            tensor.div_(self.world_size)

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
    collective.all_reduce_mean(flat)
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


class GradientAverager:
    """Averages the gradients of a changing list of parameters over ranks through one flat
    float32 buffer that lives as long as the trainer (grown, never shrunk): the gradients are
    copied in with one foreach copy, all-reduced once (`ReduceOp.AVG` on NCCL) and copied back
    into the same `.grad` tensors, so a step allocates nothing but the gradients of parameters
    that had none (a candidate only other ranks ran)."""

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self._buffer: torch.Tensor | None = None

    def _flat(self, numel: int, device: torch.device) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.device != device:
            self._buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self._buffer[:numel]

    def __call__(self, params: Sequence[nn.Parameter],
                 extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Average `.grad` of `params` (None counts as zeros) and `extra` (any shape, on the
        same device) over ranks; the gradients are replaced in place. Returns the averaged
        `extra` as a view of the buffer (valid until the next call). Every rank passes the
        same list."""
        tensors = [p.grad for p in params] + ([extra] if extra is not None else [])
        shapes = [p.shape for p in params] + ([extra.shape] if extra is not None else [])
        device = params[0].device if params else extra.device
        flat = self._flat(sum(s.numel() for s in shapes), device)
        views = [v.view(s) for v, s in zip(flat.split([s.numel() for s in shapes]), shapes)]
        present = [(v, t) for v, t in zip(views, tensors) if t is not None]
        absent = [v for v, t in zip(views, tensors) if t is None]
        if present:
            torch._foreach_copy_([v for v, _ in present], [t for _, t in present])
        if absent:
            torch._foreach_zero_(absent)
        self.collective.all_reduce_mean(flat)
        grads = [(v, t) for v, t in present if extra is None or t is not extra]
        if grads:
            torch._foreach_copy_([t for _, t in grads], [v for v, _ in grads])
        for p, v in zip(params, views):
            if p.grad is None:
                p.grad = v.to(p.dtype, copy=True)
        return views[-1] if extra is not None else None
