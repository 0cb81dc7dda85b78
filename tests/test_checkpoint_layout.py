"""The checkpoint layout's one rule (`raydsnas.train.checkpoint`): the latest checkpoint is the
latest one Ray Train registered, whatever other folders exist; every reader agrees on it."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import torch

from raydsnas import SearchSpace
from raydsnas.analysis import load_supernet
from raydsnas.strategies import DSNAS, DSNASConfig
from raydsnas.train.checkpoint import (
    SNAPSHOT_FILE,
    RunState,
    checkpoint_dir_name,
    latest_epoch,
    read_latest_state,
    registered,
    restore_checkpoint,
    write_checkpoint,
)

SPACE = SearchSpace(num_classes=3, input_size=8, stage_repeats=(1, 1, 1, 1),
                    stage_channels=(8, 16, 24, 32), stem_channels=4, head_channels=16,
                    stem_stride=1, dropout=0.0)


def strategy(seed: int = 0) -> DSNAS:
    return DSNAS(SPACE, DSNASConfig(lr=0.1, epochs=4, steps_per_epoch=2, h=0.5, seed=seed,
                                    freeze_by=None))


def write_run(root, epochs_written, registered_epochs):
    """A run folder with checkpoint folders for `epochs_written`, of which the snapshot (as
    Ray Train 2.60 writes its keys) registers `registered_epochs`; returns the strategies."""
    written = {}
    for epoch in epochs_written:
        s = strategy(seed=epoch)  # distinct weights per checkpoint
        folder = root / checkpoint_dir_name(epoch, "0000abcd")
        folder.mkdir(parents=True)
        write_checkpoint(str(folder), s, RunState(epoch=epoch, elapsed_s=epoch * 1.5,
                                                  worker_s=epoch * 3.0,
                                                  history=[{"epoch": e} for e in range(epoch)]))
        written[epoch] = s
    results = [{"checkpoint_dir_name": checkpoint_dir_name(e, "0000abcd")}
               for e in registered_epochs]
    (root / SNAPSHOT_FILE).write_text(json.dumps({
        "checkpoint_results": results,
        "latest_checkpoint_result": results[-1] if results else None}))
    return written


def test_the_latest_checkpoint_is_the_latest_registered_one(tmp_path):
    written = write_run(tmp_path, epochs_written=[1, 2, 3], registered_epochs=[1, 2])
    fs = pafs.LocalFileSystem()
    assert latest_epoch(fs, str(tmp_path)) == 2  # epoch 3 was written, never registered
    state = read_latest_state(fs, str(tmp_path))
    assert state["epoch"] == 2 and len(json.loads(state["history"])) == 2
    _, supernet = load_supernet(tmp_path)  # analysis reads the same one
    expected = written[2].supernet.state_dict()
    for name, tensor in supernet.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])
    snapshot = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    assert registered(snapshot) == {checkpoint_dir_name(e, "0000abcd") for e in (1, 2)}


def test_without_a_snapshot_there_is_no_checkpoint(tmp_path):
    write_run(tmp_path, epochs_written=[1], registered_epochs=[])
    (tmp_path / SNAPSHOT_FILE).unlink()
    fs = pafs.LocalFileSystem()
    assert latest_epoch(fs, str(tmp_path)) == 0
    with pytest.raises(FileNotFoundError, match="no registered checkpoint"):
        load_supernet(tmp_path)


def test_a_written_checkpoint_restores_the_strategy_the_run_and_the_rng(tmp_path):
    s = strategy()
    g = torch.Generator().manual_seed(0)
    s.step(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
    run = RunState(epoch=1, elapsed_s=2.5, worker_s=5.0, history=[{"epoch": 1, "loss": 1.0}])
    write_checkpoint(str(tmp_path), s, run)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)  # the RNG moves on; the checkpoint's state comes back
    other = strategy(seed=7)
    assert restore_checkpoint(str(tmp_path), other) == run
    torch.testing.assert_close(torch.rand(3), expected_draw)
    assert other.step_count == 1
    torch.testing.assert_close(other.alpha_matrix(), s.alpha_matrix())
