"""The selection split: a fixed share of the training split that the two-stage baselines (SPOS,
random search) hold out to score their candidate architectures, so that the validation split,
on which the final child is reported, plays no part in choosing it.

A sample belongs to the selection split when the stable hash of its key falls in the first
`fraction` of `SELECTION_BUCKETS` buckets. The rule depends on the key alone: the same samples
are held out on every rank, at every world size, after a resume and on every machine, whatever
the shard order. Shard rows use their `key` column; the in-memory sets (`synthetic:` data,
`TensorBatches`) use `index_key(i)`, sample i's index as a decimal string.

Held-out samples are held out for the whole run (supernet training, BN recalibration and the
final retrain/finetune phase), as the SPOS paper held 50k ImageNet training images out of all
its training for its search. Imports no Ray: in-process users read it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SELECTION_BUCKETS = 10_000


def stable_key_hash(key: str) -> int:
    """A 64-bit hash of a sample key that is the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def is_selected(key: str, fraction: float) -> bool:
    """Whether the sample `key` is in the selection split held out at `fraction` (0: never)."""
    return stable_key_hash(key) % SELECTION_BUCKETS < round(fraction * SELECTION_BUCKETS)


def index_key(index: int) -> str:
    """The key of sample `index` of an in-memory training set."""
    return str(int(index))


def selection_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """A boolean array: which of `keys` are held out at `fraction`."""
    if fraction <= 0:
        return np.zeros(len(keys), bool)
    return np.fromiter((is_selected(str(k), fraction) for k in keys), dtype=bool,
                       count=len(keys))


def index_selection_mask(count: int, fraction: float) -> np.ndarray:
    """Which of the samples 0..count-1 of an in-memory training set are held out."""
    if fraction <= 0:
        return np.zeros(count, bool)
    return selection_mask([index_key(i) for i in range(count)], fraction)


@dataclass(frozen=True)
class KeyFilter:
    """Keeps one side of the hold-out: the selection split (`selected`) or the rows left to train."""

    fraction: float
    selected: bool

    def keeps(self, key: str) -> bool:
        return is_selected(key, self.fraction) == self.selected
