"""Command line of the shard writer (implementation: `raydsnas.data.writer`).

    python -m raydsnas.data.shard SRC DST [--shard-size N] [--val-src VAL_SRC | --val-fraction F]
        [--seed S] [--storage-option KEY=VALUE ...]

Turns `SRC/<class>/<image>` into a shard set at DST (a local path or s3://bucket/prefix); a rerun
completes an interrupted set. S3 credentials come from the AWS_* environment (or roles).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from raydsnas.data.writer import DEFAULT_SHARD_SIZE, write_shards


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raydsnas.data.shard",
        description="Turn an ImageNet-style folder SRC/<class>/<image> into Parquet shards at DST "
        "(local path or s3://bucket/prefix). Reruns complete an interrupted set.",
    )
    parser.add_argument("src", help="image folder: SRC/<class>/<image>.jpg|png")
    parser.add_argument("dst", help="shard-set location: a local path or s3://bucket/prefix")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="rows per shard (default %(default)s)",
    )
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-src", help="validation folder with the same classes")
    split.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of each class of SRC for validation",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shard order")
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="S3 option for DST (and an S3 SRC), e.g. endpoint_url=http://host:9000; "
        "repeatable. Credentials come from the AWS_* environment",
    )
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--storage-option {item!r}: expected KEY=VALUE")
        options[key] = _parse_option_value(value)
    report = write_shards(
        args.src,
        args.dst,
        shard_size=args.shard_size,
        val_src=args.val_src,
        val_fraction=args.val_fraction,
        seed=args.seed,
        storage_options=options,
    )
    manifest = report.manifest
    counts = ", ".join(f"{name} {split.num_samples}" for name, split in manifest.splits.items())
    print(
        f"{args.dst}: {manifest.num_classes} classes, {counts} samples; wrote "
        f"{len(report.written)} shards, kept {len(report.kept)} complete shards from before"
    )
    return 0


def _parse_option_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        return value


if __name__ == "__main__":
    sys.exit(main())
