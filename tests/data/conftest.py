"""Fixtures of the data tests: small generated ImageNet-style folders and a private cache."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write SRC/<class>/<image> with random pixels and return SRC.

    Images per class alternate RGB PNG, grayscale PNG and RGB JPEG, all `size` x `size`, so the
    validation transform with val_crop_ratio=1 returns them unchanged."""

    def make(
        name: str = "src",
        classes: tuple[str, ...] = ("cat", "dog", "emu"),
        per_class: int = 5,
        size: int = 16,
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for class_name in classes:
            (root / class_name).mkdir(parents=True)
            for i in range(per_class):
                kind = i % 3
                if kind == 1:
                    data = encode_image(rng.integers(0, 256, (size, size), dtype=np.uint8), "PNG")
                    filename = f"img{i}.png"
                else:
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    fmt = "PNG" if kind == 0 else "JPEG"
                    data = encode_image(pixels, fmt)
                    filename = f"img{i}.{'png' if kind == 0 else 'JPEG'}"
                (root / class_name / filename).write_bytes(data)
        (root / "README.txt").write_text("not an image, not in a class folder")
        return root

    return make


def decoded_rgb(path: Path) -> np.ndarray:
    """The reference pixels of an image file: PIL's decode, as 3-channel CHW."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> Iterator[Path]:
    """A private RAYDSNAS_CACHE for the session, so the built-in set is built from scratch here."""
    cache = tmp_path_factory.mktemp("raydsnas-cache")
    saved = os.environ.get("RAYDSNAS_CACHE")
    os.environ["RAYDSNAS_CACHE"] = str(cache)
    yield cache
    if saved is None:
        os.environ.pop("RAYDSNAS_CACHE", None)
    else:
        os.environ["RAYDSNAS_CACHE"] = saved


@pytest.fixture
def reference_pixels() -> Callable[[Path], np.ndarray]:
    """`decoded_rgb` as a fixture (test modules cannot import conftest helpers)."""
    return decoded_rgb
