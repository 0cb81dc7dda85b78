"""`python -m raydsnas.data.shard` as a newcomer runs it: a subprocess on real folders. Every bad
input is exit 2 with one line on stderr naming the thing at fault, and leaves no partial set."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydsnas.data import DataSpec, build_datasets

PROG = "raydsnas.data.shard"
RAY_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI with `env` (default: this environment) on a Ray of its own."""
    environment = {**(os.environ if env is None else env), "RAY_ADDRESS": "local"}
    return subprocess.run(
        [sys.executable, "-m", PROG, *args],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    # Ray 2.60 warns about its token authentication whenever it starts a local instance.
    lines = [line for line in result.stderr.strip().splitlines() if RAY_AUTH_NOTICE not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"{PROG}: ")
    return lines[0]


@pytest.fixture
def folder_with_bad_images(make_image_folder) -> Path:
    src = make_image_folder(per_class=3)
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    # Cut in the entropy-coded data: the header reads fine, the decode runs out of bytes.
    (src / "cat" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    (src / "dog" / "notes.jpg").write_text("a text file named .jpg\n")
    return src


def test_undecodable_images_stop_the_writer_naming_them_and_leave_nothing(
    folder_with_bad_images, tmp_path
):
    dst = tmp_path / "out"
    result = run_cli(str(folder_with_bad_images), str(dst), "--shard-size", "4")
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"under {folder_with_bad_images} cannot be decoded: cat/cut.jpg (OSError: " in line
    assert "truncated" in line and "dog/notes.jpg (not an image" in line
    assert "--skip-corrupt" in line
    assert not dst.exists() or list(dst.rglob("*")) == []


def test_skip_corrupt_leaves_them_out_and_lists_them_in_the_manifest(
    ray_local, folder_with_bad_images, tmp_path
):
    dst = tmp_path / "out"
    args = [str(folder_with_bad_images), str(dst), "--shard-size", "4", "--val-fraction", "0.34"]
    result = run_cli(*args, "--skip-corrupt")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((dst / "_manifest.json").read_text())
    skipped = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["cat/cut.jpg", "dog/notes.jpg"]
    assert "truncated" in skipped["cat/cut.jpg"] and "not an image" in skipped["dog/notes.jpg"]
    splits = manifest["splits"]
    assert splits["train"]["num_samples"] + splits["val"]["num_samples"] == 9  # good images only
    for split in splits.values():
        assert sum(s["rows"] for s in split["shards"]) == split["num_samples"]
    assert "skipped 2 undecodable images" in result.stdout

    train, val, _ = build_datasets(DataSpec(uri=str(dst), image_size=16, keep_keys=True))
    keys = [str(r["key"]) for r in train.take_all() + val.take_all()]
    assert len(keys) == len(set(keys)) == 9 and not {"cat/cut.jpg", "dog/notes.jpg"} & set(keys)

    rerun = run_cli(*args, "--skip-corrupt")  # a rerun keeps the shards and the same list
    assert rerun.returncode == 0 and "wrote 0 shards" in rerun.stdout, rerun.stderr
    assert json.loads((dst / "_manifest.json").read_text()) == manifest


def test_missing_source_folder_is_one_line_and_exit_2(tmp_path):
    result = run_cli(str(tmp_path / "absent"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert one_error_line(result) == f"{PROG}: image folder {tmp_path}/absent does not exist"
    assert not (tmp_path / "out").exists()


def test_s3_destination_without_credentials_is_one_line_naming_the_url(
    s3_server, make_image_folder, tmp_path
):
    src = make_image_folder(per_class=1)
    bucket = s3_server.make_bucket()
    env = {
        name: value
        for name, value in os.environ.items()
        if name
        not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    }
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    url = f"s3://{bucket}/shards"
    option = f"endpoint_url={s3_server.endpoint_url}"
    result = run_cli(str(src), url, "--storage-option", option, env=env)
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"{PROG}: no AWS credentials found for {url}: ")
    assert s3_server.object_contents(bucket) == {}
