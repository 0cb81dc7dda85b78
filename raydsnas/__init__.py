"""raydsnas: DSNAS (discrete stochastic neural architecture search) at cluster scale on Ray.

Public API:
- `SearchSpace`: the ShuffleNetV2 single-path space (`SearchSpace.imagenet()`, `.cifar()`),
  its FLOPs/params tables, `supernet()` and `child(arch)`;
- `DSNAS`, `DSNASConfig`: the search strategy (one sampled path per step, progressive early stop);
- `save_child`, `load_child`: the deployable artifact (arch.json + safetensors + torch.export).
"""

__version__ = "0.1.0"

from raydsnas.export import load_child, save_child
from raydsnas.space import SearchSpace
from raydsnas.strategies.dsnas import DSNAS, DSNASConfig

__all__ = ["DSNAS", "DSNASConfig", "SearchSpace", "__version__", "load_child", "save_child"]
