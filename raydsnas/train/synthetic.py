"""`synthetic:<classes>/<train>/<val>`: a deterministic in-memory image task, for step-cost
benchmarks without I/O and for exact data-parallel equivalence checks.

Sample i of a split is a fixed random colour pattern of its class plus noise seeded by i, as
uint8 NCHW. Each epoch's global order is a permutation seeded by (seed, epoch); global batch t
is positions [t*B, (t+1)*B) of it and rank r of W takes the r-th contiguous slice, so W workers
see exactly the samples one worker would see with batch B.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

PREFIX = "synthetic:"


@dataclass(frozen=True)
class SyntheticData:
    num_classes: int
    num_train: int
    num_val: int
    image_size: int
    seed: int = 0

    @classmethod
    def parse(cls, uri: str, image_size: int, seed: int) -> SyntheticData:
        match = re.fullmatch(r"synthetic:(\d+)/(\d+)/(\d+)", uri)
        if not match or min(map(int, match.groups())) < 1:
            raise ValueError(f"data.uri = {uri!r} is not allowed; expected "
                             "synthetic:<classes>/<train samples>/<val samples>, e.g. synthetic:4/512/128")
        classes, train, val = map(int, match.groups())
        return cls(classes, train, val, image_size, seed)

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
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(len(labels)))
        per_rank = global_batch // world
        for t in range(steps):
            idx = order[t * global_batch + rank * per_rank: t * global_batch + (rank + 1) * per_rank]
            yield {"image": images[idx], "label": labels[idx]}

    def val_batches(self, rank: int, world: int, batch: int) -> Iterator[dict[str, torch.Tensor]]:
        images, labels = self._split("val")
        mine = torch.arange(rank, len(labels), world)
        for i in range(0, len(mine), batch):
            idx = mine[i:i + batch]
            yield {"image": images[idx], "label": labels[idx]}
