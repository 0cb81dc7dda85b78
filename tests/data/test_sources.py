"""`raydsnas.data.sources`, the one entry point of every `data.uri` kind: synthetic data, the
built-in sets and shard sets on local disk or S3 give their classes and sample counts, the driver
gets Ray Datasets only where there are files to read, and `--print-config` / `--dry-run` never
import Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from raydsnas.data import (
    DataSpec,
    ShardSetNotFoundError,
    WorkerData,
    describe_source,
    in_memory_splits,
    open_source,
    source_kind,
    write_shards,
)
from raydsnas.data.selection import index_selection_mask, selection_mask

ROOT = Path(__file__).resolve().parents[2]


def search_cli_modules(args: list[str], home: Path, cache: Path) -> tuple[int, str, set[str]]:
    """Run `python -m raydsnas.search ARGS` in a fresh interpreter (no RAY_* variables, so no
    cluster to join) and return its exit code, its stdout and the modules it had imported."""
    wrapper = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["raydsnas.search", *{args!r}]
        code = 0
        try:
            runpy.run_module("raydsnas.search", run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        print("MODULES", " ".join(sorted(sys.modules)))
        sys.exit(code)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAYDSNAS_CACHE=str(cache), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", wrapper], cwd=home, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    text, _, modules = out.stdout.rpartition("MODULES ")
    return out.returncode, text + out.stderr, set(modules.split())


@pytest.mark.parametrize("flag", ["--print-config", "--dry-run"])
def test_print_config_and_dry_run_of_the_default_job_do_not_import_ray(flag, tmp_path):
    # A fresh cache: the dry run also builds the built-in digits' shard set (without Ray).
    code, output, modules = search_cli_modules([flag], tmp_path, tmp_path / "cache")
    assert code == 0, output
    if flag == "--dry-run":
        assert "data set:          builtin:digits: 1500 train / 297 val samples, 10 classes" \
            in output
        assert "preflight: OK" in output
    assert "raydsnas.config" in modules and "raydsnas.data.spec" in modules
    assert not {m for m in modules if m == "ray" or m.startswith("ray.")}
    assert "raydsnas.data.pipeline" not in modules


def test_source_kind_names_every_uri_form():
    assert source_kind("synthetic:4/96/16") == "synthetic"
    assert source_kind("builtin:digits") == "builtin"
    assert source_kind("s3://bucket/imagenet") == "shards"
    assert source_kind("/data/imagenet/") == "shards"


def test_synthetic_source_counts_its_uri_and_the_exact_selection_split():
    spec = DataSpec(uri="synthetic:4/96/16", image_size=8, seed=3)
    facts = describe_source(spec)
    assert (facts.kind, facts.num_classes, facts.num_train, facts.num_val, facts.num_select) == \
        ("synthetic", 4, 96, 16, 0)
    held_out = int(index_selection_mask(96, 0.2).sum())
    assert 5 < held_out < 35
    facts = describe_source(spec, selection_fraction=0.2)
    assert (facts.num_train, facts.num_select) == (96 - held_out, held_out)

    driver = open_source(spec, selection_fraction=0.2)  # nothing to read: no Ray Datasets
    assert driver.facts == facts and driver.datasets == {} and driver.skipped is None
    with pytest.raises(ValueError, match="synthetic:<classes>/<train samples>/<val samples>"):
        describe_source(DataSpec(uri="synthetic:4/96", image_size=8))


def test_synthetic_worker_data_splits_every_sample_over_the_ranks_once():
    spec = DataSpec(uri="synthetic:4/96/16", image_size=8, seed=3)
    ranks = [WorkerData(spec, 0.2, rank, 2) for rank in range(2)]
    train = [list(r.train_batches(epoch=0, batch_size=8, steps=3)) for r in ranks]
    assert [len(batches) for batches in train] == [3, 3]
    for batch in train[0] + train[1]:
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 8, 8)
        assert batch["label"].dtype == torch.int64
    held_out = int(index_selection_mask(96, 0.2).sum())
    for split, total in (("val", 16), ("select", held_out)):
        sizes = [sum(len(b["label"]) for b in r.eval_batches(split, batch_size=5)) for r in ranks]
        assert sum(sizes) == total and abs(sizes[0] - sizes[1]) <= 1


def test_builtin_digits_counts_from_its_manifest_and_its_keys(builtin_cache):
    from sklearn.datasets import load_digits

    spec = DataSpec(uri="builtin:digits", image_size=8)
    facts = describe_source(spec)
    assert (facts.kind, facts.num_classes, facts.num_train, facts.num_val, facts.num_select) == \
        ("builtin", 10, 1500, 297, 0)
    assert (builtin_cache / "builtin" / "digits-v1" / "_manifest.json").is_file()
    # The selection split holds the training keys "<digit>/<position:04d>.png" that hash into it.
    keys = [f"{label}/{i:04d}.png" for i, label in enumerate(load_digits().target[:1500])]
    held_out = int(selection_mask(keys, 0.1).sum())
    assert 75 < held_out < 225
    facts = describe_source(spec, selection_fraction=0.1)
    assert (facts.num_train, facts.num_select) == (1500 - held_out, held_out)


@pytest.mark.slow
def test_builtin_shapes_counts_24_classes_12000_train_2400_val(builtin_cache):
    facts = describe_source(DataSpec(uri="builtin:shapes", image_size=16))
    assert (facts.num_classes, facts.num_train, facts.num_val) == (24, 12_000, 2_400)


def test_a_local_shard_set_counts_its_manifest_and_a_missing_one_is_named(make_image_folder,
                                                                          tmp_path):
    src = make_image_folder(classes=("cat", "dog", "emu", "fox"), per_class=6)
    dst = tmp_path / "shards"
    write_shards(str(src), str(dst), shard_size=5, val_fraction=1 / 3, use_ray=False)
    facts = describe_source(DataSpec(uri=f"{dst}/", image_size=16))  # a trailing slash is fine
    assert (facts.kind, facts.num_classes, facts.num_train + facts.num_val) == ("shards", 4, 24)
    assert (facts.num_train, facts.num_val, facts.num_select) == (16, 8, 0)  # 2 of 6 a class held out

    with pytest.raises(ShardSetNotFoundError, match="nothing-here"):
        describe_source(DataSpec(uri=str(tmp_path / "nothing-here")))


def test_an_s3_shard_set_counts_its_manifest(s3_server, make_image_folder):
    src = make_image_folder(per_class=4)
    uri = f"s3://{s3_server.make_bucket()}/sets/animals"
    write_shards(str(src), uri, shard_size=4, val_src=str(src), use_ray=False,
                 storage_options=s3_server.storage_options)
    facts = describe_source(DataSpec(uri=uri, storage_options=s3_server.storage_options))
    assert (facts.num_classes, facts.num_train, facts.num_val) == (3, 12, 12)


def test_the_driver_opens_shard_sets_as_ray_datasets_with_the_counts_of_describe(
        ray_local, builtin_cache):
    spec = DataSpec(uri="builtin:digits", image_size=8)
    driver = open_source(spec, selection_fraction=0.1)
    assert sorted(driver.datasets) == ["select", "train", "val"]
    assert driver.facts == describe_source(spec, selection_fraction=0.1)
    assert driver.datasets["select"].count() == driver.facts.num_select
    plain = open_source(spec)
    assert sorted(plain.datasets) == ["train", "val"]
    assert (plain.facts.num_train, plain.facts.num_val, plain.facts.num_select) == (1500, 297, 0)


def test_in_memory_splits_of_digits_and_synthetic_data_and_none_of_shard_sets():
    (train_images, train_labels), (val_images, val_labels) = in_memory_splits("builtin:digits", 32)
    assert train_images.shape == (1500, 3, 8, 8) and val_images.shape == (297, 3, 8, 8)
    assert train_images.dtype == torch.uint8 and train_labels.dtype == torch.int64
    assert torch.equal(train_images[:, 0], train_images[:, 2])  # gray, repeated
    assert sorted(np.unique(train_labels.numpy()).tolist()) == list(range(10))
    assert len(val_labels) == 297

    (train_images, train_labels), (val_images, _) = in_memory_splits("synthetic:4/32/16", 16)
    assert train_images.shape == (32, 3, 16, 16) and val_images.shape == (16, 3, 16, 16)
    assert int(train_labels.max()) < 4

    with pytest.raises(ValueError, match=r"--data 's3://b/p' is not allowed; expected one of "
                       r"\['builtin:digits', 'builtin:shapes'\]"):
        in_memory_splits("s3://b/p", 16, name="--data")
