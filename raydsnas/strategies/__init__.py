"""Search strategies over a `SearchSpace`: DSNAS (and, beside it, the baselines)."""

from raydsnas.strategies.collective import (
                                            Collective,
                                            LocalCollective,
                                            TorchDistributedCollective,
                                            default_collective,
)
from raydsnas.strategies.dsnas import DSNAS, DSNASConfig, StepStats, dsnas_alpha_grad

__all__ = ["DSNAS", "Collective", "DSNASConfig", "LocalCollective", "StepStats",
           "TorchDistributedCollective", "default_collective", "dsnas_alpha_grad"]
