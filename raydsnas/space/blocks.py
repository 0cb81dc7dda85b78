"""ShuffleNetV2 choice blocks, described as data and built into modules.

A block is a `BlockSpec`: an optional projection branch and a main branch, each a list of
`ConvBN` layers. The same spec builds the module (`ChoiceBlock`) and is counted for FLOPs and
parameters (`ConvBN.cost`), so the cost tables can never drift from the modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CHOICE_NAMES: tuple[str, ...] = ("choice_3", "choice_5", "choice_7", "choice_x")


@dataclass(frozen=True)
class ConvBN:
    """Conv2d (no bias) -> BatchNorm2d -> optional ReLU. `groups == cin` makes it depthwise."""

    cin: int
    cout: int
    kernel: int
    stride: int = 1
    groups: int = 1
    relu: bool = True

    def out_size(self, size: int) -> int:
        # padding = kernel // 2 for odd kernels
        return (size - 1) // self.stride + 1

    def cost(self, size: int) -> tuple[int, int, int]:
        """(multiply-adds, parameters, output size) on a `size` x `size` input."""
        out = self.out_size(size)
        weights = self.cout * (self.cin // self.groups) * self.kernel * self.kernel
        return weights * out * out, weights + 2 * self.cout, out

    def build(self, bn_eps: float = 1e-5) -> list[nn.Module]:
        layers: list[nn.Module] = [
            nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.kernel // 2,
                      groups=self.groups, bias=False),
            nn.BatchNorm2d(self.cout, eps=bn_eps),
        ]
        if self.relu:
            layers.append(nn.ReLU(inplace=True))
        return layers


def sequence_cost(convs: tuple[ConvBN, ...], size: int) -> tuple[int, int, int]:
    flops = params = 0
    for conv in convs:
        f, p, size = conv.cost(size)
        flops += f
        params += p
    return flops, params, size


@dataclass(frozen=True)
class BlockSpec:
    """One candidate of one choice layer.

    stride 1: the input's even channels pass through, the odd channels go through `main`;
    stride 2: both branches see the whole input (`proj` keeps `cin` channels, `main` adds
    `cout - cin`). Output = concat(passthrough or proj, main): the ShuffleNetV2 channel shuffle.
    """

    name: str
    stride: int
    main: tuple[ConvBN, ...]
    proj: tuple[ConvBN, ...] = ()

    def cost(self, size: int) -> tuple[int, int, int]:
        flops, params, out = sequence_cost(self.main, size)
        pf, pp, _ = sequence_cost(self.proj, size)
        return flops + pf, params + pp, out


def choice_spec(name: str, in_channels: int, out_channels: int, stride: int) -> BlockSpec:
    """The SPOS/DSNAS candidate `name` for a layer `in_channels -> out_channels`."""
    if name not in CHOICE_NAMES:
        raise ValueError(f"unknown choice {name!r}; allowed: {', '.join(CHOICE_NAMES)}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    inp = in_channels if stride == 2 else in_channels // 2
    mid = out_channels // 2
    branch_out = out_channels - inp
    if branch_out <= 0:
        raise ValueError(
            f"a stride-{stride} block {in_channels}->{out_channels} leaves no channels for its branch")

    if name == "choice_x":
        main = (
            ConvBN(inp, inp, 3, stride, groups=inp, relu=False),
            ConvBN(inp, mid, 1),
            ConvBN(mid, mid, 3, 1, groups=mid, relu=False),
            ConvBN(mid, mid, 1),
            ConvBN(mid, mid, 3, 1, groups=mid, relu=False),
            ConvBN(mid, branch_out, 1),
        )
        proj_kernel = 3
    else:
        k = int(name.split("_")[1])
        main = (
            ConvBN(inp, mid, 1),
            ConvBN(mid, mid, k, stride, groups=mid, relu=False),
            ConvBN(mid, branch_out, 1),
        )
        proj_kernel = k
    proj: tuple[ConvBN, ...] = ()
    if stride == 2:
        proj = (
            ConvBN(inp, inp, proj_kernel, 2, groups=inp, relu=False),
            ConvBN(inp, inp, 1),
        )
    return BlockSpec(name, stride, main, proj)


def split_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Even channels, odd channels (the ShuffleNetV2 channel shuffle of the previous block)."""
    return x[:, 0::2], x[:, 1::2]


class ChoiceBlock(nn.Module):
    """A ShuffleNetV2 block built from a `BlockSpec` (BatchNorm epsilon `bn_eps`)."""

    def __init__(self, spec: BlockSpec, bn_eps: float = 1e-5):
        super().__init__()
        self.name = spec.name
        self.stride = spec.stride
        self.main = nn.Sequential(*[m for conv in spec.main for m in conv.build(bn_eps)])
        self.proj = (nn.Sequential(*[m for conv in spec.proj for m in conv.build(bn_eps)])
                     if spec.proj else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            keep, x = split_channels(x)
            return torch.cat((keep, self.main(x)), 1)
        return torch.cat((self.proj(x), self.main(x)), 1)
