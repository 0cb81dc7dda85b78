"""The SPOS/DSNAS ShuffleNetV2 search space: configuration, layer specs and cost tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import torch

from raydsnas.checks import check, check_known
from raydsnas.space.blocks import CHOICE_NAMES, BlockSpec, ConvBN, choice_spec

Arch = Sequence[int]
LEGACY_BN_EPS = 1e-5  # every BatchNorm's epsilon before `SearchSpace.bn_eps` existed


@dataclass(frozen=True)
class CostTable:
    """Cost of a network = `fixed` (stem, head, classifier) + one entry per layer for its choice.

    `per_layer[l][k]` is the cost of candidate k in choice layer l.
    """

    fixed: int
    per_layer: tuple[tuple[int, ...], ...]

    def total(self, arch: Arch) -> int:
        return self.fixed + sum(row[k] for row, k in zip(self.per_layer, arch, strict=True))

    def as_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor(self.per_layer, dtype=dtype)

    def smallest(self) -> list[int]:
        return [min(range(len(row)), key=row.__getitem__) for row in self.per_layer]

    def largest(self) -> list[int]:
        return [max(range(len(row)), key=row.__getitem__) for row in self.per_layer]


def _scaled(channels: int, width_mult: float) -> int:
    """Channels times the width multiplier, rounded to a multiple of 4 (channel split needs even)."""
    return max(4, int(round(channels * width_mult / 4)) * 4)


@dataclass(frozen=True)
class SearchSpace:
    """The single-path ShuffleNetV2 supernet's search space (SPOS / DSNAS).

    Defaults are the ImageNet space of the paper: 224x224 input, stem 3x3 s2 -> 16, stages
    [4, 4, 8, 4] with 64/160/320/640 channels, head 1x1 -> 1024, 4 candidates per layer.

    Attributes:
        num_classes: classifier outputs.
        input_size: side of the square input images (must match `data.image_size`).
        width_mult: multiplies every channel count (rounded to multiples of 4); 0.5 halves
            the network's width, a quarter of its FLOPs.
        stage_repeats: choice layers per stage; their sum is the number of searched layers
            (20 in the paper).
        stage_channels: output channels of each stage (before `width_mult`).
        stem_channels: channels of the 3x3 stem convolution.
        head_channels: channels of the final 1x1 convolution before pooling.
        stem_stride: 2 for ImageNet-sized inputs, 1 for 32x32 (keeps resolution).
        dropout: dropout before the classifier.
        in_channels: input image channels.
        choices: the candidate blocks of every layer, a subset of `choice_3`, `choice_5`,
            `choice_7` (ShuffleNetV2 blocks with 3x3/5x5/7x7 depthwise kernels) and
            `choice_x` (the Xception-like block of three 3x3 depthwise convolutions).
        bn_eps: epsilon of every BatchNorm. 1e-2 is the DSNAS reference code's value (PyTorch's
            default is 1e-5): in training mode BatchNorm undoes a rescaling of a block's output
            wherever the next convolution sees every channel scaled alike, so the search's
            credit `dL/d(one_l)` of such layers comes only from epsilon; a larger epsilon makes
            it real. The exported child keeps the value it was trained with.
    """

    num_classes: int = 1000
    input_size: int = 224
    width_mult: float = 1.0
    stage_repeats: tuple[int, ...] = (4, 4, 8, 4)
    stage_channels: tuple[int, ...] = (64, 160, 320, 640)
    stem_channels: int = 16
    head_channels: int = 1024
    stem_stride: int = 2
    dropout: float = 0.1
    in_channels: int = 3
    choices: tuple[str, ...] = CHOICE_NAMES
    bn_eps: float = 1e-2

    def __post_init__(self) -> None:
        # Accept lists from YAML/JSON; store tuples so the space stays hashable and printable.
        for name in ("stage_repeats", "stage_channels", "choices"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(self.num_classes >= 1, "num_classes", self.num_classes, "an integer >= 1")
        _check(self.input_size >= 8, "input_size", self.input_size, "an integer >= 8")
        _check(0 < self.width_mult <= 4, "width_mult", self.width_mult, "a number in (0, 4]")
        _check(len(self.stage_repeats) >= 1 and all(r >= 1 for r in self.stage_repeats),
               "stage_repeats", self.stage_repeats, "a non-empty list of integers >= 1")
        _check(len(self.stage_channels) == len(self.stage_repeats), "stage_channels",
               self.stage_channels, f"one entry per stage ({len(self.stage_repeats)})")
        _check(self.stem_stride in (1, 2), "stem_stride", self.stem_stride, "1 or 2")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        _check(len(self.choices) >= 1 and set(self.choices) <= set(CHOICE_NAMES)
               and len(set(self.choices)) == len(self.choices),
               "choices", self.choices, f"distinct names from {list(CHOICE_NAMES)}")
        channels = [self.stem_c, *self.stage_c]
        for stage, (cin, cout) in enumerate(zip(channels, channels[1:])):
            _check(cout > cin, "stage_channels", self.stage_channels,
                   f"channels that grow from stage to stage (stage {stage}: {cin} -> {cout})")

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def imagenet(cls, num_classes: int = 1000) -> SearchSpace:
        """The paper's space: 224x224, 20 layers x 4 candidates."""
        return cls(num_classes=num_classes)

    @classmethod
    def cifar(cls, num_classes: int = 10, width_mult: float = 1.0,
              stage_repeats: Sequence[int] = (4, 4, 8, 4)) -> SearchSpace:
        """The same space for 32x32 inputs: stem stride 1 (32 -> 16 -> 8 -> 4 -> 2), no dropout."""
        return cls(num_classes=num_classes, input_size=32, width_mult=width_mult,
                   stage_repeats=tuple(stage_repeats), stem_stride=1, dropout=0.0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """The space of a config or a record. A record written before `bn_eps` existed
        (no such key) was trained with PyTorch's default, 1e-5."""
        check_known("space", data, sorted(f.name for f in fields(cls) if f.init))
        return cls(**{"bn_eps": LEGACY_BN_EPS, **data})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    # -- shape ---------------------------------------------------------------------------------
    @property
    def stem_c(self) -> int:
        return _scaled(self.stem_channels, self.width_mult)

    @property
    def stage_c(self) -> tuple[int, ...]:
        return tuple(_scaled(c, self.width_mult) for c in self.stage_channels)

    @property
    def head_c(self) -> int:
        return _scaled(self.head_channels, self.width_mult)

    @property
    def num_layers(self) -> int:
        return sum(self.stage_repeats)

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def choice_names(self) -> tuple[str, ...]:
        return self.choices

    def stem_spec(self) -> ConvBN:
        return ConvBN(self.in_channels, self.stem_c, 3, self.stem_stride)

    def head_spec(self) -> ConvBN:
        return ConvBN(self.stage_c[-1], self.head_c, 1)

    def layer_specs(self) -> list[list[BlockSpec]]:
        """`[layer][choice]` block specs; the first layer of each stage has stride 2."""
        return self._layer_specs

    @cached_property
    def _layer_specs(self) -> list[list[BlockSpec]]:
        specs, cin = [], self.stem_c
        for repeats, cout in zip(self.stage_repeats, self.stage_c):
            for i in range(repeats):
                stride = 2 if i == 0 else 1
                specs.append([choice_spec(name, cin, cout, stride) for name in self.choices])
                cin = cout
        return specs

    # -- cost ----------------------------------------------------------------------------------
    @cached_property
    def _tables(self) -> tuple[CostTable, CostTable]:
        stem_f, stem_p, size = self.stem_spec().cost(self.input_size)
        flops_rows, params_rows = [], []
        for candidates in self.layer_specs():
            costs = [spec.cost(size) for spec in candidates]
            flops_rows.append(tuple(c[0] for c in costs))
            params_rows.append(tuple(c[1] for c in costs))
            size = costs[0][2]
        head_f, head_p, _ = self.head_spec().cost(size)
        fc_f = self.head_c * self.num_classes
        fc_p = fc_f + self.num_classes
        return (CostTable(stem_f + head_f + fc_f, tuple(flops_rows)),
                CostTable(stem_p + head_p + fc_p, tuple(params_rows)))

    def flops_table(self) -> CostTable:
        """Multiply-adds of every conv and the classifier (BN, ReLU, pooling not counted)."""
        return self._tables[0]

    def params_table(self) -> CostTable:
        """Learnable parameters (conv and linear weights, linear bias, BN weight and bias)."""
        return self._tables[1]

    def flops(self, arch: Arch) -> int:
        return self.flops_table().total(self.validate_arch(arch))

    def params(self, arch: Arch) -> int:
        return self.params_table().total(self.validate_arch(arch))

    def validate_arch(self, arch: Arch) -> list[int]:
        arch = [int(k) for k in arch]
        if len(arch) != self.num_layers:
            raise ValueError(f"arch has {len(arch)} entries; this space has {self.num_layers} layers")
        bad = [(i, k) for i, k in enumerate(arch) if not 0 <= k < self.num_choices]
        if bad:
            raise ValueError(f"arch entries out of range (layer, choice) {bad}; "
                             f"allowed choices 0..{self.num_choices - 1} = {list(self.choices)}")
        return arch

    def arch_names(self, arch: Arch) -> list[str]:
        return [self.choices[k] for k in self.validate_arch(arch)]

    def num_archs(self) -> int:
        return self.num_choices ** self.num_layers

    def log10_num_archs(self) -> float:
        return self.num_layers * math.log10(self.num_choices)

    # -- modules -------------------------------------------------------------------------------
    def supernet(self):
        """A fresh `Supernet` with every candidate of every layer."""
        from raydsnas.space.supernet import Supernet

        return Supernet(self)

    def child(self, arch: Arch):
        """A fresh `ChildNet`: a plain module with only the chosen blocks."""
        from raydsnas.space.child import ChildNet

        return ChildNet(self, arch)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    check(ok, f"space.{key}", value, allowed)
