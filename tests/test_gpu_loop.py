"""benchmarks/gpu_loop.py runs on the CPU with a tiny space: the real `train_func` under Ray
Train for each variant, with its table and its PASS/MISS lines (the GPU run is the same script
on a GPU machine)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_loop_benchmark_runs_on_the_cpu_and_reports_every_variant(tmp_path):
    variants = ["dsnas-synthetic", "fixed-synthetic", "fixed-cpu", "dsnas-gpu"]
    out = tmp_path / "loop.json"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "benchmarks/gpu_loop.py", "--device", "cpu", "--quick", "--epochs", "2",
         "--variants", ",".join(variants), "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == variants
    for r in results:
        assert r["steps"] == 4  # one timed epoch of 4 steps (the first epoch is not timed)
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["syncs_per_step"] is None  # needs CUDA
    assert re.search(r"^(PASS|MISS) DSNAS / fixed child, synthetic data: \d+\.\d+x", output,
                     re.MULTILINE)
    assert "CPU run: the sync count needs CUDA" in output
    table = output[output.index("variant "):]
    for variant in variants:
        assert re.search(rf"^{variant}\s+\d+\.\d\s+\d+\.\d\s+n/a$", table, re.MULTILINE), variant
