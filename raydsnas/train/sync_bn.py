"""BatchNorm with statistics over the global batch, on any backend (gloo on CPU, NCCL on GPU).

torch's `SyncBatchNorm` runs on GPUs only. This one is plain autograd over
`torch.distributed.nn.functional.all_reduce` (whose backward is an all-reduce too), so it works
wherever a process group does. With it (and the `shared` sampling policy: every rank must run
the same BatchNorm layers), W workers x batch B/W compute what one worker computes with batch B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce  # differentiable: backward all-reduces


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics are those of the global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], device=x.device, dtype=torch.float32)
        xf = x.float()
        # Two passes (mean, then squared deviations) as local BN does: the one-pass
        # E[x^2] - E[x]^2 cancels badly and sends ranks off a single worker's trajectory.
        stats = all_reduce(torch.cat([xf.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        centered = xf - mean.view(1, c, 1, 1)
        var = all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else (
                    1.0 / float(self.num_batches_tracked))
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
        out = centered * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out.to(x.dtype)


def use_global_batch_norm(module: nn.Module) -> int:
    """Switch every `nn.BatchNorm2d` in `module` to `GlobalBatchNorm2d` in place (same
    parameters and buffers, so optimisers and state dicts are unaffected); returns the count."""
    switched = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
            switched += 1
    return switched


__all__ = ["GlobalBatchNorm2d", "use_global_batch_norm"]
