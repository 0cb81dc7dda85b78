"""Command line of the shard writer (implementation: `raydsnas.data.writer`).

    python -m raydsnas.data.shard SRC DST [--shard-size N] [--val-src VAL_SRC | --val-fraction F]
        [--seed S] [--storage-option KEY=VALUE ...] [--skip-corrupt]

Turns `SRC/<class>/<image>` into a shard set at DST (a local path or s3://bucket/prefix); a rerun
completes an interrupted set. S3 credentials come from the AWS_* environment (or roles).
Every image is decoded once while it is sharded; an undecodable one stops the run (nothing is
left at DST) unless `--skip-corrupt` leaves it out and lists it in `_manifest.json`.

Exit status: 0 done; 2 the input is wrong (missing folder, bad option, no credentials,
undecodable image: one line on stderr says which); 1 the store or the machine failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from raydsnas.data.errors import DataError, StorageError
from raydsnas.data.writer import DEFAULT_SHARD_SIZE, write_shards

PROG = "raydsnas.data.shard"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
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
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave undecodable images out (listed under 'skipped' in _manifest.json) "
        "instead of stopping",
    )
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--storage-option {item!r}: expected KEY=VALUE")
        options[key] = _parse_option_value(value)
    import ray.data  # noqa: F401 (configures its loggers on import; quieted below)

    # Ray Data logs each execution's plan and progress at INFO; the CLI prints its own summary.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        report = write_shards(
            args.src,
            args.dst,
            shard_size=args.shard_size,
            val_src=args.val_src,
            val_fraction=args.val_fraction,
            seed=args.seed,
            storage_options=options,
            skip_corrupt=args.skip_corrupt,
        )
    except DataError as error:
        # A store that failed (not a wrong input) is the one DataError that is not the user's.
        print(f"{PROG}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1 if type(error) is StorageError else 2
    manifest = report.manifest
    counts = ", ".join(f"{name} {split.num_samples}" for name, split in manifest.splits.items())
    skipped = f"; skipped {len(manifest.skipped)} undecodable images" if manifest.skipped else ""
    print(
        f"{args.dst}: {manifest.num_classes} classes, {counts} samples; wrote "
        f"{len(report.written)} shards, kept {len(report.kept)} complete shards from before"
        f"{skipped}"
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
