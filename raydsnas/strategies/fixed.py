"""`search.strategy: fixed`: train one given architecture alone, through the same job, data,
loop and recipe as a search.

What users run to train a found network longer or on more data, and the honest "trained alone"
baseline of a search: the same weight recipe (SGD, warm-up + cosine over `search.epochs`, label
smoothing), the same data pipeline, checkpoints, export and report. The supernet is pruned to
`search.arch` before the first step, so the step and the memory are the child's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raydsnas.space import SearchSpace
from raydsnas.strategies.base import StepStats, SupernetTrainer, TrainingConfig
from raydsnas.strategies.collective import Collective


def resolve_arch(space: SearchSpace, arch: Sequence[int | str] | None) -> list[int]:
    """`search.arch` as choice indices: one entry per layer of `space`, each an index
    `0..n-1` or a choice name (`choice_3`, ... as `subnet/arch.json` lists them)."""
    if arch is None:
        raise ValueError("search.arch = null is not allowed with search.strategy = 'fixed'; "
                         f"expected {space.num_layers} choices (indices 0..{space.num_choices - 1}"
                         f" or names {list(space.choices)}), e.g. the 'arch' of a run's "
                         "subnet/arch.json")
    if isinstance(arch, (str, bytes)) or not isinstance(arch, Sequence):
        raise ValueError(f"search.arch = {arch!r} is not allowed; expected a list of "
                         f"{space.num_layers} choices")
    if len(arch) != space.num_layers:
        raise ValueError(f"search.arch = {list(arch)!r} is not allowed: it has {len(arch)} "
                         f"entries and this space has {space.num_layers} layers "
                         f"(space.stage_repeats = {list(space.stage_repeats)})")
    out = []
    for layer, choice in enumerate(arch):
        if isinstance(choice, str) and choice in space.choices:
            out.append(space.choices.index(choice))
        elif isinstance(choice, int) and not isinstance(choice, bool) \
                and 0 <= choice < space.num_choices:
            out.append(choice)
        else:
            raise ValueError(f"search.arch = {list(arch)!r} is not allowed: layer {layer} is "
                             f"{choice!r}; expected an index 0..{space.num_choices - 1} or one "
                             f"of {list(space.choices)}")
    return out


@dataclass
class FixedConfig(TrainingConfig):
    """One architecture trained alone (the weight recipe is DSNAS's, same keys and defaults).

    Attributes:
        arch: the architecture: one choice per layer, as indices (`[0, 3, 1, ...]`) or names
            (`[choice_3, choice_x, ...]`), e.g. the `arch` of a run's `subnet/arch.json`.
    """

    arch: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arch is not None:
            self.arch = tuple(self.arch)

    def check_space(self, space: SearchSpace) -> None:
        resolve_arch(space, self.arch)


class FixedArchitecture(SupernetTrainer):
    """The supernet pruned to `config.arch`, trained with single-path steps on that path."""

    name = "fixed"

    def __init__(self, space: SearchSpace, config: FixedConfig | None = None, *,
                 device: torch.device | str = "cpu", collective: Collective | None = None):
        config = config or FixedConfig()
        arch = resolve_arch(space, config.arch)
        super().__init__(space, config, device=device, collective=collective)
        self.arch = arch
        for layer, choice in enumerate(arch):
            self.supernet.prune(layer, choice)
        self.frozen = dict(enumerate(arch))
        self._build_weight_optimizer(config.total_steps, config.warmup_steps)

    def probs(self) -> torch.Tensor:
        return nn.functional.one_hot(torch.tensor(self.arch), self.space.num_choices).float()

    def argmax_arch(self) -> list[int]:
        return list(self.arch)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """One step of plain training: forward, backward, gradients averaged over ranks, SGD."""
        loss, logits = self._path_step(images, labels, self.arch)
        self.step_count += 1
        return self._stats(loss, logits, labels, self.arch, searching=False)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "arch": list(self.arch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("arch", [])) != self.arch:
            raise ValueError(f"checkpoint trained search.arch = {state.get('arch')}, this run "
                             f"asks for {self.arch}; use a new run name for another "
                             "architecture")
        super().load_state_dict(state)
