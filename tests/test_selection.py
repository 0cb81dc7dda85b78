"""The selection split of the two-stage baselines, in process: SPOS and random search score
their candidates on training samples held out of all training (never on the validation split
the final child is reported on), the same samples at every world size and in every build."""

import numpy as np
import pytest
import torch

from raydsnas import SearchSpace
from raydsnas.config import ConfigError, load_config
from raydsnas.data.selection import index_key, index_selection_mask, is_selected
from raydsnas.data.synthetic import SyntheticData
from raydsnas.data.tensors import TensorBatches
from raydsnas.strategies import STRATEGIES, build_strategy

SPACE = SearchSpace(num_classes=4, input_size=8, width_mult=0.25, stage_repeats=(1, 1, 1, 1),
                    stem_stride=1, dropout=0.0)
ONE_SHOT = {"lr": 0.05, "epochs": 1, "steps_per_epoch": 4, "warmup_epochs": 0, "bn_batches": 2,
            "selection_fraction": 0.25}
SEARCH = {"spos": {"population": 4, "iterations": 2, "top_k": 2, "mutations": 2, "crossovers": 2},
          "random": {"num_samples": 4}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def indexed(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel is the sample's index (+ offset): a batch names its samples."""
    images = (torch.arange(n, dtype=torch.float32) + offset).view(n, 1, 1, 1).expand(n, 3, 8, 8)
    return images.contiguous(), torch.arange(n) % SPACE.num_classes


def ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].long().tolist()


def test_tensor_batches_never_train_on_the_selection_split_and_evaluate_it_apart_from_val():
    data = TensorBatches(indexed(40), indexed(10, offset=1000), batch_size=4,
                         selection_fraction=0.25)
    held_out = set(data.select_indices.tolist())
    assert held_out == {i for i in range(40) if is_selected(index_key(i), 0.25)} != set()
    assert held_out.isdisjoint(data.train_indices.tolist())
    assert len(held_out) + len(data.train_indices) == 40
    trained = {i for epoch in range(3) for images, _ in data.train(epoch) for i in ids(images)}
    assert trained and trained.isdisjoint(held_out) and trained <= set(data.train_indices.tolist())

    seen: dict[str, list[int]] = {}
    for split in ("val", "select"):
        rows = seen[split] = []

        def forward(x, rows=rows):
            rows += ids(x)
            return torch.zeros(len(x), SPACE.num_classes)
        assert data.evaluate(forward, split=split)[f"{split}_samples"] == len(rows)
    assert sorted(seen["select"]) == sorted(held_out)
    assert sorted(seen["val"]) == list(range(1000, 1010))  # the val tensors, none of train's

    # Without a fraction nothing is held out and the order is the historical one.
    plain = TensorBatches(indexed(40), indexed(10, offset=1000), batch_size=4)
    assert len(plain.select_indices) == 0 and len(plain.train_indices) == 40
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:4].tolist()
    assert ids(next(plain.train(0))[0]) == order
    with pytest.raises(ValueError, match="no selection split"):
        plain.evaluate(lambda x: torch.zeros(len(x), 4), split="select")


def test_synthetic_selection_split_is_the_same_at_every_world_size_and_build_and_never_trained():
    data = SyntheticData.parse("synthetic:4/96/16", 4, seed=3, selection_fraction=0.2)
    again = SyntheticData.parse("synthetic:4/96/16", 4, seed=3, selection_fraction=0.2)
    images, _ = data._split("train")
    index_of = {bytes(img.numpy()): i for i, img in enumerate(images)}
    assert len(index_of) == 96  # every sample is recognisable by its pixels

    def rows(batches) -> list[int]:
        return [index_of[bytes(img.numpy())] for b in batches for img in b["image"]]

    held_out = set(np.flatnonzero(index_selection_mask(96, 0.2)).tolist())
    assert set(data.select_indices.tolist()) == set(again.select_indices.tolist()) == held_out
    assert data.num_select == len(held_out) > 0
    one = rows(data.select_batches(0, 1, 8))
    two = rows(data.select_batches(0, 2, 4)) + rows(data.select_batches(1, 2, 4))
    assert sorted(one) == sorted(two) == sorted(held_out)
    steps = (96 - len(held_out)) // 16
    for world in (1, 2):
        trained = {i for epoch in range(2) for r in range(world)
                   for i in rows(data.train_batches(epoch, r, world, 16, steps))}
        assert trained.isdisjoint(held_out) and len(trained) > 50
    # No fraction: the same permutation as before the selection split existed.
    plain = SyntheticData.parse("synthetic:4/96/16", 4, seed=3)
    first = rows(plain.train_batches(0, 0, 1, 16, 1))
    assert first == np.random.default_rng([3, 0]).permutation(96)[:16].tolist()


class SelectOnly:
    """A `SearchData` whose validation split must not be read: it raises."""

    def __init__(self, data: TensorBatches):
        self.data, self.calls = data, []

    def train(self, epoch, limit=None):
        return self.data.train(epoch, limit)

    def evaluate(self, forward, collective=None, prefix=None, split="val"):
        self.calls.append(split)
        if split != "select":
            raise AssertionError(f"the search read the {split!r} split")
        return self.data.evaluate(forward, collective, prefix, split)


@pytest.mark.parametrize("name", ["spos", "random"])
def test_search_scores_candidates_on_the_selection_split_and_never_reads_val(name):
    s = build_strategy(name, SPACE, STRATEGIES[name].config(**ONE_SHOT, **SEARCH[name]))
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 4, (40,), generator=g))
    val = (torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g))
    data = SelectOnly(TensorBatches(train, val, batch_size=6, selection_fraction=0.25))
    for images, labels in data.train(0):
        s.step(images, labels)
    metrics = s.end_search(data, 1)

    assert data.calls and set(data.calls) == {"select"}
    assert len(data.calls) == len(s.search_log) + 1  # each candidate, then the chosen one's BN
    assert metrics["search_split"] == "select"
    assert metrics["search_select_samples"] == len(data.data.select_indices)
    # The fitness is the selection split's score: the chosen child's, measured again.
    chosen = data.data.evaluate(lambda x: s.predict(x, s.chosen), split="select")
    entry = next(e for e in s.search_log if e["arch"] == s.chosen)
    assert metrics["search_select_top1"] == entry["select_top1"] == chosen["select_top1"]
    assert max(e["select_top1"] for e in s.search_log) == metrics["search_select_top1"]


def test_selection_fraction_config_key():
    job = load_config(None, ["search.strategy=spos"])
    assert job.search.selection_fraction == 0.1
    assert job.search.strategy_config(1, 0.1).selection_fraction == 0.1
    assert load_config(None, ["search.strategy=random", "search.selection_fraction=0.5"]
                       ).search.selection_fraction == 0.5
    assert load_config(None, []).search.selection_fraction == 0.0  # dsnas: no selection split
    for bad in ("0", "0.9", "-0.1"):
        with pytest.raises(ConfigError, match=r"search.selection_fraction = .* is not allowed; "
                           r"expected a number in \(0, 0.5\]"):
            load_config(None, ["search.strategy=spos", f"search.selection_fraction={bad}"])
    with pytest.raises(ConfigError, match=r"key 'selection_fraction' belongs to search.strategy "
                       r"\['spos', 'random'\]"):
        load_config(None, ["search.selection_fraction=0.1"])
