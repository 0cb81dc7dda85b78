"""Reading: shard set -> Ray Datasets of uint8 NCHW images and int64 labels, decoded and augmented
on CPU by Ray Data tasks (with `data.decode: gpu`, training images stay encoded, with their crop
drawn, for `raydsnas.data.device_decode`); normalisation happens later, on the training device
(`normalize`)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import ray.util
import torch
from ray.data import ExecutionOptions, ExecutionResources
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.context import DataContext

from raydsnas.data.errors import (
    CorruptImageError,
    DataSpecError,
    LabelOutOfRangeError,
)
from raydsnas.data.feed import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: F401 (re-exported)
from raydsnas.data.format import (
    Manifest,
    read_manifest,
    read_shard_tables,
    verify_shards,
)
from raydsnas.data.images import (
    DECODE_ERRORS,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    as_byte_tensor,
    decode_rgb,
    image_header,
    resized_crop,
    undecodable_reason,
)
from raydsnas.data.selection import KeyFilter, stable_key_hash
from raydsnas.data.sources import count_held_out, shard_set_location, source_kind
from raydsnas.data.spec import DataSpec
from raydsnas.data.storage import (
    is_local_uri,
    join_path,
    resolve_filesystem,
    storage_errors,
)
from raydsnas.local_ray import start_local_ray


@ray.remote(num_cpus=0)
class _SkippedImageRecorder:
    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, reasons: dict[str, str]) -> None:
        for key, reason in reasons.items():
            self._reasons.setdefault(key, reason)

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)


class SkippedImages:
    """The corrupt images a pipeline skipped (with `skip_corrupt`), for the run's metrics.

    The handle pickles: pass it to Ray Train workers and call `count()` from any of them.
    """

    def __init__(self) -> None:
        self._recorder = _SkippedImageRecorder.remote()

    def record(self, reasons: dict[str, str]) -> None:
        # Waited for, so a count taken after the batch was consumed already includes it.
        ray.get(self._recorder.add.remote(reasons))

    def reasons(self) -> dict[str, str]:
        """Each distinct skipped key ("<shard URI>:<key>") with the decoder's message."""
        return ray.get(self._recorder.reasons.remote())

    def count(self) -> int:
        """How many distinct images were skipped so far (over all epochs)."""
        return len(self.reasons())


@dataclass(frozen=True)
class DataSets:
    """What `build_datasets` returns; unpacks as `train, val, manifest`.

    `select` is the selection split held out of the training split (None without a
    `selection_fraction`); `num_train` / `num_select` count the rows each of `train` and
    `select` reads (`num_train` is the manifest's count when nothing is held out)."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    manifest: Manifest
    skipped: SkippedImages | None  # None unless spec.skip_corrupt
    select: ray.data.Dataset | None = None
    num_train: int = 0
    num_select: int = 0

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.val, self.manifest))


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    transform: RandomResizedCropFlip | ResizeCenterCrop,
    training: bool,
    num_classes: int,
    seed: int,
    shard_uri_of: dict[str, str],
    skipped: SkippedImages | None,
    keep_keys: bool,
    key_filter: KeyFilter | None = None,
    encoded: bool = False,
) -> dict[str, np.ndarray]:
    """Decode, check and transform one batch of shard rows into `image` (uint8 NCHW) and `label`
    (int64). Raises `LabelOutOfRangeError` / `CorruptImageError` naming the shard and the key.
    With `key_filter`, rows it does not keep are dropped before they are decoded.

    With `encoded` (training with `data.decode: gpu`) nothing is decoded: each row's header
    gives the image size, the crop box and flip are drawn as they would be here, and the rows
    come out encoded, as `EncodedBatch` describes (for `raydsnas.data.device_decode`)."""
    # Ray Data counts executions of a dataset (one per epoch); the shard order of
    # `ShardDatasource` uses the same counter, so file order and augmentations change together.
    epoch = DataContext.get_current()._execution_idx
    keys, paths, labels, data = batch["key"], batch["path"], batch["label"], batch["image"]
    count = len(keys)
    size = transform.size
    if encoded:
        boxes = np.empty((count, 4), dtype=np.int32)
        flips = np.zeros(count, dtype=bool)
        plain_jpegs = np.zeros(count, dtype=bool)
    else:
        images = np.empty((count, 3, size, size), dtype=np.uint8)
    kept: list[int] = []
    skipped_reasons: dict[str, str] = {}
    for row in range(count):
        key = str(keys[row])
        if key_filter is not None and not key_filter.keeps(key):
            continue
        label = int(labels[row])
        if not 0 <= label < num_classes:
            shard = shard_uri_of.get(str(paths[row]), str(paths[row]))
            raise LabelOutOfRangeError(
                f"shard {shard}, key {key}: label {label} is outside [0, {num_classes})"
            )
        try:
            if encoded:
                width, height, plain_jpegs[len(kept)] = image_header(data[row])
            else:
                image = decode_rgb(data[row])
        except DECODE_ERRORS as error:
            shard = shard_uri_of.get(str(paths[row]), str(paths[row]))
            reason = undecodable_reason(error)
            if skipped is None:
                raise CorruptImageError(f"shard {shard}, key {key}: {reason}") from None
            skipped_reasons[f"{shard}:{key}"] = reason
            continue
        rng = np.random.default_rng([stable_key_hash(key), epoch, seed]) if training else None
        if encoded:
            box, flips[len(kept)] = transform.draw(width, height, rng)
            boxes[len(kept)] = box
        else:
            if training:
                box, flip = transform.draw(image.shape[2], image.shape[1], rng)
                crop = resized_crop(image, box, size).numpy()
            else:
                crop, flip = transform(image).numpy(), False
            # numpy copies the channels-last crop into CHW (and mirrors it) ~3x faster than torch
            images[len(kept)] = crop[:, :, ::-1] if flip else crop
        kept.append(row)
    if skipped_reasons and skipped is not None:
        skipped.record(skipped_reasons)
    if encoded:
        return {
            "encoded": data[kept],
            "box": boxes[: len(kept)],
            "flip": flips[: len(kept)],
            "plain_jpeg": plain_jpegs[: len(kept)],
            "label": labels[kept].astype(np.int64),
            "key": keys[kept],
            "shard": np.array([shard_uri_of.get(str(p), str(p)) for p in paths[kept]]),
        }
    result = {"image": images[: len(kept)], "label": labels[kept].astype(np.int64)}
    if keep_keys:
        result["key"] = keys[kept]
    return result


def execution_options(spec: DataSpec) -> ExecutionOptions:
    """The Ray Data execution options `spec` asks for. `build_datasets` applies them to its
    datasets; under Ray Train pass them on: `DataConfig(execution_options=execution_options(spec))`,
    because Train's DataConfig replaces each dataset's options with its own."""
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = spec.preserve_order
    if spec.object_store_limit_bytes is not None:
        options.resource_limits = ExecutionResources(
            object_store_memory=spec.object_store_limit_bytes
        )
    return options


def build_datasets(
    spec: DataSpec, *, start_epoch: int = 0, selection_fraction: float = 0.0
) -> DataSets:
    """Build the train and validation Ray Datasets of `spec.uri` (unpacks as train, val, manifest).

    Before any task starts it reads the manifest and checks every shard's footer (schema, rows,
    plan, label range), so bad locations and bad shards fail here with a message naming them.
    Rows come out as `{"image": uint8 [N, 3, S, S], "label": int64}`. Train: seeded per-epoch file
    shuffle + RandomResizedCrop + flip; val: Resize + CenterCrop, shard order.
    `start_epoch` makes the first pass of `train` epoch `start_epoch` (resume: the same file order
    and augmentations as the uninterrupted run).

    `selection_fraction` > 0 holds that share of the training split out (by the hash of each
    key, `raydsnas.data.selection`): `train` drops those rows before decoding them, and
    `select` reads only them, with the validation transform, in shard order. The exact counts
    come from reading the shards' `key` column here (the manifest has no keys).
    """
    if not 0 <= selection_fraction < 1:
        raise ValueError(f"selection_fraction = {selection_fraction!r}: expected [0, 1)")
    uri, storage_options = shard_set_location(spec)
    fs, root = resolve_filesystem(uri, storage_options)
    with storage_errors(uri, storage_options):
        manifest = read_manifest(fs, root, uri)
        for split in ("train", "val"):
            if split not in manifest.splits:
                raise DataSpecError(
                    f"data.uri = {spec.uri!r}: the shard set has no {split!r} split (it has "
                    f"{sorted(manifest.splits)}); write one with --val-src or --val-fraction"
                )
            verify_shards(fs, root, uri, manifest, split)
        num_train = manifest.splits["train"].num_samples
        num_select = count_held_out(fs, root, manifest, spec, selection_fraction)
    if not ray.is_initialized():
        # What Ray Data would do on first use (the node address below needs it now): the
        # cluster RAY_ADDRESS names, else a new local one (not a stale `ray start` head's).
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            start_local_ray()
    skipped = SkippedImages() if spec.skip_corrupt else None
    split_dataset = partial(
        _split_dataset,
        fs=fs,
        root=root,
        uri=uri,
        manifest=manifest,
        spec=spec,
        skipped=skipped,
        # The built-in cache exists on the driver's node only: read it there.
        driver_node_only=source_kind(spec.uri) == "builtin",
    )
    train = split_dataset(
        split="train",
        transform=RandomResizedCropFlip(
            spec.image_size, spec.crop_scale, spec.crop_ratio, spec.hflip
        ),
        key_filter=KeyFilter(selection_fraction, selected=False) if selection_fraction else None,
    )
    train.context._execution_idx = start_epoch  # the counter `decode_batch` reads as the epoch
    val = split_dataset(
        split="val", transform=ResizeCenterCrop(spec.image_size, spec.val_crop_ratio)
    )
    select = None
    if selection_fraction:
        select = split_dataset(
            split="train",
            training=False,
            transform=ResizeCenterCrop(spec.image_size, spec.val_crop_ratio),
            key_filter=KeyFilter(selection_fraction, selected=True),
        )
    return DataSets(train, val, manifest, skipped, select, num_train - num_select, num_select)


class ShardDatasource(ray.data.Datasource):
    """The shards of one split as a Ray Data source: one read task per shard, which yields its
    row groups with a `path` column (`read_shard_tables`), so that a garbled data page fails as a
    `ShardFormatError` naming the shard. With `shuffle_seed` the shard order is a permutation
    drawn from (seed, execution index): a new order every epoch, the same one on a resume."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        paths: list[str],
        rows: list[int],
        shard_uri_of: dict[str, str],
        shuffle_seed: int | None,
    ) -> None:
        self._fs, self._paths, self._rows = fs, paths, rows
        self._shard_uri_of, self._shuffle_seed = shard_uri_of, shuffle_seed

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "ReadShards"

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
    ) -> list[ray.data.ReadTask]:
        order = list(range(len(self._paths)))
        if self._shuffle_seed is not None:
            # Ray Data counts executions of a dataset (one per epoch), see `decode_batch`.
            epoch = data_context._execution_idx if data_context is not None else 0
            order = np.random.default_rng([self._shuffle_seed, epoch]).permutation(order).tolist()
        retried = tuple((data_context or DataContext.get_current()).retried_io_errors)
        return [
            ray.data.ReadTask(
                partial(
                    read_shard_tables,
                    self._fs,
                    self._paths[i],
                    where=self._shard_uri_of[self._paths[i]],
                    retried_errors=retried,
                ),
                BlockMetadata(
                    num_rows=self._rows[i],
                    size_bytes=None,
                    exec_stats=None,
                    input_files=(self._paths[i],),
                ),
                per_task_row_limit=per_task_row_limit,
            )
            for i in order
        ]


def _split_dataset(
    *,
    split: str,
    transform: RandomResizedCropFlip | ResizeCenterCrop,
    fs: pafs.FileSystem,
    root: str,
    uri: str,
    manifest: Manifest,
    spec: DataSpec,
    skipped: SkippedImages | None,
    driver_node_only: bool,
    training: bool | None = None,
    key_filter: KeyFilter | None = None,
) -> ray.data.Dataset:
    """One manifest split as a Ray Dataset; `training` (default: the train split) shuffles the
    files and seeds the augmentation per epoch; `key_filter` keeps only some rows."""
    training = split == "train" if training is None else training
    relative = [entry.path for entry in manifest.splits[split].shards]
    paths = [join_path(root, p) for p in relative]
    # Ray gives every node a resource "node:<ip>"; asking for a sliver of it pins the reads there.
    read_on_this_node = (
        {f"node:{ray.util.get_node_ip_address()}": 0.001}
        if driver_node_only and is_local_uri(uri)
        else None
    )
    shard_uri_of = {path: f"{uri}/{rel}" for path, rel in zip(paths, relative, strict=True)}
    source = ShardDatasource(
        fs,
        paths,
        [entry.rows for entry in manifest.splits[split].shards],
        shard_uri_of,
        shuffle_seed=spec.seed if training else None,
    )
    # One read task per shard, so Ray fuses read + decode into one task per shard: no hand-off
    # between two operators competing for the same CPUs.
    dataset = ray.data.read_datasource(
        source, override_num_blocks=len(paths), resources=read_on_this_node
    )
    dataset.context.target_max_block_size = spec.target_block_bytes
    dataset = dataset.map_batches(
        partial(
            decode_batch,
            transform=transform,
            training=training,
            num_classes=manifest.num_classes,
            seed=spec.seed,
            shard_uri_of=shard_uri_of,
            skipped=skipped,
            keep_keys=spec.keep_keys,
            key_filter=key_filter,
            encoded=training and spec.decode == "gpu",
        ),
        batch_format="numpy",
        batch_size=None,  # whole blocks (see target_block_bytes); a batch size would stop fusion
    )
    dataset.context.execution_options = execution_options(spec)
    return dataset


def local_shuffle_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The shuffle-buffer seed of one worker in one epoch: reproducible, distinct per epoch/rank."""
    return stable_key_hash(f"{seed}/{epoch}/{rank}") % 2**32


def iter_train_batches(
    data: ray.data.Dataset | ray.data.DataIterator,
    spec: DataSpec,
    *,
    epoch: int,
    batch_size: int,
    rank: int = 0,
    drop_last: bool = True,
    prefetch_batches: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of training batches from a dataset or a Train worker's shard
    (`ray.train.get_dataset_shard("train")`), through the seeded local shuffle buffer.

    Tensors stay on the CPU as uint8; call `normalize` on the device. With `data.decode: gpu`
    the batches are encoded (`EncodedBatch`): decode them with
    `raydsnas.data.device_decode.DeviceDecoder` first."""
    return iter(
        data.iter_torch_batches(
            batch_size=batch_size,
            drop_last=drop_last,
            prefetch_batches=prefetch_batches,
            local_shuffle_buffer_size=spec.shuffle_buffer or None,
            local_shuffle_seed=local_shuffle_seed(spec.seed, epoch, rank)
            if spec.shuffle_buffer
            else None,
            device="cpu",
            collate_fn=EncodedBatch() if spec.decode == "gpu" else None,
        )
    )


class EncodedBatch(NumpyBatchCollateFn):
    """The collation of `data.decode: gpu` training batches (Ray Data's collate step, in its
    prefetch thread): rows of `decode_batch(encoded=True)` -> one dict of

        encoded  list of N uint8 CPU tensors, each image file's bytes (JPEG, or PNG etc.)
        box      int64 [N, 4]: the crop box (left, top, right, bottom) in the decoded image
        flip     bool [N]: mirror the crop
        plain_jpeg  bool [N]: an RGB or grayscale JPEG (the others decode on the CPU)
        label    int64 [N]
        key      numpy str [N]: the sample keys; shard: numpy str [N]: their shard URIs
                 (for the error of an image the device cannot decode)
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            "encoded": [as_byte_tensor(data) for data in batch["encoded"]],
            "box": torch.from_numpy(batch["box"].astype(np.int64)),
            "flip": torch.from_numpy(batch["flip"].astype(bool)),
            "plain_jpeg": torch.from_numpy(batch["plain_jpeg"].astype(bool)),
            "label": torch.from_numpy(batch["label"].astype(np.int64)),
            "key": batch["key"],
            "shard": batch["shard"],
        }
