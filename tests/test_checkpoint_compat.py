"""Checkpoints written before issue 13's restructuring load and continue as they did then.

`fixtures/strategy_checkpoints.pt.gz` holds, per strategy, a checkpoint after 3 steps and the
3 steps that followed it in the code that wrote it (commit b3c8c9e; see
`fixtures/write_strategy_checkpoints.py`). Today's code loads each checkpoint and must take
the same steps: the same losses, alpha, frozen layers, architecture and learning rate.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def _writer():
    spec = importlib.util.spec_from_file_location(
        "write_strategy_checkpoints", FIXTURES / "write_strategy_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WRITER = _writer()
with gzip.open(FIXTURES / "strategy_checkpoints.pt.gz", "rb") as _f:
    RECORDS = torch.load(_f, weights_only=True)


@pytest.mark.parametrize("name", sorted(WRITER.CONFIGS))
def test_a_checkpoint_written_before_continues_as_it_did(name):
    record = RECORDS[name]
    state = torch.load(io.BytesIO(record["state"]), weights_only=True)
    strategy = WRITER.build(name)
    strategy.load_state_dict(state)
    torch.set_rng_state(record["rng"])
    start = WRITER.STEPS_BEFORE
    now = WRITER.trajectory(strategy, range(start, start + WRITER.STEPS_AFTER))
    then = record["after"]
    assert now["losses"] == pytest.approx(then["losses"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(now["alpha"], then["alpha"], rtol=1e-5, atol=1e-6)
    assert now["frozen"] == then["frozen"]
    assert now["arch"] == then["arch"]
    assert now["lr"] == pytest.approx(then["lr"], rel=1e-9)


def test_the_dsnas_checkpoint_is_taken_mid_search():
    """The DSNAS record exercises what a resume must rebuild: pruned layers at load time, an
    alpha optimiser over the rest, and the search ending after the load."""
    state = torch.load(io.BytesIO(RECORDS["dsnas"]["state"]), weights_only=True)
    assert 0 < len(state["frozen"]) < WRITER.SPACE.num_layers
    assert state["search_end_step"] is None
    assert len(RECORDS["dsnas"]["after"]["frozen"]) == WRITER.SPACE.num_layers


def test_a_checkpoint_of_another_strategy_is_refused_by_name():
    state = torch.load(io.BytesIO(RECORDS["spos"]["state"]), weights_only=True)
    with pytest.raises(ValueError, match="written by strategy 'spos'.*search.strategy = 'dsnas'"):
        WRITER.build("dsnas").load_state_dict(state)


def test_a_checkpoint_from_before_the_strategy_key_is_read_as_dsnas():
    state = torch.load(io.BytesIO(RECORDS["dsnas"]["state"]), weights_only=True)
    del state["strategy"]
    WRITER.build("dsnas").load_state_dict(state)
    with pytest.raises(ValueError, match="written by strategy 'dsnas'"):
        WRITER.build("snas").load_state_dict(state)
