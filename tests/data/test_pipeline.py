"""Reading pipeline: the built-in set, per-epoch shuffling, splitting across Train workers,
normalisation and configuration errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydsnas.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSpec,
    DataSpecError,
    build_datasets,
    execution_options,
    iter_train_batches,
    local_shuffle_seed,
    normalize,
    write_shards,
)

DIGITS_SMALL = {
    "uri": "builtin:digits",
    "image_size": 8,
    "crop_scale": (0.5, 1.0),
    "keep_keys": True,
}


def digits_reference():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target


def position_of(key) -> int:
    return int(str(key).split("/")[1].removesuffix(".png"))


def test_builtin_digits_are_built_once_and_read_back_with_original_pixels(ray_local, builtin_cache):
    train, val, manifest = build_datasets(DataSpec(**DIGITS_SMALL, val_crop_ratio=1.0))
    manifest_file = next(builtin_cache.glob("builtin/digits-v*/_manifest.json"))
    built_at = manifest_file.stat().st_mtime_ns
    pixels, targets = digits_reference()

    assert manifest.classes == tuple(str(d) for d in range(10))
    assert manifest.splits["train"].num_samples == 1500
    assert manifest.splits["val"].num_samples == 297
    val_rows = val.take_all()
    assert sorted(position_of(r["key"]) for r in val_rows) == list(range(1500, 1797))
    for row in val_rows:
        position = position_of(row["key"])
        assert row["label"] == targets[position]
        for channel in range(3):
            np.testing.assert_array_equal(row["image"][channel], pixels[position])
    train_rows = train.take_all()
    assert sorted(position_of(r["key"]) for r in train_rows) == list(range(1500))
    assert all(r["label"] == targets[position_of(r["key"])] for r in train_rows)

    build_datasets(DataSpec(**DIGITS_SMALL))
    assert manifest_file.stat().st_mtime_ns == built_at  # cached, not rebuilt


def epoch_pass(dataset, spec: DataSpec, epoch: int) -> tuple[list[str], dict[str, np.ndarray]]:
    keys, images = [], {}
    for batch in dataset.iter_batches(
        batch_size=100,
        local_shuffle_buffer_size=spec.shuffle_buffer,
        local_shuffle_seed=local_shuffle_seed(spec.seed, epoch),
    ):
        for key, image in zip(batch["key"], batch["image"], strict=True):
            keys.append(str(key))
            images[str(key)] = image
    return keys, images


def test_train_epochs_reshuffle_reproducibly_from_the_seed(ray_local, builtin_cache):
    spec = DataSpec(**DIGITS_SMALL, seed=7, shuffle_buffer=200, preserve_order=True)
    first = build_datasets(spec).train
    a0, a_images0 = epoch_pass(first, spec, 0)
    a1, a_images1 = epoch_pass(first, spec, 1)
    again = build_datasets(spec).train
    b0, b_images0 = epoch_pass(again, spec, 0)
    resumed = build_datasets(spec, start_epoch=1).train
    c1, c_images1 = epoch_pass(resumed, spec, 1)
    other_seed = DataSpec(**DIGITS_SMALL, seed=8, shuffle_buffer=200, preserve_order=True)
    d0, _ = epoch_pass(build_datasets(other_seed).train, other_seed, 0)

    assert sorted(a0) == sorted(a1) == sorted(d0) and len(set(a0)) == 1500
    assert a0 == b0  # same seed, same epoch: same order
    assert c1 == a1  # a resumed run continues with the order of the uninterrupted one
    assert a0 != a1 and a0 != d0
    assert all(np.array_equal(a_images0[k], b_images0[k]) for k in a0)
    assert all(np.array_equal(a_images1[k], c_images1[k]) for k in a1)
    changed = sum(not np.array_equal(a_images0[k], a_images1[k]) for k in a0)
    assert changed > 1000  # fresh crops every epoch


@pytest.mark.slow
def test_every_train_sample_is_seen_once_per_epoch_across_two_workers(
    ray_local, builtin_cache, tmp_path
):
    import ray.train
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = DataSpec(**DIGITS_SMALL, shuffle_buffer=100)
    train, _, manifest = build_datasets(spec)
    out = tmp_path / "seen"
    out.mkdir()

    def train_loop(config: dict) -> None:
        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        for epoch in range(2):
            keys = [
                str(key)
                for batch in shard.iter_batches(
                    batch_size=64,
                    local_shuffle_buffer_size=config["buffer"],
                    local_shuffle_seed=local_shuffle_seed(config["seed"], epoch, rank),
                )
                for key in batch["key"]
            ]
            Path(config["out"], f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(keys))

    TorchTrainer(
        train_loop,
        train_loop_config={"out": str(out), "buffer": spec.shuffle_buffer, "seed": spec.seed},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": train},
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=execution_options(spec)
        ),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="seen-once"),
    ).fit()

    everything = {f"{label}/{p:04d}.png" for p, label in enumerate(digits_reference()[1][:1500])}
    orders = []
    for epoch in range(2):
        per_rank = [json.loads((out / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        assert [len(keys) for keys in per_rank] == [750, 750]  # 1500 splits evenly, nothing dropped
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)) and set(seen) == everything
        orders.append(seen)
    assert orders[0] != orders[1]
    assert manifest.splits["train"].num_samples == 1500


def test_train_batches_are_uint8_nchw_and_normalize_on_the_device(ray_local, builtin_cache):
    spec = DataSpec(uri="builtin:digits", image_size=16, crop_scale=(0.5, 1.0), shuffle_buffer=64)
    train, _, _ = build_datasets(spec)
    batch = next(iter_train_batches(train, spec, epoch=0, batch_size=32))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (32, 3, 16, 16)
    assert batch["label"].dtype == torch.int64 and int(batch["label"].max()) < 10

    images = batch["image"]
    normalized = normalize(images, "cpu", channels_last=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalized, (images.float() / 255 - mean) / std)
    assert normalized.dtype == torch.float32
    assert normalized.is_contiguous(memory_format=torch.channels_last)
    assert normalize(images, "cpu", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="uint8 images of shape"):
        normalize(images.float(), "cpu")


def test_aws_endpoint_url_environment_variable_is_honoured(
    ray_local, s3_server, make_image_folder, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    bucket = s3_server.make_bucket()
    src = make_image_folder(per_class=2)
    write_shards(str(src), f"s3://{bucket}/env", shard_size=3, val_fraction=0.5)
    train, val, manifest = build_datasets(DataSpec(uri=f"s3://{bucket}/env", image_size=16))
    assert manifest.splits["train"].class_counts == (1, 1, 1)
    assert train.count() == 3 and val.count() == 3


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image_size": 0}, r"data.image_size = 0 is not allowed; expected an integer from 4 to 4096"),
        (
            {"uri": "builtin:cifar"},
            r"data.uri = 'builtin:cifar' is not allowed; expected one of the built-in data sets \['builtin:digits', 'builtin:shapes'\]",
        ),
        ({"crop_scale": (0.9, 0.1)}, r"data.crop_scale = \(0.9, 0.1\) is not allowed; expected \[min, max\]"),
        ({"val_crop_ratio": 1.5}, r"data.val_crop_ratio = 1.5 is not allowed; expected a number in \(0, 1\]"),
        ({"skip_corrupt": "yes"}, r"data.skip_corrupt = 'yes' is not allowed; expected true or false"),
        ({"shuffle_buffer": -1}, r"data.shuffle_buffer = -1 is not allowed; expected a non-negative integer"),
        (
            {"image_sise": 32},
            r"data: unknown key\(s\) \['image_sise'\]; allowed: \['uri', 'image_size'",
        ),
    ],
)
def test_data_spec_errors_name_the_key_the_value_and_what_is_allowed(values, message):
    with pytest.raises(DataSpecError, match=message):
        DataSpec.from_dict(values)
