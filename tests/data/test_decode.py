"""Decoding on tensors (libjpeg-turbo + torch's antialiased bilinear resize) against the PIL path
it replaced, within the stated tolerance; `data.decode: gpu` (encoded batches + `DeviceDecoder`)
against `data.decode: cpu`."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydsnas.data import (
    CorruptImageError,
    DataSpec,
    DataSpecError,
    DeviceDecoder,
    build_datasets,
    is_encoded,
    iter_train_batches,
    write_shards,
)
from raydsnas.data.images import (
    RandomResizedCropFlip,
    ResizeCenterCrop,
    decode_rgb,
    resized_crop,
)
from tests.data.test_bad_data import rewrite_shard


def pil_train_crop(data: bytes, crop: RandomResizedCropFlip, rng) -> np.ndarray:
    """The old decode step's training crop: PIL decode, resize with a box, flip."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    box = crop.crop_box(*image.size, rng)
    image = image.resize((crop.size, crop.size), Image.Resampling.BILINEAR, box=box)
    if crop.hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image).transpose(2, 0, 1)


def pil_val_crop(data: bytes, crop: ResizeCenterCrop) -> np.ndarray:
    """The old validation transform: PIL resize of the shorter side, then the central crop."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    short = round(crop.size / crop.crop_ratio)
    if min(width, height) != short:
        if width <= height:
            width, height = short, int(short * height / width)
        else:
            width, height = int(short * width / height), short
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = round((width - crop.size) / 2), round((height - crop.size) / 2)
    return np.asarray(image.crop((left, top, left + crop.size, top + crop.size))).transpose(2, 0, 1)


def photo_like(rng, width: int, height: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.integers(-30, 31, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, kind: str) -> bytes:
    image = Image.fromarray(pixels)
    if kind == "gray-jpeg":
        image = image.convert("L")
    elif kind == "cmyk-jpeg":
        image = image.convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if kind == "png" else "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("kind", ["jpeg", "png", "gray-jpeg", "cmyk-jpeg"])
def test_crops_match_the_pil_path_within_one_level_away_from_the_crop_edge(size, kind):
    """The stated tolerance. Validation: every pixel within 1. Training: every pixel at least
    ceil(size / crop side) + 1 output pixels from the crop's edge within 1 (PIL's filter reads
    past the box into the rest of the image, torch's stops at the box, so the edge band
    differs: up to ~25 levels on noisy images), and the mean difference under 1 level."""
    rng = np.random.default_rng(size)
    train = RandomResizedCropFlip(size, (0.08, 1.0), (3 / 4, 4 / 3), hflip=True)
    val = ResizeCenterCrop(size, 0.875)
    means = []
    for i in range(12):
        width, height = (int(v) for v in rng.integers(size // 2 + 4, 2 * size, size=2))
        data = encode(photo_like(rng, width, height), kind)
        image = decode_rgb(data)
        assert image.shape == (3, height, width)

        old = pil_train_crop(data, train, np.random.default_rng(i)).astype(int)
        new = train(image, np.random.default_rng(i)).numpy().astype(int)
        left, top, right, bottom = train.crop_box(width, height, np.random.default_rng(i))
        mx, my = math.ceil(size / (right - left)) + 1, math.ceil(size / (bottom - top)) + 1
        assert np.abs(old - new)[:, my:-my, mx:-mx].max(initial=0) <= 1
        means.append(np.abs(old - new).mean())

        assert np.abs(pil_val_crop(data, val).astype(int) - val(image).numpy()).max() <= 1
    assert np.mean(means) < 1.0


def test_decode_rgb_gives_the_pixels_pil_gives():
    rng = np.random.default_rng(0)
    for kind in ("jpeg", "png", "gray-jpeg", "cmyk-jpeg"):
        data = encode(photo_like(rng, 40, 30), kind)
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(decode_rgb(data).numpy(), expected, err_msg=kind)


def test_undecodable_bytes_raise_what_pil_raises():
    data = encode(photo_like(np.random.default_rng(0), 40, 30), "jpeg")
    for bad in (b"\xff\xd8\xff\xe0 this is not a JPEG", data[: len(data) // 2], b"not an image"):
        with pytest.raises(OSError):
            decode_rgb(bad)


# --- data.decode: gpu, through real Ray and real shard files -------------------------------


def write_photo_folder(root: Path, kinds: dict[str, list[str]], seed: int = 0) -> Path:
    """SRC/<class>/<name>.<ext>, photo-like pixels of 40-90 px a side, one file per kind."""
    rng = np.random.default_rng(seed)
    for class_name, class_kinds in kinds.items():
        (root / class_name).mkdir(parents=True)
        for i, kind in enumerate(class_kinds):
            width, height = (int(v) for v in rng.integers(40, 91, size=2))
            suffix = "png" if kind == "png" else "jpg"
            (root / class_name / f"{kind}{i}.{suffix}").write_bytes(
                encode(photo_like(rng, width, height), kind))
    return root


KINDS = ["jpeg", "jpeg", "jpeg", "png", "gray-jpeg", "cmyk-jpeg"]


@pytest.fixture
def photo_shards(tmp_path) -> Path:
    src = write_photo_folder(tmp_path / "src", {"a": KINDS, "b": KINDS, "c": KINDS[:3]})
    dst = tmp_path / "shards"
    write_shards(str(src), str(dst), shard_size=4, val_src=str(src), use_ray=False)
    return dst


def kind_of(key: str) -> str:
    return Path(str(key)).stem.rstrip("0123456789")


def cpu_epoch(dataset) -> dict[str, np.ndarray]:
    return {str(key): image for batch in dataset.iter_batches(batch_size=5)
            for key, image in zip(batch["key"], batch["image"], strict=True)}


def device_epoch(dataset, spec: DataSpec, epoch: int, decoder: DeviceDecoder
                 ) -> dict[str, np.ndarray]:
    out = {}
    for batch in iter_train_batches(dataset, spec, epoch=epoch, batch_size=5, drop_last=False):
        assert is_encoded(batch) and isinstance(batch["encoded"][0], torch.Tensor)
        for key, plain in zip(batch["key"], batch["plain_jpeg"].tolist(), strict=True):
            assert plain == (kind_of(key) in ("jpeg", "gray-jpeg")), key  # CMYK, PNG: CPU
        decoded = decoder(batch)
        assert not is_encoded(decoded) and decoded["image"].device == decoder.device
        assert torch.equal(decoded["label"], batch["label"])
        out.update(zip((str(k) for k in decoded["key"]), decoded["image"].numpy(), strict=True))
    return out


def test_gpu_decode_on_a_cpu_device_gives_the_cpu_pipeline_pixels(ray_local, photo_shards):
    """The same crop boxes and flips for the same seed, epoch and key, drawn in the Ray Data
    task from the header alone. On a CPU device the decoder and resize are those of
    `decode: cpu`, so the tolerance is 0 (on CUDA: nvJPEG and the float resize, +-2)."""
    cpu_spec = DataSpec(uri=str(photo_shards), image_size=32, seed=5, keep_keys=True)
    gpu_spec = dataclasses.replace(cpu_spec, decode="gpu")
    cpu_train = build_datasets(cpu_spec).train
    gpu_train = build_datasets(gpu_spec).train
    decoder = DeviceDecoder(gpu_spec, torch.device("cpu"))
    epochs = []
    for epoch in range(2):
        expected, got = cpu_epoch(cpu_train), device_epoch(gpu_train, gpu_spec, epoch, decoder)
        assert sorted(got) == sorted(expected) and len(got) == 15
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        epochs.append(got)
    assert any(not np.array_equal(epochs[0][k], epochs[1][k]) for k in epochs[0])
    kinds = {kind_of(k) for k in epochs[0]}
    assert kinds == {"jpeg", "png", "gray-jpeg", "cmyk-jpeg"}  # the fallbacks are in there


def test_device_decoder_validation_crop_matches_the_cpu_validation_pipeline(
    ray_local, photo_shards
):
    spec = DataSpec(uri=str(photo_shards), image_size=32, keep_keys=True, decode="gpu")
    val = build_datasets(spec).val  # decoded on CPU whatever data.decode says
    expected = cpu_epoch(val)
    decoder = DeviceDecoder(spec, "cpu", training=False)
    src = photo_shards.parent / "src"
    keys = sorted(expected)
    batch = {"encoded": [torch.frombuffer(bytearray((src / k).read_bytes()), dtype=torch.uint8)
                         for k in keys],
             "label": torch.zeros(len(keys), dtype=torch.int64),
             "key": np.array(keys), "shard": np.array(["-"] * len(keys))}
    decoded = decoder(batch)
    for key, image in zip(keys, decoded["image"].numpy(), strict=True):
        np.testing.assert_array_equal(image, expected[key], err_msg=key)


def test_png_falls_back_to_the_cpu_decoder():
    spec = DataSpec(uri="builtin:digits", image_size=16, decode="gpu")
    rng = np.random.default_rng(0)
    pixels = photo_like(rng, 30, 20)
    data = [encode(pixels, "png"), encode(pixels, "jpeg")]
    batch = {"encoded": [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data],
             "box": torch.tensor([[0, 0, 30, 20], [0, 0, 30, 20]]),
             "flip": torch.tensor([False, True]), "label": torch.tensor([1, 2]),
             "key": np.array(["a/x.png", "a/x.jpg"]), "shard": np.array(["s", "s"])}
    decoded = DeviceDecoder(spec, "cpu")(batch)
    assert decoded["image"].shape == (2, 3, 16, 16) and decoded["label"].tolist() == [1, 2]
    for image, raw, flip in zip(decoded["image"], data, (False, True), strict=True):
        expected = resized_crop(decode_rgb(raw), (0, 0, 30, 20), 16, flip)
        assert torch.equal(image, expected)


def garble_shards(dst: Path, bad_key: str, make_bad) -> None:
    def garble(table: pa.Table) -> tuple[pa.Table, bool]:
        images = [make_bad(image) if key == bad_key else image for image, key in
                  zip(table["image"].to_pylist(), table["key"].to_pylist(), strict=True)]
        return table.set_column(0, "image", pa.array(images, pa.binary())), True

    for shard in sorted(dst.glob("*/part-*.parquet")):
        if bad_key in pq.read_table(shard, columns=["key"])["key"].to_pylist():
            rewrite_shard(shard, garble)


def shard_of(dst: Path, split: str, key: str) -> str:
    for shard in sorted((dst / split).glob("part-*.parquet")):
        if key in pq.read_table(shard, columns=["key"])["key"].to_pylist():
            return f"{dst}/{split}/{shard.name}"
    raise AssertionError(key)


def test_truncated_jpeg_fails_in_the_device_decoder_naming_shard_and_key(
    ray_local, photo_shards
):
    """Its header reads, so the Ray Data task ships it; the decoder then names it."""
    bad_key = "a/jpeg1.jpg"
    garble_shards(photo_shards, bad_key, lambda data: data[: len(data) // 2])
    spec = DataSpec(uri=str(photo_shards), image_size=16, decode="gpu")
    train = build_datasets(spec).train
    decoder = DeviceDecoder(spec, "cpu")
    with pytest.raises(CorruptImageError) as failure:
        for batch in iter_train_batches(train, spec, epoch=0, batch_size=4, drop_last=False):
            decoder(batch)
    message = str(failure.value)
    assert (f"shard {shard_of(photo_shards, 'train', bad_key)}, key {bad_key}: "
            "cannot decode the image: OSError" in message)

    skipping = dataclasses.replace(spec, skip_corrupt=True)
    data = build_datasets(skipping)
    decoder = DeviceDecoder(skipping, "cpu", skipped=data.skipped)
    seen = sum(len(decoder(batch)["label"]) for batch in
               iter_train_batches(data.train, skipping, epoch=0, batch_size=4, drop_last=False))
    assert seen == 14 and data.skipped.count() == 1
    [(where, reason)] = data.skipped.reasons().items()
    assert where == f"{shard_of(photo_shards, 'train', bad_key)}:{bad_key}"
    assert "cannot decode the image" in reason


def test_unreadable_header_fails_in_the_ray_data_task_naming_shard_and_key(
    ray_local, photo_shards
):
    bad_key = "b/png3.png"
    garble_shards(photo_shards, bad_key, lambda data: b"\xff\xd8\xff\xe0 this is not a JPEG")
    spec = DataSpec(uri=str(photo_shards), image_size=16, decode="gpu")
    with pytest.raises(Exception) as failure:
        list(iter_train_batches(build_datasets(spec).train, spec, epoch=0, batch_size=4))
    message = str(failure.value)
    assert CorruptImageError.__name__ in message
    assert (f"shard {shard_of(photo_shards, 'train', bad_key)}, key {bad_key}: "
            "cannot decode the image" in message)


def test_data_spec_refuses_an_unknown_decode_place():
    with pytest.raises(DataSpecError, match=r"data.decode = 'tpu' is not allowed; expected one "
                                            r"of \['cpu', 'gpu'\]"):
        DataSpec.from_dict({"decode": "tpu"})
