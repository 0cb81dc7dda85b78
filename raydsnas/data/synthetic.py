"""`synthetic:<classes>/<train>/<val>`: a deterministic in-memory image task, for step-cost
benchmarks without I/O and for exact data-parallel equivalence checks.

Sample i of a split is a fixed random colour pattern of its class plus noise seeded by i, as
uint8 NCHW. Each epoch's global order is a permutation seeded by (seed, epoch); global batch t
is positions [t*B, (t+1)*B) of it and rank r of W takes the r-th contiguous slice, so W workers
see exactly the samples one worker would see with batch B.

`selection_fraction` > 0 holds training samples out as the selection split (sample i's key is
`index_key(i)`, see `raydsnas.data.selection`): the epoch's permutation runs over the samples
left, and `select_batches` reads the held-out ones. At 0 nothing changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from raydsnas.data.selection import index_selection_mask

PREFIX = "synthetic:"


@dataclass(frozen=True)
class SyntheticData:
    num_classes: int
    num_train: int
    num_val: int
    image_size: int
    seed: int = 0
    selection_fraction: float = 0.0

    @classmethod
    def parse(cls, uri: str, image_size: int, seed: int,
              selection_fraction: float = 0.0) -> SyntheticData:
        match = re.fullmatch(r"synthetic:(\d+)/(\d+)/(\d+)", uri)
        if not match or min(map(int, match.groups())) < 1:
            raise ValueError(f"data.uri = {uri!r} is not allowed; expected "
                             "synthetic:<classes>/<train samples>/<val samples>, e.g. synthetic:4/512/128")
        classes, train, val = map(int, match.groups())
        data = cls(classes, train, val, image_size, seed, selection_fraction)
        if selection_fraction and not data.num_select:
            raise ValueError(f"data.uri = {uri!r}: search.selection_fraction = "
                             f"{selection_fraction} holds out none of the {train} training "
                             "samples; raise it or use more samples")
        return data

    @cached_property
    def _held_out(self) -> np.ndarray:
        return index_selection_mask(self.num_train, self.selection_fraction)

    @property
    def train_indices(self) -> torch.Tensor:
        """The training samples left to train on (all of them without a selection split)."""
        return torch.from_numpy(np.flatnonzero(~self._held_out))

    @property
    def select_indices(self) -> torch.Tensor:
        """The training samples held out as the selection split."""
        return torch.from_numpy(np.flatnonzero(self._held_out))

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_train if split == "train" else self.num_val
        rng = np.random.default_rng([self.seed, 7])
        patterns = rng.normal(0, 1, (self.num_classes, 3, self.image_size, self.image_size))
        rng = np.random.default_rng([self.seed, 11 if split == "train" else 13])
        labels = rng.integers(0, self.num_classes, n)
        noise = rng.normal(0, 1.0, (n, 3, self.image_size, self.image_size))
        images = np.clip(128 + 40 * (patterns[labels] + noise), 0, 255).astype(np.uint8)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    def train_batches(self, epoch: int, rank: int, world: int, global_batch: int,
                      steps: int) -> Iterator[dict[str, torch.Tensor]]:
        images, labels = self._split("train")
        kept = self.train_indices
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(kept))
        order = kept[torch.from_numpy(permutation)]
        per_rank = global_batch // world
        for t in range(steps):
            idx = order[t * global_batch + rank * per_rank: t * global_batch + (rank + 1) * per_rank]
            yield {"image": images[idx], "label": labels[idx]}

    def val_batches(self, rank: int, world: int, batch: int) -> Iterator[dict[str, torch.Tensor]]:
        images, labels = self._split("val")
        yield from _strided(images, labels, torch.arange(len(labels)), rank, world, batch)

    def select_batches(self, rank: int, world: int,
                       batch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's part of the selection split (training samples, held out)."""
        images, labels = self._split("train")
        yield from _strided(images, labels, self.select_indices, rank, world, batch)

    @property
    def num_select(self) -> int:
        """Training samples held out as the selection split (0 without one)."""
        return int(self._held_out.sum())


def _strided(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, rank: int,
             world: int, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Rank r of W takes every W-th of `indices` from the r-th, in batches."""
    mine = indices[rank::world]
    for i in range(0, len(mine), batch):
        idx = mine[i:i + batch]
        yield {"image": images[idx], "label": labels[idx]}
