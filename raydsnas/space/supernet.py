"""The supernet: every candidate of every layer, one path run per call.

A child's state dict is the supernet's, restricted to the chosen candidates and renamed
(`layers.<l>.<choice_name>.` -> `blocks.<l>.`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raydsnas.space.blocks import ChoiceBlock
from raydsnas.space.child import ChildNet, Head, build_stem
from raydsnas.space.space import Arch, SearchSpace


class _MarkCost(torch.autograd.Function):
    """Identity in the forward pass; in the backward pass `one` receives `sum(grad * x)`.

    This is `x * one` with `one == 1` (the DSNAS "dummy 1"), without the extra activation a
    real multiply would keep alive: the saved tensor is the block output itself.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_one = None
        if ctx.needs_input_grad[1]:
            # One product and a float32-accumulated sum: under bf16 no full-size casts (each
            # product is rounded to bf16 once; the sum over ~10^7 of them is fp32).
            dtype = torch.promote_types(x.dtype, torch.float32)
            grad_one = torch.mul(grad, x).sum(dtype=dtype)
        return grad, grad_one


def mark_cost(x: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """Multiply `x` by the dummy scalar `one` (value 1): `one.grad` becomes dL/d(one)."""
    return _MarkCost.apply(x, one)


class Supernet(nn.Module):
    """All candidates of every layer; `forward(x, path)` runs only `path[l]` in layer l.

    `layers[l]` is an `nn.ModuleDict` keyed by choice name; `prune(l, k)` drops every other
    candidate of that layer for good (its parameters leave `parameters()`).
    """

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.stem = build_stem(space)
        self.layers = nn.ModuleList(
            nn.ModuleDict({spec.name: ChoiceBlock(spec, space.bn_eps) for spec in candidates})
            for candidates in space.layer_specs()
        )
        self.head = Head(space)

    def forward(self, x: torch.Tensor, path: Sequence[int],
                ones: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        names = self.space.choices
        x = self.stem(x)
        for l, (layer, k) in enumerate(zip(self.layers, path, strict=True)):
            x = layer[names[k]](x)
            if ones is not None and ones[l] is not None:
                x = mark_cost(x, ones[l])
        return self.head(x)

    def available(self, layer: int) -> list[int]:
        """Choice indices still present in `layer`."""
        return [self.space.choices.index(name) for name in self.layers[layer].keys()]

    def candidate_parameters(self, layer: int, choice: int) -> list[nn.Parameter]:
        return list(self.layers[layer][self.space.choices[choice]].parameters())

    def prune(self, layer: int, keep: int) -> list[nn.Parameter]:
        """Drop every candidate of `layer` but `keep`; returns the parameters that left."""
        keep_name = self.space.choices[keep]
        removed = []
        for name in list(self.layers[layer].keys()):
            if name != keep_name:
                removed.extend(self.layers[layer][name].parameters())
                del self.layers[layer][name]
        return removed

    def child_state_dict(self, arch: Arch) -> dict[str, torch.Tensor]:
        """The state dict of `ChildNet(space, arch)`, taken from this supernet's tensors."""
        arch = self.space.validate_arch(arch)
        for l, k in enumerate(arch):
            if self.space.choices[k] not in self.layers[l]:
                raise ValueError(f"arch {arch}: layer {l}'s candidate {self.space.choices[k]} "
                                 f"was pruned when the layer froze on {list(self.layers[l])}")
        state = {}
        for key, value in self.state_dict().items():
            if key.startswith("layers."):
                _, l, name, rest = key.split(".", 3)
                if name != self.space.choices[arch[int(l)]]:
                    continue
                key = f"blocks.{l}.{rest}"
            state[key] = value
        return state

    def extract_child(self, arch: Arch) -> ChildNet:
        """A standalone `ChildNet` with copies of this supernet's weights for `arch`."""
        child = ChildNet(self.space, arch)
        state = {k: v.detach().clone() for k, v in self.child_state_dict(arch).items()}
        child.load_state_dict(state, strict=True)
        return child.to(next(self.parameters()).device)
