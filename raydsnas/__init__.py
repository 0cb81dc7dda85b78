"""raydsnas: DSNAS (discrete stochastic neural architecture search) at cluster scale on Ray.

Public API:
- `SearchSpace`: the ShuffleNetV2 single-path space (`SearchSpace.imagenet()`, `.cifar()`),
  its FLOPs/params tables, `supernet()` and `child(arch)`;
- `DSNAS`, `DSNASConfig`: the search strategy (one sampled path per step, progressive early stop);
- `save_child`, `load_child`: the deployable artifact (arch.json + safetensors + torch.export).

Names are imported on first use, so `from raydsnas import load_child` (serving) imports the
artifact reader and the child network only: no supernet, no search strategy, no Ray; and
`python -m raydsnas.export` does not import `raydsnas.export` twice (runpy would warn).
"""

from importlib import import_module

__version__ = "0.1.0"

_HOMES = {"load_child": "raydsnas.export", "save_child": "raydsnas.export",
          "SearchSpace": "raydsnas.space", "DSNAS": "raydsnas.strategies.dsnas",
          "DSNASConfig": "raydsnas.strategies.dsnas"}

__all__ = ["DSNAS", "DSNASConfig", "SearchSpace", "__version__", "load_child", "save_child"]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'raydsnas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
