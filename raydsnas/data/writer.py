"""Shard writer: an ImageNet-style folder -> Parquet shards + `_manifest.json` (see `format.py`).
Its command line is `python -m raydsnas.data.shard` (see `shard.py`).

`SRC/<class>/<image>` (JPEG/PNG; class index = position in the sorted class names) becomes
`DST/train/part-NNNNN.parquet` rows `{image: the original file bytes, label,
key: "<class>/<file>"}`.
A validation split comes from a second folder with the same classes (`--val-src`, e.g. ImageNet's
val folder) or from a fixed, per-class fraction of SRC (`--val-fraction`). Samples are spread over
the shards in a seeded random order, so every shard holds a mix of classes and a reader's file
shuffle plus a small shuffle buffer is enough to mix a batch.

The work runs as Ray Data tasks, one shard per task, so it scales out on a cluster. Each shard is
committed atomically and carries the digest of the plan; a rerun keeps every complete shard of the
same plan and writes only what is missing or stale, then writes the manifest last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from raydsnas.data.errors import CorruptImageError, SourceFolderError
from raydsnas.data.format import (
    FORMAT_VERSION,
    PLAN_DIGEST_METADATA_KEY,
    SHARD_INDEX_METADATA_KEY,
    SHARD_SCHEMA,
    SKIPPED_METADATA_KEY,
    Manifest,
    ShardEntry,
    SkippedImage,
    SplitInfo,
    complete_shard_skips,
    write_manifest,
)
from raydsnas.data.storage import (
    join_path,
    read_bytes,
    resolve_filesystem,
    storage_errors,
    write_bytes_atomic,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_SHARD_SIZE = 1000
ROW_GROUP_SIZE = 128  # rows; bounds the memory of one read batch (~15 MB of ImageNet JPEGs)
SOURCE_READ_THREADS = 16  # per shard task: reading many small objects is latency-bound
# What PIL raises for a file that is not an image or is damaged (the pipeline's DECODE_ERRORS).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class LabelledFile:
    key: str  # path relative to the source root, "<class>/<file>"
    label: int


@dataclass(frozen=True)
class ShardPlan:
    """The rows one shard will hold, in order; `source` names the folder the keys are under."""

    split: str
    index: int
    source: str
    files: tuple[LabelledFile, ...]

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"


@dataclass(frozen=True)
class WriteReport:
    """What a writer run did: shards written now, shards kept from an earlier run, the manifest."""

    written: tuple[str, ...]
    kept: tuple[str, ...]
    manifest: Manifest


def list_image_folder(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, list[str]]:
    """Map each class name to the sorted keys ("<class>/<file...>") of its images under `uri`.

    Classes are the first-level folders that hold images (also nested deeper, as in torchvision's
    ImageFolder); files directly under `uri` and non-image files are ignored.
    """
    fs, root = resolve_filesystem(uri, storage_options)
    with storage_errors(uri, storage_options):
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise SourceFolderError(f"image folder {uri} does not exist")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    by_class: dict[str, list[str]] = {}
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        relative = info.path[len(root) :].lstrip("/")
        if "/" in relative:
            by_class.setdefault(relative.split("/", 1)[0], []).append(relative)
    if not by_class:
        raise SourceFolderError(
            f"no images found in {uri}: expected {uri}/<class>/<image> with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    return {name: sorted(keys) for name, keys in sorted(by_class.items())}


def plan_shards(
    train_files: Sequence[LabelledFile],
    val_files: Sequence[LabelledFile],
    *,
    train_source: str,
    val_source: str,
    shard_size: int,
    seed: int,
) -> tuple[list[ShardPlan], str]:
    """Spread each split over shards in a seeded random order; return the plans and their digest
    (a hash of every shard's rows), which marks the shards as belonging together."""
    plans: list[ShardPlan] = []
    for split_number, (split, files, source) in enumerate(
        (("train", train_files, train_source), ("val", val_files, val_source))
    ):
        order = np.random.default_rng([seed, split_number]).permutation(len(files))
        shuffled = [files[i] for i in order]
        for index, start in enumerate(range(0, len(shuffled), shard_size)):
            plans.append(
                ShardPlan(split, index, source, tuple(shuffled[start : start + shard_size]))
            )
    digest = hashlib.sha256(f"raydsnas-shards-v{FORMAT_VERSION}".encode())
    for plan in plans:
        rows = [[f.key, f.label] for f in plan.files]
        digest.update(json.dumps([plan.path, rows]).encode())
    return plans, digest.hexdigest()[:32]


def write_shards(
    src: str,
    dst: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_src: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    src_storage_options: Mapping[str, Any] | None = None,
    use_ray: bool = True,
    skip_corrupt: bool = False,
) -> WriteReport:
    """Turn the image folder `src` (and `val_src`) into a shard set at `dst`; see the module doc.

    `storage_options` apply to `dst`, `src_storage_options` to `src`/`val_src` (default: the same
    as `dst` when both are on S3, else none). `use_ray=False` writes in this process (small sets,
    e.g. the built-in ones); the rows written are the same.

    Every image is decoded once by the task that reads it. An undecodable one raises
    `CorruptImageError` naming each bad file (relative to its folder) after removing the shards
    this run wrote, so no partial set is left; with `skip_corrupt` it is left out of its shard
    and listed in the manifest's `skipped`, and the row counts are those of the images written.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise SourceFolderError(f"shard size {shard_size!r}: must be a positive integer")
    if val_src is not None and val_fraction:
        raise SourceFolderError(
            "give either a validation folder or a validation fraction, not both"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise SourceFolderError(f"validation fraction {val_fraction!r}: must be in [0, 1)")
    if src_storage_options is None and _same_kind(src, dst):
        src_storage_options = storage_options
    # Before listing the source (long on a large folder): bad options or credentials fail now.
    dst_fs, dst_root = resolve_filesystem(dst, storage_options)

    classes_to_keys = list_image_folder(src, src_storage_options)
    classes = tuple(classes_to_keys)
    label_of = {name: label for label, name in enumerate(classes)}
    train_files = [
        LabelledFile(key, label_of[name]) for name, keys in classes_to_keys.items() for key in keys
    ]
    val_files: list[LabelledFile] = []
    if val_src is not None:
        val_by_class = list_image_folder(val_src, src_storage_options)
        unknown = sorted(set(val_by_class) - set(classes))
        if unknown:
            raise SourceFolderError(
                f"validation folder {val_src} has classes not in {src}: {unknown[:10]}"
            )
        val_files = [
            LabelledFile(key, label_of[name]) for name, keys in val_by_class.items() for key in keys
        ]
    elif val_fraction:
        train_files, val_files = _hold_out(train_files, val_fraction, seed)

    plans, digest = plan_shards(
        train_files,
        val_files,
        train_source=src,
        val_source=val_src or src,
        shard_size=shard_size,
        seed=seed,
    )
    write_one = partial(
        _write_planned_shard,
        src_storage_options=dict(src_storage_options or {}),
        dst_fs=dst_fs,
        dst_root=dst_root,
        plan_digest=digest,
        skip_corrupt=skip_corrupt,
    )
    with storage_errors(dst, storage_options):
        if use_ray:
            results = _run_on_ray(plans, write_one)
        else:
            results = [write_one(_plan_to_row(plan)) for plan in plans]

    skipped = tuple(
        sorted(
            SkippedImage(str(r["split"]), str(key), str(reason))
            for r in results
            for key, reason in r["skipped"]
        )
    )
    if skipped and not skip_corrupt:
        with storage_errors(dst, storage_options):
            _remove_written(dst_fs, dst_root, [str(r["path"]) for r in results if r["written"]])
        raise CorruptImageError(_describe_corrupt(skipped, {"train": src, "val": val_src or src}))
    rows_of = {str(r["path"]): int(r["rows"]) for r in results}
    left_out = {(s.split, s.key) for s in skipped}
    manifest = Manifest(
        classes=classes,
        splits={
            split: SplitInfo(
                shards=tuple(ShardEntry(p.path, rows_of[p.path]) for p in plans if p.split == split),
                class_counts=_class_counts(
                    [f for f in files if (split, f.key) not in left_out], len(classes)
                ),
            )
            for split, files in (("train", train_files), ("val", val_files))
            if files
        },
        plan_digest=digest,
        shard_size=shard_size,
        seed=seed,
        skipped=skipped,
    )
    with storage_errors(dst, storage_options):
        write_manifest(dst_fs, dst_root, manifest)
    return WriteReport(
        written=tuple(sorted(r["path"] for r in results if r["written"])),
        kept=tuple(sorted(r["path"] for r in results if not r["written"])),
        manifest=manifest,
    )


def verify_image(data: bytes) -> str | None:
    """None when `data` decodes as an image, else why not. PIL's open reads the header only
    (a cheap check that rejects non-images), `load` then decodes every pixel (truncated files)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image: no JPEG/PNG (or other known) header"
    except DECODE_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        return reason if len(reason) <= 120 else reason[:117] + "..."
    return None


def _describe_corrupt(skipped: Sequence[SkippedImage], source_of: Mapping[str, str]) -> str:
    parts = []
    for source in dict.fromkeys(source_of[s.split] for s in skipped):
        bad = [s for s in skipped if source_of[s.split] == source]
        shown = ", ".join(f"{s.key} ({s.reason})" for s in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        parts.append(f"{len(bad)} image(s) under {source} cannot be decoded: {shown}{more}")
    return (
        "; ".join(parts)
        + "; fix or remove them, or pass --skip-corrupt to leave them out (nothing was written)"
    )


def _remove_written(fs: pafs.FileSystem, root: str, relative_paths: Sequence[str]) -> None:
    """Delete the shards a failed run wrote, then the folders it left empty (local paths)."""
    for relative in relative_paths:
        fs.delete_file(join_path(root, relative))
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    for folder in (*(join_path(root, split) for split in ("train", "val")), root):
        info = fs.get_file_info(folder)
        if info.type == pafs.FileType.Directory and not fs.get_file_info(
            pafs.FileSelector(folder)
        ):
            fs.delete_dir(folder)


def _same_kind(src: str, dst: str) -> bool:
    return src.split("://", 1)[0] == dst.split("://", 1)[0] and "://" in src


def _hold_out(
    files: list[LabelledFile], fraction: float, seed: int
) -> tuple[list[LabelledFile], list[LabelledFile]]:
    """A fixed per-class validation hold-out: round(fraction * n) files of each class, chosen by
    a seeded permutation of the sorted keys."""
    rng = np.random.default_rng([seed, 0x5EED])
    by_label: dict[int, list[LabelledFile]] = {}
    for f in files:
        by_label.setdefault(f.label, []).append(f)
    train, val = [], []
    for _, members in sorted(by_label.items()):
        held = set(rng.permutation(len(members))[: round(fraction * len(members))].tolist())
        for i, f in enumerate(members):
            (val if i in held else train).append(f)
    return train, val


def _class_counts(files: Sequence[LabelledFile], num_classes: int) -> tuple[int, ...]:
    counts = np.bincount([f.label for f in files], minlength=num_classes)
    return tuple(int(c) for c in counts)


def _plan_to_row(plan: ShardPlan) -> dict[str, Any]:
    return {
        "split": plan.split,
        "index": plan.index,
        "source": plan.source,
        "keys": [f.key for f in plan.files],
        "labels": [f.label for f in plan.files],
    }


def _run_on_ray(plans: list[ShardPlan], write_one) -> list[dict[str, Any]]:
    import ray
    import ray.data

    if not ray.is_initialized():
        # As the pipeline does: the cluster RAY_ADDRESS names, else a new local Ray (not a stale
        # `ray start` head's); its start-up chatter stays off the user's terminal.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING")

    rows = [_plan_to_row(plan) for plan in plans]
    # One block per shard so that Ray runs (and retries) one task per shard.
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    return dataset.map(write_one).take_all()


def _write_planned_shard(
    row: dict[str, Any],
    *,
    src_storage_options: dict[str, Any],
    dst_fs: pafs.FileSystem,
    dst_root: str,
    plan_digest: str,
    skip_corrupt: bool,
) -> dict[str, Any]:
    """Write one shard unless a complete shard of the same plan is already there. Each image is
    checked as it is read (`verify_image`); an undecodable one is left out with `skip_corrupt`,
    else the shard is not written. Returns the shard's path, whether it was written now, its
    rows and the (key, reason) pairs it left out."""
    keys = [str(k) for k in row["keys"]]
    labels = [int(label) for label in row["labels"]]
    index = int(row["index"])
    relative = f"{row['split']}/part-{index:05d}.parquet"
    path = join_path(dst_root, relative)
    done = complete_shard_skips(
        dst_fs, path, plan_digest=plan_digest, index=index, planned_rows=len(keys)
    )
    if done is not None:
        result = {"path": relative, "split": row["split"], "written": False}
        return {**result, "rows": len(keys) - len(done), "skipped": [list(p) for p in done]}

    src_fs, src_root = resolve_filesystem(str(row["source"]), src_storage_options)

    def read_and_check(key: str) -> tuple[bytes, str | None]:
        data = read_bytes(src_fs, join_path(src_root, key))
        return data, verify_image(data)

    with ThreadPoolExecutor(SOURCE_READ_THREADS) as pool:
        checked = list(pool.map(read_and_check, keys))
    skipped = [[key, reason] for key, (_, reason) in zip(keys, checked) if reason is not None]
    result = {"path": relative, "split": row["split"], "skipped": skipped}
    if skipped and not skip_corrupt:
        return {**result, "written": False, "rows": 0}
    good = [i for i, (_, reason) in enumerate(checked) if reason is None]
    table = pa.table(
        {
            "image": pa.array([checked[i][0] for i in good], pa.binary()),
            "label": [labels[i] for i in good],
            "key": [keys[i] for i in good],
        },
        schema=SHARD_SCHEMA,
    ).replace_schema_metadata(
        {
            PLAN_DIGEST_METADATA_KEY: plan_digest,
            SHARD_INDEX_METADATA_KEY: str(index),
            SKIPPED_METADATA_KEY: json.dumps(skipped),
        }
    )
    buffer = pa.BufferOutputStream()
    pq.write_table(
        table,
        buffer,
        row_group_size=ROW_GROUP_SIZE,
        # Images are already compressed; the statistics of label feed the readers' range check.
        compression={"image": "none", "label": "zstd", "key": "zstd"},
        use_dictionary=["label", "key"],
        write_statistics=["label"],
    )
    write_bytes_atomic(dst_fs, path, buffer.getvalue().to_pybytes())
    return {**result, "written": True, "rows": len(good)}
