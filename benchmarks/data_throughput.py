"""Decode + augment throughput: the raydsnas Ray Data pipeline vs ImageFolder + DataLoader.

Both read the same generated JPEGs (ImageNet-like sizes), apply RandomResizedCrop(224) + horizontal
flip and deliver uint8 NCHW batches (normalisation is left to the device in both), with the same
number of CPUs: Ray gets `--cpus` CPUs, the DataLoader `--cpus` worker processes. Both run a
warm-up epoch (process start-up), then `--epochs` timed epochs each, alternating, so that other
load on the machine hits both alike. Prints images/s per epoch and the median ratio. Each Ray Data
epoch includes its fixed start (file listing, first tasks), which a 1.28M-image epoch amortises and
a small one does not: use as many images as the disk allows.

    python benchmarks/data_throughput.py [--images 2000] [--cpus 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BATCH_SIZE = 64
IMAGE_SIZE = 224


def write_jpegs(root: Path, count: int, classes: int, seed: int = 0, low: int = 300,
                high: int = 500) -> None:
    """Photo-like JPEGs: smooth random colour fields plus fine noise, `low`-`high` px a side
    (default 300-500, ImageNet-like)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"{i:06d}.JPEG", quality=90
        )


def timed_epoch(run_epoch) -> float:
    """Images/s of one epoch."""
    start = time.perf_counter()
    images = run_epoch()
    return images / (time.perf_counter() - start)


def ray_data_epochs(shards: Path, cpus: int):
    """Start Ray with `cpus` CPUs, build the training dataset; return a function running one
    epoch (a full pass through `iter_train_batches`) and returning its image count."""
    import ray

    from raydsnas.data import DataSpec, build_datasets, iter_train_batches

    # address="local": a fresh instance of our own, even if a cluster already runs on this machine
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = DataSpec(uri=str(shards), image_size=IMAGE_SIZE)
    train, _, _ = build_datasets(spec)
    epoch = 0

    def run_epoch() -> int:
        nonlocal epoch
        batches = iter_train_batches(
            train, spec, epoch=epoch, batch_size=BATCH_SIZE, drop_last=False
        )
        epoch += 1
        return sum(len(batch["label"]) for batch in batches)

    return run_epoch


def dataloader_epochs(folder: Path, cpus: int):
    """The same for torchvision's ImageFolder + DataLoader with `cpus` worker processes."""
    import torch
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(
        str(folder),
        transform=transforms.Compose(
            [
                transforms.RandomResizedCrop(IMAGE_SIZE),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        ),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=cpus, persistent_workers=True
    )

    def run_epoch() -> int:
        return sum(len(labels) for _, labels in loader)

    return run_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from raydsnas.data import write_shards

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        folder, shards = Path(scratch) / "jpegs", Path(scratch) / "shards"
        write_jpegs(folder, args.images, args.classes)
        # 8 shards or more, so that the file shuffle and the CPUs have something to spread.
        shard_size = max(1, min(1000, args.images // (4 * args.cpus)))
        # Train split = every file, as the DataLoader sees them (the val split is not read).
        write_shards(
            str(folder), str(shards), shard_size=shard_size, val_src=str(folder), use_ray=False
        )

        ray_epoch = ray_data_epochs(shards, args.cpus)
        loader_epoch = dataloader_epochs(folder, args.cpus)
        ray_epoch(), loader_epoch()  # warm-up: worker processes start, caches fill
        # Alternate the two, so that other load on the machine hits both alike.
        ray_rates, loader_rates = [], []
        for _ in range(args.epochs):
            ray_rates.append(timed_epoch(ray_epoch))
            loader_rates.append(timed_epoch(loader_epoch))
        ray.shutdown()

    ratios = [r / d for r, d in zip(ray_rates, loader_rates, strict=True)]
    print(
        f"{args.images} JPEGs of 300-500 px, {args.cpus} CPUs, "
        f"RandomResizedCrop({IMAGE_SIZE}) + flip, batch {BATCH_SIZE}"
    )
    print("epoch  Ray Data img/s  DataLoader img/s  ratio")
    for epoch, (ray_rate, loader_rate, ratio) in enumerate(
        zip(ray_rates, loader_rates, ratios, strict=True)
    ):
        print(f"{epoch:5d}  {ray_rate:14.1f}  {loader_rate:16.1f}  {ratio:5.2f}")
    median = statistics.median(ratios)
    print(f"ratio Ray Data / DataLoader (median of {len(ratios)}) = {median:.2f}x")


if __name__ == "__main__":
    main()
