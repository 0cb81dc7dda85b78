"""Data at scale: labelled images -> Parquet shards on a local path or S3 -> Ray Data -> workers.

Shard format
------------
`python -m raydsnas.data.shard SRC DST [--shard-size N] [--val-src VAL | --val-fraction F]`
turns an ImageNet-style folder `SRC/<class>/<image>` (JPEG/PNG; label = index of the class in the
sorted folder names) into a shard set at `DST` (a local path or `s3://bucket/prefix`):

    DST/_manifest.json            format_version, classes, per split: shards, rows, class counts
    DST/train/part-00000.parquet  rows {image: binary (the original file, not re-encoded),
    DST/val/part-00000.parquet           label: int64, key: string "<class>/<file>"}

Samples are spread over shards (default 1000 rows) in a seeded random order, so each shard mixes
classes. The writer runs one Ray Data task per shard; each shard is committed atomically and
tagged with the digest of the plan, and the manifest is written last. A rerun after a crash keeps
the complete shards and writes only the missing or stale ones. On a multi-node cluster write to
shared storage (S3): a local DST is written on whichever node runs each task.
Validation: `--val-src` (e.g. ImageNet's val folder, same classes) or `--val-fraction F` (a fixed
seeded per-class hold-out of SRC).

Sources
-------
`data.uri` names a shard set (a local path or `s3://bucket/prefix`), a built-in set
(`builtin:<name>`, below) or `synthetic:<classes>/<train>/<val>` (an in-memory task each worker
makes itself, `raydsnas.data.synthetic`). `raydsnas.data.sources` opens all three:
`describe_source(spec)` (classes and split sizes, no Ray), `open_source(spec)` in the driver (the
Ray Datasets for Ray Train), `WorkerData` in a worker (its batches of each split). `DataSpec`
(`raydsnas.data.spec`) imports no Ray.

Reading
-------
    spec = DataSpec(uri="s3://bucket/imagenet", image_size=224, seed=0)
    train, val, manifest = build_datasets(spec)      # Ray Datasets + the shard-set manifest
    trainer = TorchTrainer(..., datasets={"train": train, "val": val},
                           dataset_config=ray.train.DataConfig(
                               datasets_to_split=["train"],
                               execution_options=execution_options(spec)))
    # in each worker, every epoch:
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), spec,
                                    epoch=epoch, batch_size=256, rank=rank):
        x = normalize(batch["image"], device, channels_last=True)   # float, on the device
        y = batch["label"].to(device)

Rows are `{"image": uint8 [N, 3, S, S], "label": int64}` (plus `"key"` with `keep_keys`).
Train: Parquet read with a seeded file shuffle, decode + RandomResizedCrop(`crop_scale`,
`crop_ratio`) + horizontal flip in `map_batches` on CPU; each worker's `iter_train_batches` adds a
local shuffle buffer of `shuffle_buffer` rows. Validation: Resize(shorter side = image_size /
val_crop_ratio) + CenterCrop(image_size), not shuffled. `normalize` standardises with the
ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) on the device.
Decoding (`raydsnas.data.images`): JPEG with libjpeg-turbo (`torchvision.io.decode_jpeg`), PNG and
what it refuses with PIL; crops resized by torch's antialiased bilinear filter.

`decode: gpu` moves the training decode to the workers' device: the Ray Data tasks read only
each image's header, draw the same crop box and flip, and `iter_train_batches` yields encoded
batches (`EncodedBatch`); `DeviceDecoder(spec, device)(batch)` (`raydsnas.data.device_decode`)
returns the batch `decode: cpu` would have given, its images on the device
(`is_encoded(batch)` tells the two apart). Validation and selection stay decoded on CPU.

Per-epoch order: every pass over `train` is one Ray Data execution; Ray numbers them, and the file
order and each sample's crop/flip are drawn from (seed, that number, sample key). A fresh
`build_datasets` starts at epoch 0 (or `start_epoch=` to resume); the shuffle buffer is seeded
from (seed, epoch, rank). The file order and augmentations are therefore reproducible; the exact
row order also depends on which decode task finishes first unless `preserve_order: true`.

Built-in data sets
------------------
`uri: builtin:digits` -- scikit-learn's 1797 handwritten digits (8x8, 10 classes), stored as
grayscale PNGs and decoded to 3 channels, written as a shard set into the local cache
(`$RAYDSNAS_CACHE`, else `~/.cache/raydsnas`) on first use and read back through exactly the path
above. Fixed split: train = samples 0..1499 of `load_digits()`, val = samples 1500..1796.
Suggested: `image_size: 32, crop_scale: [0.5, 1.0], hflip: false`.

`uri: builtin:shapes` -- 14 400 generated 16x16 RGB images of 24 classes (8 shape kinds x 3 fill
styles, e.g. `disc-solid`, `star-checked`), 12 000 train / 2 400 val, drawn from fixed seeds by
a numpy generator in `raydsnas.data.builtin` (no download), written and read back the same way.
Harder than digits and large enough to resolve a 0.5-point top-1 difference. Suggested:
`image_size: 16`.

Storage options and AWS environment variables
---------------------------------------------
`storage_options` (S3): `endpoint_url`, `region`, `anonymous`, `access_key_id`,
`secret_access_key`, `session_token`, `connect_timeout` (default 10 s), `request_timeout`.
Unset options fall back to the standard environment: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
(read by raydsnas, since pyarrow ignores them), `AWS_REGION` / `AWS_DEFAULT_REGION`,
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, `AWS_PROFILE`, and instance
or container roles. Prefer the environment or roles for secrets: secrets in `storage_options`
travel inside Ray task arguments (they are never logged or written; `DataSpec`'s repr redacts
them). `resolve_filesystem(uri, storage_options)` is the one helper every reader and writer uses.

Bad data
--------
Errors are raised in the driver before any task starts when possible, and always name the thing:
missing/empty prefix or no manifest (`ShardSetNotFoundError`), wrong schema / row count / stale
shard / label range from the Parquet statistics (`ShardFormatError`, `LabelOutOfRangeError`),
unreachable endpoint (`EndpointUnreachableError`), no credentials (`MissingCredentialsError`),
refused credentials (`AccessDeniedError`). In the decode tasks: a label out of range
(`LabelOutOfRangeError`) and an undecodable image (`CorruptImageError`), both naming the shard and
key; with `skip_corrupt: true` undecodable images are dropped instead and counted in
`build_datasets(spec).skipped` (`count()`, `reasons()`), which pickles into Train workers.

Memory and streaming knobs (Ray Data)
-------------------------------------
Nothing reads the whole set into memory; Ray Data's streaming executor backpressures each
operator. The knobs, from most to least useful:
- `object_store_limit_bytes` (DataSpec) -> `ExecutionOptions.resource_limits.object_store_memory`:
  the object-store memory the pipeline may fill with decoded batches. Under Ray Train pass
  `DataConfig(execution_options=execution_options(spec))`, since Train replaces the options.
- `target_block_bytes` (DataSpec, default 8 MiB): the largest block the read and decode steps
  emit (Ray's `target_max_block_size`, set per dataset): one decode call takes one block of
  encoded images (~70 ImageNet JPEGs) and emits ~10 MB of uint8 pixels. Each shard is read and
  decoded by one fused Ray task, so the tasks in flight (at most one per CPU) times one shard's
  blocks bound the memory of the decode step. Shards are written in row groups of 128 rows.
- `shuffle_buffer` (DataSpec) and `prefetch_batches` (`iter_train_batches`): rows held in each
  training worker.
- The object store itself: `ray start --object-store-memory`; excess spills to disk.
"""

# Names resolve lazily (PEP 562), so that `import raydsnas` (e.g. to load a child network with
# `load_child`) does not import Ray: only the pipeline and the writer need it.
_EXPORTS = {
    "BUILTIN_SETS": "raydsnas.data.builtin",
    "builtin_shard_set": "raydsnas.data.builtin",
    "AccessDeniedError": "raydsnas.data.errors",
    "CorruptImageError": "raydsnas.data.errors",
    "DataError": "raydsnas.data.errors",
    "DataSpecError": "raydsnas.data.errors",
    "EndpointUnreachableError": "raydsnas.data.errors",
    "LabelOutOfRangeError": "raydsnas.data.errors",
    "MissingCredentialsError": "raydsnas.data.errors",
    "ShardFormatError": "raydsnas.data.errors",
    "ShardSetNotFoundError": "raydsnas.data.errors",
    "SourceFolderError": "raydsnas.data.errors",
    "StorageError": "raydsnas.data.errors",
    "StorageOptionsError": "raydsnas.data.errors",
    "Manifest": "raydsnas.data.format",
    "ShardEntry": "raydsnas.data.format",
    "SplitInfo": "raydsnas.data.format",
    "DataSets": "raydsnas.data.pipeline",
    "DeviceDecoder": "raydsnas.data.device_decode",
    "is_encoded": "raydsnas.data.device_decode",
    "IMAGENET_MEAN": "raydsnas.data.feed",
    "IMAGENET_STD": "raydsnas.data.feed",
    "SkippedImages": "raydsnas.data.pipeline",
    "build_datasets": "raydsnas.data.pipeline",
    "execution_options": "raydsnas.data.pipeline",
    "iter_train_batches": "raydsnas.data.pipeline",
    "local_shuffle_seed": "raydsnas.data.pipeline",
    "normalize": "raydsnas.data.feed",
    "SourceFacts": "raydsnas.data.sources",
    "WorkerData": "raydsnas.data.sources",
    "describe_source": "raydsnas.data.sources",
    "in_memory_splits": "raydsnas.data.sources",
    "open_source": "raydsnas.data.sources",
    "source_kind": "raydsnas.data.sources",
    "DataSpec": "raydsnas.data.spec",
    "redact_storage_options": "raydsnas.data.storage",
    "resolve_filesystem": "raydsnas.data.storage",
    "storage_errors": "raydsnas.data.storage",
    "write_bytes_atomic": "raydsnas.data.storage",
    "SyntheticData": "raydsnas.data.synthetic",
    "WriteReport": "raydsnas.data.writer",
    "write_shards": "raydsnas.data.writer",
}

__all__ = [
    "BUILTIN_SETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AccessDeniedError",
    "CorruptImageError",
    "DataError",
    "DataSets",
    "DataSpec",
    "DataSpecError",
    "DeviceDecoder",
    "EndpointUnreachableError",
    "LabelOutOfRangeError",
    "Manifest",
    "MissingCredentialsError",
    "ShardEntry",
    "ShardFormatError",
    "ShardSetNotFoundError",
    "SkippedImages",
    "SourceFacts",
    "SourceFolderError",
    "SplitInfo",
    "StorageError",
    "StorageOptionsError",
    "SyntheticData",
    "WorkerData",
    "WriteReport",
    "build_datasets",
    "builtin_shard_set",
    "describe_source",
    "execution_options",
    "in_memory_splits",
    "is_encoded",
    "iter_train_batches",
    "local_shuffle_seed",
    "normalize",
    "open_source",
    "redact_storage_options",
    "resolve_filesystem",
    "source_kind",
    "storage_errors",
    "write_bytes_atomic",
    "write_shards",
]



def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raydsnas.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
