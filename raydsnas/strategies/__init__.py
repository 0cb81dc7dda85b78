"""Search strategies over a `SearchSpace`: DSNAS and, beside it, the baselines.

`STRATEGIES` is the registry that `search.strategy` selects from: name -> (config dataclass,
strategy class). Every strategy satisfies `raydsnas.strategies.base.SearchStrategy`.
"""

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

STRATEGIES: dict[str, tuple[type, type]] = {
    "dsnas": (DSNASConfig, DSNAS),
    "snas": (SNASConfig, SNAS),
    "proxyless": (ProxylessConfig, ProxylessNAS),
    "spos": (SPOSConfig, SPOS),
    "random": (RandomSearchConfig, RandomSearch),
    "fixed": (FixedConfig, FixedArchitecture),
}


def build_strategy(name: str, space, config: Any, *, device="cpu",
                   collective: Collective | None = None) -> SearchStrategy:
    """The strategy `name` (a key of `STRATEGIES`) over `space` with its `config`."""
    if name not in STRATEGIES:
        raise ValueError(f"search.strategy = {name!r} is not allowed; expected one of "
                         f"{list(STRATEGIES)}")
    return STRATEGIES[name][1](space, config, device=device, collective=collective)


__all__ = [
    "DSNAS",
    "SNAS",
    "SPOS",
    "STRATEGIES",
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
