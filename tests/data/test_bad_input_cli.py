"""Bad input through `python -m raydsnas.search`, as a user meets it: each case exits 2 with
one `raydsnas: ...` line that names what to fix, no traceback, and storage left as it was
(input found bad inside a worker too: it is not retried, and the run folder it started is
removed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.test_bad_data import shard_set_with_corrupt_image

TINY = ["space.input_size=16", "space.width_mult=0.25", "space.stage_repeats=[1,1,2,1]",
        "data.image_size=16", "search.epochs=1", "search.global_batch_size=8",
        "search.lr_reference_batch=8", "search.log_every=100", "scaling.max_failures=3"]


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_search(tmp_path: Path, sets: list[str], env_extra: dict | None = None):
    import os

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAYDSNAS_CACHE": str(tmp_path / "cache"), **(env_extra or {})}
    args = [a for item in [*TINY, f"storage={tmp_path / 'runs'}", *sets]
            for a in ("--set", item)]
    return subprocess.run([sys.executable, "-m", "raydsnas.search", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)


def assert_one_line_exit_2(out, *expected: str) -> str:
    """Exit 2, one `raydsnas:` line holding `expected`, no traceback of the driver's own, no
    retry. (Ray streams its actors' logs to the driver, tagged `(TrainController pid=...)`: a
    worker's error is logged there by Ray, with its traceback; those lines are Ray's.)"""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("raydsnas:")]
    assert len(lines) == 1, text[-4000:]
    own = [line for line in text.splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", line)]
    assert not [line for line in own if "Traceback" in line], text[-4000:]
    assert "[FailurePolicy] RETRY" not in text, text[-4000:]
    assert text.count("Attempting to start training worker group") <= 1, text[-4000:]
    for piece in expected:
        assert piece in lines[0], lines[0]
    return lines[0]


CASES = {
    "unknown key": (["search.bogus=1"], ["search: unknown key(s) ['bogus']"]),
    "value out of range": (["search.h=2"], ["search.h"]),
    "global batch larger than the data set": (
        ["data.uri=builtin:digits", "search.global_batch_size=2048",
         "search.lr_reference_batch=2048"],
        ["search.global_batch_size = 2048", "builtin:digits", "1500 samples"]),
    "unknown storage option": (["storage.uri=s3://bucket/runs", "storage.options.regoin=x"],
                               ["storage.options: unknown key(s) ['regoin']"]),
    "missing data folder": (["data.uri=/nonexistent/raydsnas-shards"],
                            ["/nonexistent/raydsnas-shards"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path):
    sets, expected = CASES[case]
    before = snapshot(tmp_path / "runs")
    out = run_search(tmp_path, sets)
    assert_one_line_exit_2(out, *expected)
    assert snapshot(tmp_path / "runs") == before == {}


@pytest.mark.slow
def test_corrupt_image_in_a_worker_stops_the_run_without_retries(make_image_folder, tmp_path):
    """The corrupt image is met by a training worker (not by the driver's checks): the run
    stops at once (no `max_failures` retries), exits 2 naming the shard and the key, and
    removes the run folder it had started."""
    shards, bad_key = shard_set_with_corrupt_image(make_image_folder, tmp_path)
    out = run_search(tmp_path, [f"data.uri={shards}", "search.global_batch_size=4",
                                "search.lr_reference_batch=4", "name=bad"])
    line = assert_one_line_exit_2(out, bad_key, "cannot decode the image",
                                  f"{shards}/train/part-")
    assert line.startswith("raydsnas: input error: shard "), line
    assert not (tmp_path / "runs" / "bad").exists()
    # With skip_corrupt the same data trains (the image is left out) and the run finishes.
    ok = run_search(tmp_path, [f"data.uri={shards}", "search.global_batch_size=4",
                               "search.lr_reference_batch=4", "name=bad",
                               "data.skip_corrupt=true"])
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    from raydsnas import load_child

    child = load_child(str(tmp_path / "runs" / "bad" / "subnet"))
    skipped = child.meta["skipped_images"]  # the key is garbled in both splits' shards
    assert skipped and all(k.endswith(f":{bad_key}") for k in skipped), skipped
    assert any("/train/part-" in k for k in skipped), skipped
    assert all("cannot decode the image" in reason for reason in skipped.values())
    assert f"skipped:       {len(skipped)} undecodable image(s) (data.skip_corrupt)" in ok.stdout
