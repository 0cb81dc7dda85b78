"""`builtin:shapes`: the generator is deterministic, its splits are disjoint and balanced, and the
built shard set holds exactly the generated pixels."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydsnas.analysis import load_data
from raydsnas.data.builtin import (
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    builtin_shard_set,
    shapes_arrays,
    shapes_image,
    shapes_keys,
    write_shapes_folders,
)
from raydsnas.data.format import read_manifest
from raydsnas.data.pipeline import normalize


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits, generated once for the module (a few seconds)."""
    return {split: shapes_arrays(split) for split in SHAPES_SPLITS}


def pixel_hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in images}


def test_generating_the_set_again_gives_the_same_bytes(shapes):
    val, val_labels = shapes_arrays("val")
    assert hashlib.sha256(val.tobytes()).digest() == \
        hashlib.sha256(shapes["val"][0].tobytes()).digest()
    np.testing.assert_array_equal(val_labels, shapes["val"][1])
    # An image drawn alone is the one of its split, whatever was drawn before it (every 97th of
    # train: the whole split again would take as long as the fixture).
    _, first, count = SHAPES_SPLITS["train"]
    for index in range(first + count - 1, first, -97):
        again = shapes_image("train", index)
        np.testing.assert_array_equal(again, shapes["train"][0][index - first])


def test_png_files_are_the_same_bytes_on_every_write(tmp_path, monkeypatch):
    # Two small splits (the split table is data), written twice into separate folders.
    monkeypatch.setitem(SHAPES_SPLITS, "train", (0, 0, 48))
    monkeypatch.setitem(SHAPES_SPLITS, "val", (1, 48, 24))
    digests = []
    for name in ("a", "b"):
        write_shapes_folders(tmp_path / name / "train", tmp_path / name / "val")
        files = sorted((tmp_path / name).rglob("*.png"))
        assert len(files) == 72
        digests.append({str(f.relative_to(tmp_path / name)): hashlib.sha256(f.read_bytes()).digest()
                        for f in files})
    assert digests[0] == digests[1]
    images, _ = shapes_arrays("val")
    for image, key in zip(images, shapes_keys("val"), strict=True):
        with Image.open(tmp_path / "a" / "val" / key) as png:
            assert png.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(png), image)


def test_train_and_val_share_no_key_and_no_image(shapes):
    assert not set(shapes_keys("train")) & set(shapes_keys("val"))
    train_hashes, val_hashes = pixel_hashes(shapes["train"][0]), pixel_hashes(shapes["val"][0])
    assert len(train_hashes) == len(shapes["train"][0])  # no duplicate inside a split either
    assert len(val_hashes) == len(shapes["val"][0])
    assert not train_hashes & val_hashes


def test_splits_are_large_and_every_class_is_equally_common(shapes):
    assert len(SHAPES_CLASSES) >= 20 and len(set(SHAPES_CLASSES)) == len(SHAPES_CLASSES)
    assert list(SHAPES_CLASSES) == sorted(SHAPES_CLASSES)  # the writer's label order
    (train, train_labels), (val, val_labels) = shapes["train"], shapes["val"]
    assert train.shape == (12_000, 16, 16, 3) and train.dtype == np.uint8
    assert val.shape == (2_400, 16, 16, 3) and val.dtype == np.uint8
    assert np.bincount(train_labels, minlength=24).tolist() == [500] * 24
    assert np.bincount(val_labels, minlength=24).tolist() == [100] * 24
    for split, (_, labels) in shapes.items():
        assert [key.split("/")[0] for key in shapes_keys(split)] == \
            [SHAPES_CLASSES[label] for label in labels]


def test_colour_does_not_reveal_the_class(shapes):
    # The mean colour of an image is about the same for every class (the spread of the class
    # means is what 500 draws of one distribution give, far below the spread between images).
    images, labels = shapes["train"]
    means = images.reshape(len(images), -1, 3).mean(axis=1)
    class_means = np.stack([means[labels == c].mean(axis=0) for c in range(24)])
    assert (class_means.std(axis=0) < 3 * means.std(axis=0) / np.sqrt(500)).all()


@pytest.mark.slow
def test_builtin_shapes_builds_a_shard_set_holding_the_generated_pixels(builtin_cache):
    root = builtin_shard_set("shapes")
    assert Path(root).parent == builtin_cache / "builtin"
    manifest = read_manifest(pafs.LocalFileSystem(), root, root)
    assert manifest.classes == SHAPES_CLASSES
    assert manifest.splits["train"].class_counts == (500,) * 24
    assert manifest.splits["val"].class_counts == (100,) * 24
    assert manifest.shard_size == 1000 and len(manifest.splits["train"].shards) == 12

    # The in-memory loader holds exactly the pixels of the shards' PNGs.
    data = load_data("builtin:shapes", 16, 64)
    position = {key: i for i, key in enumerate(shapes_keys("val"))}
    table = pq.read_table(Path(root) / manifest.splits["val"].shards[0].path)
    for png, label, key in zip(table["image"].to_pylist(), table["label"].to_pylist(),
                               table["key"].to_pylist(), strict=True):
        with Image.open(io.BytesIO(png)) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        i = position[key]
        assert label == data.val_labels[i] == SHAPES_CLASSES.index(key.split("/")[0])
        assert torch.equal(normalize(pixels[None])[0], data.val_images[i])
    assert builtin_shard_set("shapes") == root  # cached, not rebuilt
