"""Search strategies over a `SearchSpace`: DSNAS and, beside it, the baselines.

`STRATEGIES` is the registry that `search.strategy` selects from: name -> `Strategy` (its
config dataclass, its class, and what a step costs in activations). Every strategy is a
`raydsnas.strategies.base.SupernetTrainer` and satisfies `SearchStrategy`; its config extends
`TrainingConfig`. Adding a strategy: its own module, and one line here.
"""

from dataclasses import dataclass
from typing import Any

from raydsnas.strategies.base import SearchStrategy, StepStats, SupernetTrainer, TrainingConfig
from raydsnas.strategies.collective import (
    Collective,
    LocalCollective,
    TorchDistributedCollective,
    default_collective,
)
from raydsnas.strategies.dsnas import DSNAS, DSNASConfig, dsnas_alpha_grad
from raydsnas.strategies.fixed import FixedArchitecture, FixedConfig, resolve_arch
from raydsnas.strategies.proxyless import ProxylessConfig, ProxylessNAS
from raydsnas.strategies.snas import SNAS, SNASConfig
from raydsnas.strategies.spos import SPOS, RandomSearch, RandomSearchConfig, SPOSConfig


@dataclass(frozen=True)
class Strategy:
    """One entry of the registry.

    Attributes:
        config: the config dataclass (a `TrainingConfig`): the strategy's `search` keys.
        cls: the strategy class, built as `cls(space, config, device=..., collective=...)`.
        paths_per_step: the activations one step holds, in paths: 1 (a single path), 2
            (ProxylessNAS's two sampled candidates) or `"all"` (SNAS runs every candidate);
            preflight's memory estimate reads it.
    """

    config: type[TrainingConfig]
    cls: type[SupernetTrainer]
    paths_per_step: int | str = 1


STRATEGIES: dict[str, Strategy] = {
    "dsnas": Strategy(DSNASConfig, DSNAS),
    "snas": Strategy(SNASConfig, SNAS, paths_per_step="all"),
    "proxyless": Strategy(ProxylessConfig, ProxylessNAS, paths_per_step=2),
    "spos": Strategy(SPOSConfig, SPOS),
    "random": Strategy(RandomSearchConfig, RandomSearch),
    "fixed": Strategy(FixedConfig, FixedArchitecture),
}


def build_strategy(name: str, space, config: Any, *, device="cpu",
                   collective: Collective | None = None) -> SearchStrategy:
    """The strategy `name` (a key of `STRATEGIES`) over `space` with its `config`."""
    if name not in STRATEGIES:
        raise ValueError(f"search.strategy = {name!r} is not allowed; expected one of "
                         f"{list(STRATEGIES)}")
    return STRATEGIES[name].cls(space, config, device=device, collective=collective)


__all__ = [
    "DSNAS",
    "SNAS",
    "SPOS",
    "STRATEGIES",
    "Strategy",
    "Collective",
    "DSNASConfig",
    "FixedArchitecture",
    "FixedConfig",
    "LocalCollective",
    "ProxylessConfig",
    "ProxylessNAS",
    "RandomSearch",
    "RandomSearchConfig",
    "SNASConfig",
    "SPOSConfig",
    "SearchStrategy",
    "StepStats",
    "SupernetTrainer",
    "TorchDistributedCollective",
    "TrainingConfig",
    "build_strategy",
    "default_collective",
    "dsnas_alpha_grad",
    "resolve_arch",
]
