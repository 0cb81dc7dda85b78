"""Shard writer + reader against real storage: a moto S3 server on loopback and local folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydsnas.data import DataSpec, build_datasets, write_shards
from raydsnas.data.shard import main as shard_cli


def all_rows(dataset) -> list[dict]:
    return [row for batch in dataset.iter_batches(batch_size=None) for row in unbatch(batch)]


def unbatch(batch: dict[str, np.ndarray]) -> list[dict]:
    return [{name: column[i] for name, column in batch.items()} for i in range(len(batch["label"]))]


@pytest.fixture
def s3_round_trip(s3_server, ray_local, make_image_folder):
    """Folder -> shards on s3:// (through Ray) -> Ray Data; the validation split is the whole
    folder again so every image can be compared with its original."""
    src = make_image_folder()
    bucket = s3_server.make_bucket()
    uri = f"s3://{bucket}/sets/animals"
    report = write_shards(
        str(src), uri, shard_size=4, val_src=str(src), storage_options=s3_server.storage_options
    )
    spec = DataSpec(
        uri=uri,
        image_size=16,
        val_crop_ratio=1.0,
        storage_options=s3_server.storage_options,
        keep_keys=True,
    )
    train, val, manifest = build_datasets(spec)
    return src, bucket, uri, report, all_rows(train), all_rows(val), manifest


def test_s3_round_trip_gives_original_pixels_and_labels(s3_round_trip, s3_server, reference_pixels):
    src, bucket, _uri, report, train_rows, val_rows, manifest = s3_round_trip
    keys = sorted(str(p.relative_to(src)) for p in src.glob("*/*") if p.suffix != ".txt")
    assert manifest.classes == ("cat", "dog", "emu")
    assert manifest.splits["train"].class_counts == (5, 5, 5)
    assert len(manifest.splits["train"].shards) == 4  # 15 rows, 4 per shard
    assert len(report.written) == 4 + 4 and report.kept == ()

    assert sorted(str(r["key"]) for r in val_rows) == keys
    assert sorted(str(r["key"]) for r in train_rows) == keys
    for row in val_rows + train_rows:
        assert row["image"].dtype == np.uint8 and row["image"].shape == (3, 16, 16)
        assert row["label"] == manifest.classes.index(str(row["key"]).split("/")[0])
    for row in val_rows:
        np.testing.assert_array_equal(row["image"], reference_pixels(src / str(row["key"])))

    # The shards hold the original file bytes, not a re-encoding.
    fs = s3_server.filesystem()
    with fs.open_input_file(f"{bucket}/sets/animals/train/part-00000.parquet") as stream:
        table = pq.read_table(stream)
    for image, key in zip(table["image"].to_pylist(), table["key"].to_pylist(), strict=True):
        assert image == (src / key).read_bytes()


def test_secret_key_appears_in_no_object_and_no_log(
    capfd, caplog, s3_round_trip, s3_server, ray_local, aws_test_credentials
):
    # capfd and caplog come first so that they also capture the round trip's setup.
    _src, bucket, *_ = s3_round_trip
    secret = aws_test_credentials["AWS_SECRET_ACCESS_KEY"].encode()
    objects = s3_server.object_contents(bucket)
    assert len(objects) == 1 + 8  # manifest + 8 shards
    assert [key for key, data in objects.items() if secret in data] == []
    log_files = [p for p in ray_local.rglob("*") if p.is_file()]
    assert log_files, "expected Ray session logs to inspect"
    assert [p for p in log_files if secret in p.read_bytes()] == []
    captured = capfd.readouterr()
    assert secret.decode() not in captured.out + captured.err + caplog.text
    spec = DataSpec(uri="s3://b/p", storage_options={"secret_access_key": secret.decode()})
    assert secret.decode() not in repr(spec)


def test_rerun_after_deleting_a_shard_rewrites_only_that_shard(
    ray_local, make_image_folder, tmp_path
):
    src = make_image_folder(per_class=6)
    dst = tmp_path / "shards"
    first = write_shards(str(src), str(dst), shard_size=5, val_fraction=0.34)
    shard_files = sorted(dst.glob("*/part-*.parquet"))
    assert [p.relative_to(dst).as_posix() for p in shard_files] == sorted(first.written)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files}
    victim = dst / "train" / "part-00001.parquet"
    victim.unlink()

    second = write_shards(str(src), str(dst), shard_size=5, val_fraction=0.34)

    assert second.written == ("train/part-00001.parquet",)
    assert len(second.kept) == len(shard_files) - 1
    for path, identity in before.items():
        if path != victim:
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == identity
    assert second.manifest == first.manifest
    train, val, _ = build_datasets(DataSpec(uri=str(dst), image_size=16, keep_keys=True))
    keys = [str(r["key"]) for r in all_rows(train)] + [str(r["key"]) for r in all_rows(val)]
    assert len(keys) == len(set(keys)) == 18


def test_val_fraction_holds_out_a_fixed_share_of_every_class(
    ray_local, make_image_folder, tmp_path
):
    src = make_image_folder(per_class=10)
    one = write_shards(str(src), str(tmp_path / "a"), shard_size=8, val_fraction=0.2, use_ray=False)
    two = write_shards(str(src), str(tmp_path / "b"), shard_size=8, val_fraction=0.2, use_ray=False)
    assert one.manifest.splits["val"].class_counts == (2, 2, 2)
    assert one.manifest.splits["train"].class_counts == (8, 8, 8)
    assert one.manifest.plan_digest == two.manifest.plan_digest
    assert (tmp_path / "a" / "val" / "part-00000.parquet").read_bytes() == (
        tmp_path / "b" / "val" / "part-00000.parquet"
    ).read_bytes()


def test_shards_mix_classes(ray_local, make_image_folder, tmp_path):
    src = make_image_folder(classes=tuple(f"c{i}" for i in range(6)), per_class=8, size=8)
    write_shards(str(src), str(tmp_path / "s"), shard_size=12, use_ray=False)
    labels = pq.read_table(tmp_path / "s" / "train" / "part-00000.parquet")["label"].to_pylist()
    assert len(set(labels)) >= 3  # a class-ordered writer would put 1-2 classes here


def test_cli_writes_a_shard_set(ray_local, make_image_folder, tmp_path, capsys):
    src = make_image_folder(per_class=3)
    dst = tmp_path / "cli"
    assert shard_cli([str(src), str(dst), "--shard-size", "4", "--val-fraction", "0.34"]) == 0
    manifest = json.loads((dst / "_manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["classes"] == ["cat", "dog", "emu"]
    assert manifest["splits"]["train"]["num_samples"] == 6
    assert manifest["splits"]["val"]["num_samples"] == 3
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [4, 2]
    assert "wrote 3 shards" in capsys.readouterr().out
    assert sorted(p.name for p in Path(dst).rglob("*.parquet")) == [
        "part-00000.parquet",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
