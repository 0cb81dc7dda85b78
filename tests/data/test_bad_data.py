"""Bad data and bad locations: each case fails with an error naming the shard, key or URL (or,
for corrupt images with skip_corrupt, is skipped and counted) -- never a hang."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydsnas.data import (
    CorruptImageError,
    DataSpec,
    EndpointUnreachableError,
    LabelOutOfRangeError,
    MissingCredentialsError,
    ShardFormatError,
    ShardSetNotFoundError,
    SourceFolderError,
    StorageOptionsError,
    build_datasets,
    write_shards,
)


def shard_set_with_corrupt_image(make_image_folder, tmp_path: Path) -> tuple[Path, str]:
    """A shard set whose image bytes of one key are garbage in both splits, as in a set written
    before the writer verified images (it now refuses such a file)."""
    src = make_image_folder(per_class=4)
    dst = tmp_path / "corrupt-set"
    write_shards(str(src), str(dst), shard_size=5, val_src=str(src), use_ray=False)
    bad_key = "dog/img0.png"

    def garble(table: pa.Table) -> tuple[pa.Table, bool]:
        images = [
            b"\xff\xd8\xff\xe0 this is not a JPEG" if key == bad_key else image
            for image, key in zip(
                table["image"].to_pylist(), table["key"].to_pylist(), strict=True
            )
        ]
        return table.set_column(0, "image", pa.array(images, pa.binary())), True

    for shard in sorted(dst.glob("*/part-*.parquet")):
        if bad_key in pq.read_table(shard, columns=["key"])["key"].to_pylist():
            rewrite_shard(shard, garble)
    return dst, bad_key


def test_undecodable_image_fails_naming_shard_and_key(ray_local, make_image_folder, tmp_path):
    dst, bad_key = shard_set_with_corrupt_image(make_image_folder, tmp_path)
    _, val, _ = build_datasets(DataSpec(uri=str(dst), image_size=16))
    with pytest.raises(Exception) as failure:
        val.take_all()
    message = str(failure.value)
    assert CorruptImageError.__name__ in message
    assert (
        f"{dst}/val/part-0000" in message and f"key {bad_key}: cannot decode the image" in message
    )


def test_undecodable_image_is_skipped_and_counted_when_asked(
    ray_local, make_image_folder, tmp_path
):
    dst, bad_key = shard_set_with_corrupt_image(make_image_folder, tmp_path)
    data = build_datasets(DataSpec(uri=str(dst), image_size=16, skip_corrupt=True, keep_keys=True))
    keys = [str(row["key"]) for row in data.val.take_all()]
    assert len(keys) == 11 and bad_key not in keys
    assert data.skipped.count() == 1
    [(where, reason)] = data.skipped.reasons().items()
    assert where.endswith(f":{bad_key}") and "cannot decode the image" in reason
    assert data.train.count() == 11
    assert data.skipped.count() == 2  # the train shard's copy of the file is a second image
    assert data.train.count() == 11
    assert data.skipped.count() == 2  # a second epoch skips the same images: no new count


def rewrite_shard(path: Path, transform) -> None:
    """Replace a shard by `transform(table)`, keeping its footer metadata (plan digest)."""
    table = pq.read_table(path)
    new_table, statistics = transform(table)
    pq.write_table(
        new_table.replace_schema_metadata(table.schema.metadata), path, write_statistics=statistics
    )


def test_label_out_of_range_fails_before_reading_naming_the_shard(
    ray_local, make_image_folder, tmp_path
):
    src = make_image_folder(per_class=2)
    dst = tmp_path / "labels"
    write_shards(str(src), str(dst), shard_size=4, val_src=str(src), use_ray=False)
    shard = dst / "train" / "part-00001.parquet"
    rewrite_shard(
        shard, lambda t: (t.set_column(1, "label", pa.array([7] * t.num_rows, pa.int64())), True)
    )
    with pytest.raises(
        LabelOutOfRangeError,
        match=rf"shard {dst}/train/part-00001.parquet holds labels in \[7, 7\] "
        r"but the manifest has 3 classes",
    ):
        build_datasets(DataSpec(uri=str(dst), image_size=16))


def test_label_out_of_range_without_statistics_fails_in_decoding_naming_the_key(
    ray_local, make_image_folder, tmp_path
):
    src = make_image_folder(per_class=2)
    dst = tmp_path / "labels"
    write_shards(str(src), str(dst), shard_size=4, val_src=str(src), use_ray=False)
    shard = dst / "val" / "part-00000.parquet"
    first_key = pq.read_table(shard)["key"][0].as_py()
    rewrite_shard(
        shard, lambda t: (t.set_column(1, "label", pa.array([-1] * t.num_rows, pa.int64())), False)
    )
    _, val, _ = build_datasets(DataSpec(uri=str(dst), image_size=16))
    with pytest.raises(
        Exception,
        match=rf"LabelOutOfRangeError: shard {dst}/val/part-00000.parquet, key {first_key}: "
        r"label -1 is outside \[0, 3\)",
    ):
        val.take_all()


def test_shard_with_the_wrong_schema_fails_naming_the_shard(
    s3_server, ray_local, make_image_folder
):
    bucket = s3_server.make_bucket()
    uri = f"s3://{bucket}/schema"
    src = make_image_folder(per_class=2)
    write_shards(
        str(src),
        uri,
        shard_size=4,
        val_src=str(src),
        storage_options=s3_server.storage_options,
        use_ray=False,
    )
    wrong = pa.table({"img": [b"x"], "cls": [1]})
    with s3_server.filesystem().open_output_stream(
        f"{bucket}/schema/val/part-00001.parquet"
    ) as stream:
        pq.write_table(wrong, stream)
    with pytest.raises(
        ShardFormatError,
        match=rf"shard {uri}/val/part-00001.parquet has the wrong schema \(no column 'image'; "
        r"no column 'label'; no column 'key'\): found \(img: binary, cls: int64\)",
    ):
        build_datasets(DataSpec(uri=uri, image_size=16, storage_options=s3_server.storage_options))


def test_missing_shard_fails_naming_it(ray_local, make_image_folder, tmp_path):
    src = make_image_folder(per_class=2)
    dst = tmp_path / "gone"
    write_shards(str(src), str(dst), shard_size=4, val_src=str(src), use_ray=False)
    (dst / "train" / "part-00000.parquet").unlink()
    with pytest.raises(
        ShardFormatError,
        match=rf"shard {dst}/train/part-00000.parquet is listed in _manifest.json but missing",
    ):
        build_datasets(DataSpec(uri=str(dst), image_size=16))


def test_missing_or_empty_prefix_fails_naming_the_url(s3_server, ray_local):
    bucket = s3_server.make_bucket()
    options = s3_server.storage_options
    with pytest.raises(
        ShardSetNotFoundError,
        match=rf"no shard set at s3://{bucket}/nothing/here: the location is missing or empty",
    ):
        build_datasets(DataSpec(uri=f"s3://{bucket}/nothing/here", storage_options=options))
    with pytest.raises(
        ShardSetNotFoundError,
        match=r"no shard set at s3://no-such-bucket-x1/p: the location is missing or empty",
    ):
        build_datasets(DataSpec(uri="s3://no-such-bucket-x1/p", storage_options=options))
    with s3_server.filesystem().open_output_stream(f"{bucket}/loose/file.parquet") as stream:
        stream.write(b"data")
    with pytest.raises(
        ShardSetNotFoundError,
        match=rf"no shard set at s3://{bucket}/loose: _manifest.json not found "
        r"\(found 1 entries, e.g. \['file.parquet'\]\)",
    ):
        build_datasets(DataSpec(uri=f"s3://{bucket}/loose", storage_options=options))


def test_unreachable_endpoint_fails_fast_naming_it():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(
        EndpointUnreachableError,
        match=rf"cannot reach the object store for s3://bucket/set \(endpoint {endpoint}\)",
    ):
        build_datasets(DataSpec(uri="s3://bucket/set", storage_options={"endpoint_url": endpoint}))


def test_missing_credentials_fail_before_any_request(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(
        MissingCredentialsError,
        match=r"no AWS credentials found for s3://bucket/set: set AWS_ACCESS_KEY_ID",
    ):
        build_datasets(DataSpec(uri="s3://bucket/set", storage_options=s3_server.storage_options))
    # Public buckets need none:
    with pytest.raises(ShardSetNotFoundError):
        build_datasets(
            DataSpec(
                uri="s3://bucket/set",
                storage_options={**s3_server.storage_options, "anonymous": True},
            )
        )


def test_unknown_storage_option_is_rejected_naming_it(s3_server):
    with pytest.raises(
        StorageOptionsError, match=r"unknown key\(s\) \['endpoint'\]; allowed: \['endpoint_url'"
    ):
        build_datasets(DataSpec(uri="s3://bucket/set", storage_options={"endpoint": "http://x"}))


def test_writer_rejects_a_folder_without_images(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(SourceFolderError, match=rf"no images found in {tmp_path}/empty: expected"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(SourceFolderError, match=rf"image folder {tmp_path}/absent does not exist"):
        write_shards(str(tmp_path / "absent"), str(tmp_path / "out"))


def test_garbled_data_page_fails_naming_the_shard(ray_local, make_image_folder, tmp_path):
    src = make_image_folder(per_class=4)
    dst = tmp_path / "garbled"
    write_shards(str(src), str(dst), shard_size=5, val_src=str(src), use_ray=False)
    shard = dst / "val" / "part-00001.parquet"
    # Overwrite the page header of the label column: mid-file, the footer stays intact.
    footer = pq.ParquetFile(shard).metadata
    label = footer.row_group(0).column(footer.schema.to_arrow_schema().get_field_index("label"))
    offset = label.dictionary_page_offset or label.data_page_offset
    data = bytearray(shard.read_bytes())
    assert 0 < offset < len(data) - footer.serialized_size - 32
    data[offset : offset + 24] = b"\x17" * 24
    shard.write_bytes(bytes(data))

    _, val, _ = build_datasets(DataSpec(uri=str(dst), image_size=16))  # the footer check passes
    with pytest.raises(
        ShardFormatError, match=rf"shard {dst}/val/part-00001.parquet is corrupt: row group 0"
    ):
        val.take_all()


def test_missing_credentials_message_names_only_keys_the_config_accepts(
    s3_server, monkeypatch, tmp_path
):
    from raydsnas.config import parse_config
    from raydsnas.data.storage import S3_OPTION_KEYS

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(MissingCredentialsError) as failure:
        build_datasets(DataSpec(uri="s3://bucket/set", storage_options=s3_server.storage_options))
    message = str(failure.value)
    named = [key for key in S3_OPTION_KEYS if re.search(rf"\b{key}\b", message)]
    assert named == ["anonymous"]
    for key in named:  # accepted in both places a job config takes storage options
        config = parse_config(
            {
                "data": {"uri": "s3://bucket/set", "storage_options": {key: True}},
                "storage": {"uri": "s3://bucket/runs", "options": {key: True}},
            }
        )
        assert config.data.storage_options[key] is True and config.storage.options[key] is True
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_PROFILE" in message
