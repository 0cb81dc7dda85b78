"""Every config in jobs/ loads and validates (sweeps: the sweep section and every swept value)."""

from pathlib import Path

import pytest
import yaml

from raydsnas.config import load_config
from raydsnas.tune import load_sweep

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_there_are_job_configs():
    assert {p.name for p in JOBS} >= {"local-sweep.yaml", "imagenet-sweep.yaml"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_config_is_valid(path):
    if "sweep" in yaml.safe_load(path.read_text()):
        job, sweep = load_sweep(str(path))
        assert sweep.params
    else:
        load_config(path)


def test_local_job_is_the_embedded_default():
    """jobs/local.yaml writes out exactly what `python -m raydsnas.search` runs with no config."""
    local = next(p for p in JOBS if p.name == "local.yaml")
    assert load_config(local).to_dict() == load_config(None).to_dict()
