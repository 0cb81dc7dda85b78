"""Built-in data sets: small real image sets that ship inside a package we already depend on,
turned into a shard set in the local cache on first use by the same writer as ImageNet, and read
back by the same `read_parquet` + decode path.

`builtin:digits` -- scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1797
images, 8x8, 10 classes "0".."9"). Each image is stored as an 8-bit grayscale PNG with pixel
value round(v * 255 / 16) (the originals are 0..16) and decoded to 3 identical channels like every
image. Fixed split by position in `load_digits()`: train = samples 0..1499 (1500 images),
val = samples 1500..1796 (297 images). Keys are "<digit>/<position:04d>.png". Upscale it (e.g.
`image_size: 32`) and prefer mild crops (`crop_scale: [0.5, 1.0]`) and no flips (`hflip: false`).

Cache: `$RAYDSNAS_CACHE/builtin/<name>-v<version>/`, else `$XDG_CACHE_HOME/raydsnas/...`, else
`~/.cache/raydsnas/...`. It is built in a temporary folder and renamed into place, so concurrent
first uses never see half a set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN_PREFIX = "builtin:"
DIGITS_TRAIN_SAMPLES = 1500
DIGITS_SHARD_SIZE = 250


def cache_root() -> Path:
    """The raydsnas cache folder (see the module docstring)."""
    if os.environ.get("RAYDSNAS_CACHE"):
        return Path(os.environ["RAYDSNAS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "raydsnas"


def write_digits_folders(train_dir: Path, val_dir: Path) -> None:
    """Write scikit-learn's digits as PNG files in ImageNet-style folders <dir>/<digit>/<i>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for position, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = (train_dir if position < DIGITS_TRAIN_SAMPLES else val_dir) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{position:04d}.png")


def _build_digits(shard_dir: Path, work_dir: Path) -> None:
    from raydsnas.data.writer import write_shards

    train_dir, val_dir = work_dir / "train", work_dir / "val"
    write_digits_folders(train_dir, val_dir)
    write_shards(
        str(train_dir),
        str(shard_dir),
        val_src=str(val_dir),
        shard_size=DIGITS_SHARD_SIZE,
        seed=0,
        use_ray=False,  # 1797 tiny files: faster here, and the cache is on this node anyway
    )


# name -> (format version of the built set, builder(shard_dir, scratch_dir))
BUILTIN_SETS: dict[str, tuple[int, Callable[[Path, Path], None]]] = {
    "digits": (1, _build_digits),
}


def builtin_shard_set(name: str) -> str:
    """The local path of the shard set of `builtin:<name>`, built on first use."""
    version, build = BUILTIN_SETS[name]
    target = cache_root() / "builtin" / f"{name}-v{version}"
    if (target / "_manifest.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(scratch / "shards", scratch / "images")
        try:
            os.rename(scratch / "shards", target)
        except OSError:
            # Another process finished first; its set is identical, keep it.
            if not (target / "_manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)
