"""The selection split on the Ray Data path: `build_datasets(..., selection_fraction=f)` holds
training rows out by the hash of their keys; `train` never yields them, `select` yields exactly
them, the same ones in every build and at every world size, none of them from `val`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raydsnas.data import DataSpec, build_datasets, execution_options
from raydsnas.data.selection import is_selected

DIGITS = {"uri": "builtin:digits", "image_size": 8, "crop_scale": (0.5, 1.0), "keep_keys": True,
          "shuffle_buffer": 0}
TRAIN_KEYS = 1500  # the built-in digits' training split


def keys_of(dataset) -> list[str]:
    return [str(k) for batch in dataset.iter_batches(batch_size=256) for k in batch["key"]]


def test_selection_rows_leave_train_for_select_by_key_and_the_counts_are_exact(
    ray_local, builtin_cache
):
    spec = DataSpec(**DIGITS)
    data = build_datasets(spec, selection_fraction=0.1)
    train, select, val = keys_of(data.train), keys_of(data.select), keys_of(data.val)
    assert len(set(train)) == len(train) and len(set(select)) == len(select)
    assert set(train).isdisjoint(select) and set(val).isdisjoint(select)
    assert set(val).isdisjoint(train)
    assert len(train) + len(select) == TRAIN_KEYS
    assert all(is_selected(k, 0.1) for k in select) and not any(is_selected(k, 0.1) for k in train)
    assert (data.num_train, data.num_select) == (len(train), len(select))
    assert 0.05 < len(select) / TRAIN_KEYS < 0.15
    # Select rows go through the validation transform: the same pixels in every pass.
    a = {str(k): im for b in data.select.iter_batches(batch_size=256)
         for k, im in zip(b["key"], b["image"], strict=True)}
    b = {str(k): im for b in data.select.iter_batches(batch_size=256)
         for k, im in zip(b["key"], b["image"], strict=True)}
    assert all(np.array_equal(a[k], b[k]) for k in a)

    again = build_datasets(spec, selection_fraction=0.1, start_epoch=3)
    assert sorted(keys_of(again.select)) == sorted(select)
    # DSNAS and the rest: no selection split, the whole training split trains.
    plain = build_datasets(spec)
    assert plain.select is None and plain.num_train == TRAIN_KEYS
    assert len(keys_of(plain.train)) == TRAIN_KEYS


@pytest.mark.slow
def test_the_same_rows_are_held_out_on_two_workers(ray_local, builtin_cache, tmp_path):
    import ray.train
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = DataSpec(**DIGITS)
    data = build_datasets(spec, selection_fraction=0.1)
    single = sorted(keys_of(data.select))
    out = tmp_path / "keys"
    out.mkdir()

    def train_loop(config: dict) -> None:
        rank = ray.train.get_context().get_world_rank()
        seen = {split: [str(k) for b in ray.train.get_dataset_shard(split).iter_batches(
                    batch_size=64) for k in b["key"]] for split in ("train", "select")}
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))

    datasets = {"train": data.train, "val": data.val, "select": data.select}
    TorchTrainer(
        train_loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(datasets),
                                  execution_options=execution_options(spec)),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="held-out"),
    ).fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    select = ranks[0]["select"] + ranks[1]["select"]
    train = ranks[0]["train"] + ranks[1]["train"]
    # Ray Train splits every dataset with `streaming_split(equal=True)`: a pass over a split
    # may leave out up to world_size - 1 rows (val too); the held-out set itself is exact.
    assert len(set(select)) == len(select) and set(select) <= set(single)
    assert len(select) >= len(single) - 1
    assert set(train).isdisjoint(single) and len(train) >= TRAIN_KEYS - len(single) - 1
