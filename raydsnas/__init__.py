"""raydsnas: DSNAS (discrete stochastic neural architecture search) at cluster scale on Ray."""

from raydsnas.space import SearchSpace

__version__ = "0.1.0"

__all__ = ["SearchSpace", "__version__"]
