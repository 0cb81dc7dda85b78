"""raydsnas: DSNAS (discrete stochastic neural architecture search) at cluster scale on Ray.

Public API:
- `SearchSpace`: the ShuffleNetV2 single-path space (`SearchSpace.imagenet()`, `.cifar()`),
  its FLOPs/params tables, `supernet()` and `child(arch)`;
- `DSNAS`, `DSNASConfig`: the search strategy (one sampled path per step, progressive early stop);
- `save_child`, `load_child`: the deployable artifact (arch.json + safetensors + torch.export).
"""

__version__ = "0.1.0"

import importlib
from typing import Any

# Imported on first use, not with the package: `python -m raydsnas.export` imports the package
# before it runs the module, and an eager import here would load `raydsnas.export` twice (runpy
# warns); `import raydsnas` also stays free of torch.
_PUBLIC = {
    "DSNAS": "raydsnas.strategies.dsnas",
    "DSNASConfig": "raydsnas.strategies.dsnas",
    "SearchSpace": "raydsnas.space",
    "load_child": "raydsnas.export",
    "save_child": "raydsnas.export",
}

__all__ = ["DSNAS", "DSNASConfig", "SearchSpace", "__version__", "load_child", "save_child"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'raydsnas' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
