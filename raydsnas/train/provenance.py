"""A run's recorded configuration, and what a rerun of the same `(storage, name)` may change.

The first start of a run writes `<storage>/<name>/job.json`: every setting with the value the
run uses (`JobConfig.resolved()`), and the changes applied to it since (`changes`: key, old,
new value and the epoch the run had reached). A rerun compares its configuration with that
record before Ray starts:

- identical: it resumes from the latest checkpoint; a finished run says so and does nothing;
- different only in *operational* keys (workers, CPUs, GPUs, retries, logging, storage
  options): it resumes; those keys do not change what is trained;
- different in *extendable* keys (`search.epochs`, ...): refused, unless the rerun passes
  `--resume-with-changes`, which applies them from the epoch reached and records them;
- different in any other key: refused (exit 2), naming the keys. The checkpoints belong to the
  recorded settings; a new `name` starts a new run.

So `subnet/arch.json`'s `meta.config` always describes the settings that trained the network,
and `meta.config_changes` lists what changed on the way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raydsnas.config import ConfigError, JobConfig, parse_config
from raydsnas.data.storage import (
    join_path,
    read_bytes,
    resolve_filesystem,
    storage_errors,
    write_bytes_atomic,
)
from raydsnas.export import ArtifactError, read_record

RUN_FILE = "job.json"
# Keys that change how a run is executed, not what it trains (elastic resizing already makes
# the schedule independent of the number of workers).
OPERATIONAL = ("scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker",
               "scaling.gpus_per_worker", "scaling.resources", "scaling.max_failures",
               "scaling.max_preemption_failures",
               "scaling.elastic_resize_interval_s", "storage.options", "storage.keep_checkpoints",
               "search.log_every", "search.eval_every", "data.storage_options",
               "data.object_store_limit_bytes", "data.target_block_bytes", "data.decode")
# Keys a run can take from the epoch it reached, with --resume-with-changes.
EXTENDABLE = ("search.epochs", "search.checkpoint_every", "search.bn_recalibration_batches",
              "data.skip_corrupt")


class RunConflictError(ConfigError):
    """A rerun's configuration differs from the run's recorded one where it changes training."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def kind(self) -> str:
        """`operational`, `extendable` or `training`."""
        if any(self.key == k or self.key.startswith(k + ".") for k in OPERATIONAL):
            return "operational"
        return "extendable" if self.key in EXTENDABLE else "training"

    def __str__(self) -> str:
        return f"{self.key} {json.dumps(self.old)} -> {json.dumps(self.new)}"


@dataclass
class RunState:
    """What a (re)run finds under its run folder."""

    uri: str
    new: bool  # nothing of this run exists yet
    epoch: int  # the epoch of the checkpoint it resumes from (0: none)
    finished: bool  # its child network exists, trained with these settings
    record: dict | None = None  # the child's arch.json, if any
    changes: list[dict] = field(default_factory=list)  # every change recorded, oldest first
    notes: list[str] = field(default_factory=list)  # what the driver should tell the user
    pending: dict | None = None  # the job.json to write once the driver's checks passed
    options: Mapping[str, Any] = field(default_factory=dict)

    def commit(self) -> None:
        """Write the run's `job.json` (atomically), if it is new or changed. Called once the
        run is sure to start, so a refused or failed start leaves storage as it was."""
        if self.pending is None:
            return
        fs, root = resolve_filesystem(self.uri, self.options)
        with storage_errors(self.uri, self.options):
            if isinstance(fs, pafs.LocalFileSystem):
                fs.create_dir(root, recursive=True)
            write_bytes_atomic(fs, join_path(root, RUN_FILE),
                               json.dumps(self.pending, indent=2, sort_keys=True).encode())
        self.pending = None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"search": {"h": 0.2}}` -> `{"search.h": 0.2}` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value and key != "options" and \
                key != "storage_options":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every dotted key whose value differs between two resolved configurations."""
    a, b = flatten(old), flatten(new)
    return [Change(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def recorded_config(raw: Mapping[str, Any]) -> dict:
    """A recorded configuration as resolved settings (a record written before `job.json`
    existed holds only the keys that were set: they are resolved with today's defaults)."""
    try:
        return parse_config(raw).resolved()
    except ConfigError as err:
        raise ConfigError(f"the run's recorded configuration no longer validates ({err}); "
                          "start a new run with a new name") from None


def reconcile(job: JobConfig, run_uri: str, epoch: int, *,
              resume_with_changes: bool = False) -> RunState:
    """Compare `job` with what the run at `run_uri` recorded (`epoch`: its latest checkpoint);
    raises `RunConflictError` when the rerun would change what its checkpoints were trained
    with. Writes nothing: `RunState.commit()` records the configuration."""
    options = job.storage.options
    fs, root = resolve_filesystem(run_uri, options)
    path = join_path(root, RUN_FILE)
    current = job.resolved()
    with storage_errors(run_uri, options):
        stored = None
        if fs.get_file_info(path).type == pafs.FileType.File:
            stored = json.loads(read_bytes(fs, path))
    try:
        record = read_record(f"{run_uri}/subnet", options)
    except ArtifactError:
        record = None
    state = RunState(run_uri, new=stored is None and epoch == 0 and record is None,
                     epoch=epoch, finished=False, record=record, options=options)
    recorded = stored is not None
    if not recorded:
        stored = {"config": current, "changes": []}
        legacy = (record or {}).get("meta", {}).get("config")
        if legacy is not None:  # a run from before job.json: compare with its child
            stored["config"] = recorded_config(legacy)
        elif not state.new:
            state.notes.append(f"{run_uri} has checkpoints but no {RUN_FILE} (an older "
                               "raydsnas): resuming them with this configuration")
    baseline = stored["config"]
    changes = [c for c in differences(baseline, current) if c.kind != "operational"]
    refused = [c for c in changes if c.kind == "training"
               or (c.kind == "extendable" and not resume_with_changes)]
    if refused:
        raise RunConflictError(conflict_message(job, run_uri, epoch, refused,
                                                [c for c in changes if c not in refused]))
    if "search.epochs" in {c.key for c in changes} and job.search.epochs < epoch:
        raise RunConflictError(f"search.epochs = {job.search.epochs} is not allowed for run "
                               f"{run_uri}: it has already trained {epoch} epochs")
    for change in changes:
        stored["changes"].append({"key": change.key, "old": change.old, "new": change.new,
                                  "from_epoch": epoch})
        state.notes.append(f"applying {change} to run {run_uri} from epoch {epoch}")
    if changes or not recorded:
        stored["config"] = current
        state.pending = stored
    state.changes = stored["changes"]
    if record is not None and not changes:
        trained_with = record.get("meta", {}).get("config")
        state.finished = trained_with is not None and not [
            c for c in differences(recorded_config(trained_with), current)
            if c.kind != "operational"]
    return state


def conflict_message(job: JobConfig, run_uri: str, epoch: int, refused: list[Change],
                     allowed: list[Change]) -> str:
    training = [c for c in refused if c.kind == "training"]
    extendable = [c for c in refused if c.kind == "extendable"]
    reached = f"trained to epoch {epoch}" if epoch else "started"
    lines = [f"run '{job.name}' at {run_uri} was {reached} with other settings: "
             + "; ".join(map(str, refused + allowed))]
    if training:
        lines.append(f"{', '.join(c.key for c in training)} change(s) what the run trains, so "
                     "its checkpoints cannot continue with them. Start a new run with a new name "
                     f"(--set name={job.name}-2), or rerun with the recorded values to resume it")
    if extendable and not training:
        lines.append(f"{', '.join(c.key for c in extendable)} can be applied to the existing "
                     f"run from epoch {epoch} with --resume-with-changes (recorded in "
                     f"{RUN_FILE} and the child's meta.config_changes), or start a new run "
                     f"with a new name (--set name={job.name}-2)")
    return ". ".join(lines)
