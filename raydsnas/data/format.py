"""The shard format: Parquet files of `{image: binary, label: int64, key: string}` rows plus one
`_manifest.json` that lists them. Written by `raydsnas.data.writer`, read by
`raydsnas.data.pipeline` (and, the manifest and keys alone, by `raydsnas.data.sources`).

Layout at a shard-set root `DST`:

    DST/_manifest.json             written last; readers only read the shards it lists
    DST/train/part-00000.parquet   ...
    DST/val/part-00000.parquet     ... (when a validation split was written)

Each shard carries, in its Parquet key-value metadata, the digest of the plan it belongs to and
its index, so a rerun of the writer and every reader can tell a complete shard of this set from a
stale or foreign file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydsnas.data.errors import LabelOutOfRangeError, ShardFormatError, ShardSetNotFoundError
from raydsnas.data.selection import selection_mask
from raydsnas.data.storage import is_store_failure, join_path, read_bytes, write_bytes_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "_manifest.json"
SPLITS = ("train", "val")
SHARD_SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("key", pa.string())])
PLAN_DIGEST_METADATA_KEY = b"raydsnas.plan_digest"
SHARD_INDEX_METADATA_KEY = b"raydsnas.shard_index"
# JSON [[key, reason], ...]: planned rows the writer left out (`--skip-corrupt`).
SKIPPED_METADATA_KEY = b"raydsnas.skipped"
FOOTER_CHECK_THREADS = 16  # footer reads are latency-bound on object stores


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: its path relative to the shard-set root and its row count."""

    path: str
    rows: int


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split and how many samples of each class they hold."""

    shards: tuple[ShardEntry, ...]
    class_counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.class_counts)


@dataclass(frozen=True, order=True)
class SkippedImage:
    """A source image the writer left out (`--skip-corrupt`): split, key ("<class>/<file>",
    relative to the source folder) and why."""

    split: str
    key: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    """What `_manifest.json` says about a shard set: classes (label i = classes[i], sorted folder
    names), the splits with their shards and per-class counts, and how the set was planned."""

    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    plan_digest: str
    shard_size: int
    seed: int
    format_version: int = FORMAT_VERSION
    skipped: tuple[SkippedImage, ...] = ()  # undecodable source images left out by the writer
    root: str = field(default="", compare=False)  # where it was read from; not stored

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "classes": list(self.classes),
                "num_classes": self.num_classes,
                "splits": {
                    name: {
                        "num_samples": split.num_samples,
                        "class_counts": list(split.class_counts),
                        "shards": [{"path": s.path, "rows": s.rows} for s in split.shards],
                    }
                    for name, split in self.splits.items()
                },
                "plan_digest": self.plan_digest,
                "shard_size": self.shard_size,
                "seed": self.seed,
                "skipped": [
                    {"split": s.split, "key": s.key, "reason": s.reason} for s in self.skipped
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            raw: dict[str, Any] = json.loads(text)
            version = raw["format_version"]
            if version != FORMAT_VERSION:
                raise ShardFormatError(
                    f"{where}: format_version {version} is not supported (this raydsnas reads "
                    f"version {FORMAT_VERSION}); rewrite the shards with "
                    "python -m raydsnas.data.shard"
                )
            splits = {
                name: SplitInfo(
                    shards=tuple(ShardEntry(s["path"], int(s["rows"])) for s in split["shards"]),
                    class_counts=tuple(int(c) for c in split["class_counts"]),
                )
                for name, split in raw["splits"].items()
            }
            return cls(
                classes=tuple(raw["classes"]),
                splits=splits,
                plan_digest=raw["plan_digest"],
                shard_size=int(raw["shard_size"]),
                seed=int(raw["seed"]),
                format_version=version,
                # Absent from manifests written before the writer verified images.
                skipped=tuple(
                    SkippedImage(s["split"], s["key"], s["reason"]) for s in raw.get("skipped", [])
                ),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ShardFormatError(f"{where}: not a valid shard manifest ({error!r})") from None


def read_manifest(fs: pafs.FileSystem, root: str, uri: str) -> Manifest:
    """Read `_manifest.json` under `root`; `ShardSetNotFoundError` says whether the prefix is
    missing/empty or holds files but no manifest."""
    path = join_path(root, MANIFEST_NAME)
    if fs.get_file_info(path).type != pafs.FileType.File:
        listing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
        if not listing:
            raise ShardSetNotFoundError(
                f"no shard set at {uri}: the location is missing or empty "
                "(write shards there with: python -m raydsnas.data.shard SRC DST)"
            )
        names = sorted(info.base_name for info in listing)[:5]
        raise ShardSetNotFoundError(
            f"no shard set at {uri}: {MANIFEST_NAME} not found (found {len(listing)} entries, "
            f"e.g. {names}); a shard set is written by python -m raydsnas.data.shard, which "
            "writes the manifest last"
        )
    manifest = Manifest.from_json(read_bytes(fs, path).decode(), where=f"{uri}/{MANIFEST_NAME}")
    return Manifest(**{**manifest.__dict__, "root": uri})


def write_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest) -> None:
    write_bytes_atomic(fs, join_path(root, MANIFEST_NAME), manifest.to_json().encode())


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise `ShardFormatError` unless `schema` has the shard columns with compatible types."""
    compatible = {
        "image": (pa.types.is_binary, pa.types.is_large_binary),
        "label": (pa.types.is_integer,),
        "key": (pa.types.is_string, pa.types.is_large_string),
    }
    problems = []
    for name, checks in compatible.items():
        if name not in schema.names:
            problems.append(f"no column {name!r}")
        elif not any(check(schema.field(name).type) for check in checks):
            problems.append(f"column {name!r} is {schema.field(name).type}")
    if problems:
        found = ", ".join(f"{f.name}: {f.type}" for f in schema)
        expected = ", ".join(f"{f.name}: {f.type}" for f in SHARD_SCHEMA)
        raise ShardFormatError(
            f"shard {where} has the wrong schema ({'; '.join(problems)}): found ({found}), "
            f"expected ({expected})"
        )


def read_shard_footer(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    with fs.open_input_file(path) as stream:
        return pq.ParquetFile(stream).metadata


def read_shard_tables(
    fs: pafs.FileSystem,
    path: str,
    *,
    where: str,
    retried_errors: Sequence[str] = (),
    attempts: int = 3,
) -> Iterator[pa.Table]:
    """Yield the shard at `path` one row group at a time, each with a `path` column (= `path`).

    A garbled data page (the footer may be intact) raises `ShardFormatError` naming `where`, the
    shard's URI; a failure of the store itself stays an OSError for `storage_errors`. Errors whose
    message holds one of `retried_errors` (transient S3 failures) reopen the file and go on from
    the row group that failed, up to `attempts` times in all.
    """
    done = 0
    for attempt in range(1, attempts + 1):
        try:
            with fs.open_input_file(path) as stream:
                shard = pq.ParquetFile(stream, pre_buffer=True)
                for group in range(done, shard.num_row_groups):
                    table = shard.read_row_group(group)
                    yield table.append_column("path", pa.repeat(path, table.num_rows))
                    done += 1
            return
        except (OSError, pa.ArrowException) as error:
            message = str(error)
            if attempt < attempts and any(marker in message for marker in retried_errors):
                continue
            if isinstance(error, OSError) and is_store_failure(message):
                raise
            raise ShardFormatError(
                f"shard {where} is corrupt: row group {done} cannot be read "
                f"({type(error).__name__}: {message.strip()}); delete it and rerun "
                "python -m raydsnas.data.shard with the same arguments to write it again"
            ) from None


def complete_shard_skips(
    fs: pafs.FileSystem, path: str, *, plan_digest: str, index: int, planned_rows: int
) -> list[tuple[str, str]] | None:
    """The (key, reason) pairs a complete shard of the plan `plan_digest` left out, when `path`
    is one (its rows plus those pairs make `planned_rows`); None for anything else (missing,
    truncated, stale, foreign)."""
    try:
        footer = read_shard_footer(fs, path)
    except (OSError, pa.ArrowInvalid):
        return None
    metadata = footer.metadata or {}
    try:
        skipped = [(str(k), str(r)) for k, r in json.loads(metadata.get(SKIPPED_METADATA_KEY, b"[]"))]
    except (ValueError, TypeError):
        return None
    complete = (
        footer.num_rows + len(skipped) == planned_rows
        and metadata.get(PLAN_DIGEST_METADATA_KEY) == plan_digest.encode()
        and metadata.get(SHARD_INDEX_METADATA_KEY) == str(index).encode()
    )
    return skipped if complete else None


def verify_shards(fs: pafs.FileSystem, root: str, uri: str, manifest: Manifest, split: str) -> None:
    """Check every shard the manifest lists for `split` before a pipeline starts: it exists, has
    the shard schema, the manifest's row count and plan digest, and (from the Parquet statistics)
    labels inside [0, num_classes). Raises `ShardFormatError` naming the shard."""

    def check(entry: ShardEntry) -> None:
        where = f"{uri}/{entry.path}"
        try:
            footer = read_shard_footer(fs, join_path(root, entry.path))
        except OSError as error:
            if is_store_failure(str(error)):
                raise  # the store failed, not the shard: storage_errors() names the cause
            if fs.get_file_info(join_path(root, entry.path)).type != pafs.FileType.NotFound:
                raise ShardFormatError(
                    f"shard {where} is not a readable Parquet file: {error}"
                ) from None
            raise ShardFormatError(
                f"shard {where} is listed in {MANIFEST_NAME} but missing; rerun the shard writer "
                "to complete the set"
            ) from None
        except pa.ArrowInvalid as error:
            raise ShardFormatError(
                f"shard {where} is not a readable Parquet file: {error}"
            ) from None
        check_schema(footer.schema.to_arrow_schema(), where)
        if footer.num_rows != entry.rows:
            raise ShardFormatError(
                f"shard {where} has {footer.num_rows} rows, the manifest says {entry.rows}"
            )
        digest = (footer.metadata or {}).get(PLAN_DIGEST_METADATA_KEY, b"").decode()
        if digest != manifest.plan_digest:
            raise ShardFormatError(
                f"shard {where} belongs to another shard plan ({digest or 'none'}) than "
                f"{MANIFEST_NAME} ({manifest.plan_digest}); rerun the shard writer"
            )
        low, high = _label_range(footer)
        if low is not None and (low < 0 or high >= manifest.num_classes):
            raise LabelOutOfRangeError(
                f"shard {where} holds labels in [{low}, {high}] but the manifest has "
                f"{manifest.num_classes} classes (labels 0..{manifest.num_classes - 1})"
            )

    with ThreadPoolExecutor(FOOTER_CHECK_THREADS) as pool:
        list(pool.map(check, manifest.splits[split].shards))


def count_selection(
    fs: pafs.FileSystem, root: str, manifest: Manifest, fraction: float
) -> int:
    """How many training rows the selection split at `fraction` holds, from the `key` column
    of every training shard (a small column: ~1% of an image shard's bytes)."""

    def count(path: str) -> int:
        try:
            with fs.open_input_file(join_path(root, path)) as stream:
                keys = pq.ParquetFile(stream).read(columns=["key"]).column("key").to_pylist()
        except (OSError, pa.ArrowException) as error:
            if isinstance(error, OSError) and is_store_failure(str(error)):
                raise  # storage_errors() names the store's failure
            raise ShardFormatError(
                f"shard {manifest.root}/{path} is corrupt: its key column cannot be read "
                f"({type(error).__name__}: {str(error).strip()})"
            ) from None
        return int(selection_mask(keys, fraction).sum())

    shards = [entry.path for entry in manifest.splits["train"].shards]
    with ThreadPoolExecutor(FOOTER_CHECK_THREADS) as pool:
        return sum(pool.map(count, shards))


def _label_range(footer: pq.FileMetaData) -> tuple[int | None, int | None]:
    """(min, max) label from the Parquet statistics, or (None, None) when they are absent; the
    per-row check in the decoder still catches those shards."""
    column = footer.schema.to_arrow_schema().get_field_index("label")
    low = high = None
    for group in range(footer.num_row_groups):
        stats = footer.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None, None
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    return low, high
