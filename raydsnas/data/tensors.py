"""`SearchData` over in-memory tensors, for one process: tests, `raydsnas.analysis` and the
benchmarks (the Ray Train loop's is `raydsnas.train.loop.Batches`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from raydsnas.data.selection import index_selection_mask
from raydsnas.evaluation import accuracy_from_sums, accuracy_sums

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorBatches:
    """`SearchData` over in-memory tensors, for one process (tests, `raydsnas.analysis`).

    `train(epoch)` yields `batch_size` slices of a permutation seeded by epoch; `evaluate`
    runs the whole validation split (or, `split="select"`, the selection split).
    `selection_fraction` > 0 holds those training samples out (sample i's key is
    `index_key(i)`, `raydsnas.data.selection`): `train` never yields them and `select_indices`
    lists them (positions in the given training tensors; `train_indices` the rest).
    """

    def __init__(self, train: Batch, val: Batch, batch_size: int, seed: int = 0,
                 selection_fraction: float = 0.0):
        images, labels = train
        held_out = torch.from_numpy(index_selection_mask(len(labels), selection_fraction))
        if selection_fraction and not held_out.any():
            raise ValueError(f"selection_fraction = {selection_fraction} holds out none of the "
                             f"{len(labels)} training samples")
        self.train_indices = torch.nonzero(~held_out).flatten()
        self.select_indices = torch.nonzero(held_out).flatten()
        if selection_fraction:
            self.train_images, self.train_labels = images[~held_out], labels[~held_out]
        else:
            self.train_images, self.train_labels = images, labels
        self.select_images, self.select_labels = images[held_out], labels[held_out]
        self.val_images, self.val_labels = val
        self.batch_size, self.seed = batch_size, seed
        self.selection_fraction = selection_fraction

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_labels) // self.batch_size)

    def train(self, epoch: int, limit: int | None = None) -> Iterator[Batch]:
        order = torch.randperm(len(self.train_labels),
                               generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        steps = min(self.steps_per_epoch, limit or self.steps_per_epoch)
        for t in range(steps):
            idx = order[t * self.batch_size:(t + 1) * self.batch_size]
            yield self.train_images[idx], self.train_labels[idx]

    @torch.no_grad()
    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor],
                 collective: Any = None, prefix: str | None = None,
                 split: str = "val") -> dict[str, float]:
        if split == "val":
            images, labels = self.val_images, self.val_labels
        elif split == "select":
            if not self.selection_fraction:
                raise ValueError("no selection split to evaluate on: build TensorBatches with "
                                 "selection_fraction > 0")
            images, labels = self.select_images, self.select_labels
        else:
            raise ValueError(f"split = {split!r}: expected 'val' or 'select'")
        prefix = split if prefix is None else prefix
        sums = torch.zeros(4, dtype=torch.float64)
        for i in range(0, len(labels), self.batch_size):
            sums += accuracy_sums(forward(images[i:i + self.batch_size]),
                                  labels[i:i + self.batch_size])
        acc = accuracy_from_sums(sums)
        return {f"{prefix}_top1": acc.top1, f"{prefix}_top5": acc.top5,
                f"{prefix}_loss": acc.loss, f"{prefix}_samples": acc.count}

