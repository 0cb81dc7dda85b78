"""Every data source a job's `data.uri` can name, opened through one place:

    synthetic:<classes>/<train>/<val>   an in-memory task made in each worker, no I/O
                                        (`raydsnas.data.synthetic`)
    builtin:<name>                      a built-in set (`raydsnas.data.builtin`): a shard set in
                                        the local cache, written on first use
    a local path or s3://bucket/prefix  a shard set (`raydsnas.data.format`)

- `describe_source(spec, selection_fraction)`: the source's facts (`SourceFacts`: classes, and
  the samples of each split), from the manifest alone for a shard set. Imports no Ray: the dry
  run uses it.
- `open_source(spec, ...)`, in the driver: the same facts, exact, with the Ray Datasets to hand
  Ray Train (`raydsnas.data.pipeline.build_datasets`; none for synthetic data, which every
  worker makes for itself).
- `WorkerData(spec, selection_fraction, rank, world)`, in a Ray Train worker: this rank's batches
  of each split, uint8 images and int64 labels on the CPU.
- `in_memory_splits(uri, image_size)`: the whole train and val splits as uint8 tensors, for
  in-process users (`raydsnas.analysis`); built-in and synthetic sets only.

Importing this module does not import Ray; only `open_source` and `WorkerData` on a shard set do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow.fs as pafs
import torch

from raydsnas.data.builtin import (
    BUILTIN_PREFIX,
    builtin_shard_set,
    digits_arrays,
    shapes_arrays,
)
from raydsnas.data.errors import DataSpecError
from raydsnas.data.format import Manifest, count_selection, read_manifest
from raydsnas.data.spec import DataSpec
from raydsnas.data.storage import resolve_filesystem, storage_errors
from raydsnas.data.synthetic import PREFIX as SYNTHETIC_PREFIX
from raydsnas.data.synthetic import SyntheticData

SourceKind = Literal["synthetic", "builtin", "shards"]
# The built-in sets `in_memory_splits` makes without their shard set.
IN_MEMORY_BUILTINS = ("builtin:digits", "builtin:shapes")


def source_kind(uri: str) -> SourceKind:
    """What `uri` names: `synthetic` data, a `builtin` set, or a shard set (`shards`)."""
    if uri.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    if uri.startswith(BUILTIN_PREFIX):
        return "builtin"
    return "shards"


@dataclass(frozen=True)
class SourceFacts:
    """What the driver and the dry run need to know about a source before training.

    `num_train` counts the training samples left to train on (the training split less the
    selection split), `num_select` the ones held out (0 without a selection split)."""

    kind: SourceKind
    num_classes: int
    num_train: int
    num_val: int
    num_select: int = 0


def shard_set_location(spec: DataSpec) -> tuple[str, Mapping[str, Any]]:
    """The shard-set URI and storage options `spec.uri` reads: a built-in set's local cache
    (written on first use) or the URI itself. Synthetic data has none (ValueError)."""
    kind = source_kind(spec.uri)
    if kind == "synthetic":
        raise ValueError(f"data.uri = {spec.uri!r} is synthetic data, not a shard set")
    if kind == "builtin":
        return builtin_shard_set(spec.uri[len(BUILTIN_PREFIX):]), {}
    return spec.uri.rstrip("/"), spec.storage_options


def count_held_out(fs: pafs.FileSystem, root: str, manifest: Manifest, spec: DataSpec,
                   fraction: float) -> int:
    """Training rows of a shard set that the selection split at `fraction` holds (from the
    shards' keys; 0 at fraction 0). A fraction that holds none raises `DataSpecError`."""
    if not fraction:
        return 0
    num_select = count_selection(fs, root, manifest, fraction)
    if num_select == 0:
        raise DataSpecError(
            f"data.uri = {spec.uri!r}: search.selection_fraction = {fraction} holds out none "
            f"of the {manifest.splits['train'].num_samples} training samples; raise it or use "
            "a larger data set")
    return num_select


def describe_source(spec: DataSpec, selection_fraction: float = 0.0) -> SourceFacts:
    """The classes and sample counts of `spec.uri`. A shard set's come from its manifest (a
    missing split counts 0; nothing else is checked), with `selection_fraction` > 0 also from
    its training shards' keys. Raises `DataError`s for a store or shard set that cannot be read,
    ValueError for a malformed synthetic URI."""
    kind = source_kind(spec.uri)
    if kind == "synthetic":
        data = SyntheticData.parse(spec.uri, spec.image_size, spec.seed, selection_fraction)
        return SourceFacts(kind, data.num_classes, data.num_train - data.num_select,
                           data.num_val, data.num_select)
    uri, options = shard_set_location(spec)
    fs, root = resolve_filesystem(uri, options)
    with storage_errors(uri, options):
        manifest = read_manifest(fs, root, uri)
        num_select = count_held_out(fs, root, manifest, spec, selection_fraction)
    counts = {name: split.num_samples for name, split in manifest.splits.items()}
    return SourceFacts(kind, manifest.num_classes, counts.get("train", 0) - num_select,
                       counts.get("val", 0), num_select)


@dataclass(frozen=True)
class DriverData:
    """What the driver hands Ray Train: the source's facts, the datasets to split over the
    workers (`train`, `val` and, with a selection split, `select`; empty for synthetic data)
    and, with `data.skip_corrupt`, the counter of images the pipeline left out."""

    facts: SourceFacts
    datasets: dict[str, Any] = field(default_factory=dict)
    skipped: Any = None  # raydsnas.data.pipeline.SkippedImages | None


def open_source(spec: DataSpec, *, selection_fraction: float = 0.0,
                start_epoch: int = 0) -> DriverData:
    """Open `spec.uri` in the driver. A shard set is read and checked here, before any worker
    starts (`build_datasets`: manifest, every shard's footer, exact selection counts), and its
    training order starts at `start_epoch` (a resume continues the data order)."""
    if source_kind(spec.uri) == "synthetic":
        return DriverData(describe_source(spec, selection_fraction))
    from raydsnas.data.pipeline import build_datasets  # imports Ray

    data = build_datasets(spec, start_epoch=start_epoch, selection_fraction=selection_fraction)
    datasets = {"train": data.train, "val": data.val}
    if data.select is not None:
        datasets["select"] = data.select
    facts = SourceFacts(source_kind(spec.uri), data.manifest.num_classes, data.num_train,
                        data.manifest.splits["val"].num_samples, data.num_select)
    return DriverData(facts, datasets, data.skipped)


Batch = dict[str, torch.Tensor]


class WorkerData:
    """One Ray Train worker's view of the source: rank `rank` of `world`'s batches of each
    split, `{"image": uint8 [N, 3, S, S], "label": int64 [N]}` on the CPU. A shard set's come
    from the datasets `open_source` handed Ray Train; synthetic data is made here."""

    def __init__(self, spec: DataSpec, selection_fraction: float, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.synthetic = (SyntheticData.parse(spec.uri, spec.image_size, spec.seed,
                                              selection_fraction)
                          if source_kind(spec.uri) == "synthetic" else None)

    def train_batches(self, epoch: int, batch_size: int, steps: int) -> Iterator[Batch]:
        """This rank's training batches of `epoch`, `batch_size` each. Synthetic data yields
        exactly `steps`; a shard set yields the rank's whole shard of the epoch (the caller
        stops where it needs to and drains the rest)."""
        if self.synthetic is not None:
            return self.synthetic.train_batches(epoch, self.rank, self.world,
                                                batch_size * self.world, steps)
        import ray.train

        from raydsnas.data.pipeline import iter_train_batches

        return iter_train_batches(ray.train.get_dataset_shard("train"), self.spec, epoch=epoch,
                                  batch_size=batch_size, rank=self.rank)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """This rank's part of `split` (`val`, or `select`: the selection split), in order."""
        if self.synthetic is not None:
            batches = (self.synthetic.val_batches if split == "val"
                       else self.synthetic.select_batches)
            return batches(self.rank, self.world, batch_size)
        import ray.train

        return iter(ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=batch_size, drop_last=False, device="cpu"))


Split = tuple[torch.Tensor, torch.Tensor]


def in_memory_splits(uri: str, image_size: int, seed: int = 0, *,
                     name: str = "data.uri") -> tuple[Split, Split]:
    """(train, val), each (uint8 images [N, 3, H, W], int64 labels [N]), of a built-in set at
    its native size (`builtin:digits` 8x8 with its gray channel repeated, `builtin:shapes`
    16x16) or of synthetic data at `image_size` (seeded by `seed`). Other sources raise
    ValueError, calling the URI `name` (e.g. a command-line flag)."""
    if source_kind(uri) == "synthetic":
        synthetic = SyntheticData.parse(uri, image_size, seed)
        return synthetic._split("train"), synthetic._split("val")
    if uri not in IN_MEMORY_BUILTINS:
        raise ValueError(f"{name} {uri!r} is not allowed; expected one of "
                         f"{sorted(IN_MEMORY_BUILTINS)} or 'synthetic:<classes>/<train>/<val>'")

    def split(which: str) -> Split:
        if uri == "builtin:digits":
            pixels, labels = digits_arrays(which)
            images = torch.from_numpy(pixels).unsqueeze(1).expand(-1, 3, -1, -1)  # gray -> RGB
        else:
            pixels, labels = shapes_arrays(which)
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # NHWC -> NCHW
        return images, torch.from_numpy(labels)

    return split("train"), split("val")
