"""The child network: one ShuffleNetV2 block per layer, the deployable result of a search.

Importing this module does not import the supernet: a deployed model needs only this file,
`blocks.py` and `space.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from raydsnas.space.blocks import ChoiceBlock
from raydsnas.space.space import Arch, SearchSpace


class Head(nn.Module):
    """conv1x1 -> BN -> ReLU -> global average pool -> dropout -> linear."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.conv = nn.Sequential(*space.head_spec().build(space.bn_eps))
        self.dropout = nn.Dropout(space.dropout) if space.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(space.head_c, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return self.classifier(self.dropout(x))


def build_stem(space: SearchSpace) -> nn.Sequential:
    return nn.Sequential(*space.stem_spec().build(space.bn_eps))


class ChildNet(nn.Module):
    """A plain ShuffleNetV2 with one block per layer; `arch` says which candidate each is."""

    def __init__(self, space: SearchSpace, arch: Arch):
        super().__init__()
        self.space = space
        self.arch = space.validate_arch(arch)
        specs = space.layer_specs()
        self.stem = build_stem(space)
        self.blocks = nn.Sequential(*(ChoiceBlock(specs[l][k], space.bn_eps) for l, k in enumerate(self.arch)))
        self.head = Head(space)
        self.meta: dict = {}  # load_child: the artifact's metadata (top1, flops, ...)
        self.record: dict = {}  # load_child: the whole arch.json

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
