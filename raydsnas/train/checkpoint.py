"""A run's checkpoints: their layout in storage, what one holds, and the one rule for which is
the latest.

    <storage>/<name>/
        checkpoint_manager_snapshot.json   Ray Train's registry of the run's checkpoints
        epoch_000012-1a2b3c4d/             one checkpoint: after epoch 12, written by the
            state.pt                       worker group 1a2b3c4d (a restarted group writes
            meta.json                      new folders, never over registered ones)

`state.pt` (read with `weights_only=True`) holds the strategy's `state_dict()`, the `RunState`
(epoch, time, history) and the RNG states; `meta.json` the epoch and step, for a reader without
torch. The latest checkpoint is the latest *registered* one, from Ray Train's snapshot: a folder
that was written but never registered (the run stopped first) does not count, and without a
snapshot Ray Train 2.60 starts from scratch however many folders there are
(`CheckpointManager._maybe_load_state_from_storage`). The launcher (resume epoch, clean-up),
`raydsnas.report` (history) and `raydsnas.analysis` (the supernet) all read by this rule.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import torch

from raydsnas.data.storage import join_path, read_bytes

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's registry of checkpoints
CHECKPOINT_DIR = re.compile(r"epoch_(\d{6})-[0-9a-f]{8}")


@dataclass
class RunState:
    """What a run carries from epoch to epoch besides the strategy: the epochs done, the wall
    time and the worker-seconds they took (search and any final phase), and one record per
    epoch (the metrics, the probabilities, the argmax)."""

    epoch: int = 0
    elapsed_s: float = 0.0
    worker_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def add_time(self, seconds: float, world: int) -> None:
        """`seconds` of wall time on `world` workers."""
        self.elapsed_s += seconds
        self.worker_s += seconds * world


def checkpoint_dir_name(epoch: int, attempt: str) -> str:
    """The folder of the checkpoint after `epoch`, written by worker group `attempt`."""
    return f"epoch_{epoch:06d}-{attempt}"


def checkpoint_epoch(dir_name: str) -> int | None:
    """The epoch in a checkpoint folder's name; None for any other name."""
    match = CHECKPOINT_DIR.fullmatch(dir_name)
    return int(match.group(1)) if match else None


def read_snapshot(fs: pafs.FileSystem, root: str) -> dict | None:
    """Ray Train's snapshot of the run at `root` (None: the run never registered one)."""
    path = join_path(root, SNAPSHOT_FILE)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return json.loads(read_bytes(fs, path))


def latest_registered(snapshot: dict | None) -> str | None:
    """The folder name of the latest registered checkpoint (None: none yet)."""
    latest = (snapshot or {}).get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name") or None


def registered(snapshot: dict) -> set[str]:
    """Every checkpoint folder the snapshot names (kept, latest or pending)."""
    results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result"),
               *snapshot.get("pending_training_results", [])]
    return {r.get("checkpoint_dir_name") for r in results if isinstance(r, dict)} - {None}


def latest_epoch(fs: pafs.FileSystem, root: str) -> int:
    """The epoch a run at `root` resumes after (0: it starts from scratch)."""
    return checkpoint_epoch(latest_registered(read_snapshot(fs, root)) or "") or 0


def read_latest_state(fs: pafs.FileSystem, root: str, where: str | None = None) -> dict:
    """The `state.pt` of the latest registered checkpoint; `FileNotFoundError` naming `where`
    (default: `root`) if the run has none."""
    name = latest_registered(read_snapshot(fs, root))
    if name is None:
        raise FileNotFoundError(f"{where or root} has no registered checkpoint (no "
                                f"{SNAPSHOT_FILE} naming one)")
    return load_state(read_bytes(fs, join_path(root, name, STATE_FILE)))


def load_state(source: bytes | str | os.PathLike) -> dict:
    """A `state.pt` (bytes or a path), onto the CPU, without executing code. RNG states must
    stay CPU tensors; module and optimiser loads move their tensors to the device themselves."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    return torch.load(source, map_location="cpu", weights_only=True)


def write_checkpoint(folder: str, strategy: Any, run: RunState) -> None:
    """`state.pt` and `meta.json` for `strategy` and `run` into `folder`: everything to
    continue exactly (RNG states included)."""
    cuda_rng = (torch.cuda.get_rng_state(strategy.device) if strategy.device.type == "cuda"
                else None)
    torch.save({"strategy": strategy.state_dict(), "epoch": run.epoch,
                "elapsed_s": run.elapsed_s, "worker_s": run.worker_s,
                "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                "history": json.dumps(run.history)},
               os.path.join(folder, STATE_FILE))
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"epoch": run.epoch, "step": strategy.step_count}, f)


def restore_checkpoint(folder: str, strategy: Any) -> RunState:
    """Load the checkpoint in `folder` into `strategy` and the RNGs; returns its `RunState`."""
    state = load_state(os.path.join(folder, STATE_FILE))
    strategy.load_state_dict(state["strategy"])
    torch.set_rng_state(state["torch_rng"])
    if strategy.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], strategy.device)
    return RunState(state["epoch"], state["elapsed_s"], state["worker_s"],
                    json.loads(state["history"]))


__all__ = [
    "CHECKPOINT_DIR",
    "META_FILE",
    "SNAPSHOT_FILE",
    "STATE_FILE",
    "RunState",
    "checkpoint_dir_name",
    "checkpoint_epoch",
    "latest_epoch",
    "latest_registered",
    "load_state",
    "read_latest_state",
    "read_snapshot",
    "registered",
    "restore_checkpoint",
    "write_checkpoint",
]
