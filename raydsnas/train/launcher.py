"""The driver side of a search: read the data set's facts, build the `TorchTrainer`, run it.

Runs and resumes are keyed by `(storage, name)`: running the same job again continues from the
latest checkpoint under `<storage>/<name>/` (Ray Train finds it; we pass the epoch to the data
pipeline so the data order continues too).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from raydsnas.config import ConfigError, JobConfig
from raydsnas.data.errors import DataError, EndpointUnreachableError, StorageError
from raydsnas.data.pipeline import execution_options
from raydsnas.data.sources import open_source
from raydsnas.data.storage import (
    is_local_uri,
    resolve_filesystem,
    storage_errors,
)
from raydsnas.export import read_record
from raydsnas.local_ray import start_local_ray
from raydsnas.train.autoscaler import AutoscalerWatch
from raydsnas.train.checkpoint import CHECKPOINT_DIR, latest_epoch, read_snapshot, registered
from raydsnas.train.loop import train_func
from raydsnas.train.provenance import reconcile

# The store failing (not the input being bad): left to Ray Train's retries. Exact types:
# their subclasses (access denied, missing credentials, ...) are input errors.
TRANSIENT = (StorageError, EndpointUnreachableError)


class WorkerInputError(DataError):
    """Bad input (a `DataError`: a corrupt image, a malformed shard) met by a training worker.
    Not retried: another attempt would meet it again."""


class StopOnInputError(ray.train.UserCallback):
    """Ends a run at the first `DataError` raised in a worker, instead of letting Ray Train's
    failure policy retry it `max_failures` times: raising here (on the Train controller) is a
    controller failure, which the policy does not retry. Other worker errors are left to it."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            found = input_error(error)
            if found is not None:
                raise WorkerInputError(f"worker {rank}: {found}")


def _data_error_names(cls: type = DataError) -> set[str]:
    names = {cls.__name__} if cls not in TRANSIENT else set()
    return names | {n for sub in cls.__subclasses__() for n in _data_error_names(sub)}


_DATA_ERROR_LINE = re.compile(r"^(?:raydsnas\.data\.errors\.)?(%s): (.+)$"
                              % "|".join(sorted(_data_error_names())), re.MULTILINE)


def input_error(error: BaseException | None, depth: int = 0) -> str | None:
    """The message of the `DataError` in `error`'s chain (Ray wraps a worker's exception, and
    a Ray Data task's exception, in its own), or None."""
    if error is None or depth > 8:
        return None
    if isinstance(error, DataError) and type(error) not in TRANSIENT:
        return str(error).strip().splitlines()[-1].split(": ", 1)[-1] or type(error).__name__
    # Ray Data re-raises a task's exception as a UserCodeException without its cause; its
    # text (a traceback) still ends in "raydsnas.data.errors.<Type>: <message>".
    match = _DATA_ERROR_LINE.search(str(error))
    if match:
        return match.group(2).strip()
    inner_errors = [getattr(error, "_base_exc", None), getattr(error, "cause", None),
                    getattr(error, "controller_failure", None), error.__cause__,
                    error.__context__]
    inner_errors += list((getattr(error, "worker_failures", None) or {}).values())
    for inner in inner_errors:
        if inner is not None and inner is not error:
            found = input_error(inner, depth + 1)
            if found is not None:
                return found
    return None


@dataclass
class SearchOutcome:
    run_uri: str
    subnet_uri: str
    record: dict[str, Any]
    wall_s: float
    already_finished: bool = False  # a rerun of a finished run: nothing was trained
    notes: list[str] = field(default_factory=list)  # what the rerun check found


def run_uri(job: JobConfig) -> str:
    """`<storage>/<name>`; a local storage folder is made absolute (workers run elsewhere)."""
    storage = job.storage.uri
    if is_local_uri(storage):
        storage = os.path.abspath(os.path.expanduser(storage.removeprefix("file://")))
    return f"{storage.rstrip('/')}/{job.name}"


def connect_ray() -> None:
    """Join the cluster this runs in (`ray job submit`, RAY_ADDRESS) or start a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Ray Train's run state (attempts, workers, status) for the dashboard's API,
        # /api/train/v2/runs/v1; read where the trainer is built, i.e. here in the driver.
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
        ray.init(address=address, logging_level="WARNING")
    else:
        # A new Ray on this machine. `address="local"`: without it, ray.init() joins the cluster
        # that /tmp/ray/ray_current_cluster names, which may be a `ray start` head that is
        # long gone (the driver then waits for it forever). One machine: keep gloo on loopback
        # (hosts with several interfaces pick badly). No node of it can be drained, so Ray
        # Train's preemption watcher has nothing to watch; all it does here is log an error
        # line about its own restart policy on every run.
        start_local_ray(logging_level="WARNING", runtime_env={"env_vars": {
            "GLOO_SOCKET_IFNAME": "lo", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})


def latest_checkpoint_epoch(job: JobConfig) -> int:
    """The epoch of the checkpoint Ray Train will resume from (0 if none): the latest
    registered one (`raydsnas.train.checkpoint`)."""
    fs, root = resolve_filesystem(run_uri(job), job.storage.options)
    with storage_errors(run_uri(job), job.storage.options):
        return latest_epoch(fs, root)


def build_trainer(job: JobConfig, callbacks: Sequence[Any] = (),
                  config_changes: Sequence[dict] = ()) -> TorchTrainer:
    """The `TorchTrainer` of a job (datasets read and checked here, before any worker starts).
    `callbacks`: Ray Train callbacks, e.g. Tune's `TuneReportCallback` inside a sweep trial;
    `config_changes`: the run's recorded configuration changes (`provenance`), for its child's
    metadata."""
    # SPOS/random hold a share of the training split out to score candidates ("select");
    # `num_train` is what is left, the exact count the schedule's steps come from.
    fraction = job.search.selection_fraction
    # The data order continues where Ray Train will resume the weights.
    data = open_source(job.data, selection_fraction=fraction,
                       start_epoch=latest_checkpoint_epoch(job))
    num_classes, num_train = data.facts.num_classes, data.facts.num_train
    job.space.build(num_classes)  # fails here, not in a worker, if the space cannot be built
    if num_train < job.search.global_batch_size:  # the worker's own check, made here first
        raise ConfigError(
            f"search.global_batch_size = {job.search.global_batch_size} is not allowed for "
            f"{job.data.uri}: its training split has {num_train} samples"
            + (" (after the selection split)" if fraction else "")
            + f", fewer than one global batch; lower search.global_batch_size to at most "
            f"{num_train}")

    fs, root = resolve_filesystem(job.storage.uri, job.storage.options)
    if is_local_uri(job.storage.uri):
        storage = dict(storage_path=root)
    else:
        storage = dict(storage_path=root, storage_filesystem=fs)
    scaling = job.scaling
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job, "num_classes": num_classes,
                           "num_train": num_train, "run_uri": run_uri(job),
                           "config_changes": list(config_changes), "skipped": data.skipped},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker,
            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s),
        run_config=ray.train.RunConfig(
            name=job.name,
            failure_config=ray.train.FailureConfig(
                max_failures=scaling.max_failures,
                max_preemption_failures=scaling.max_preemption_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.storage.keep_checkpoints),
            callbacks=[StopOnInputError(), *callbacks], **storage),
        datasets=data.datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(data.datasets),
                                            execution_options=execution_options(job.data)),
    )


def fit_interruptibly(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, with Ctrl-C left to the caller as a KeyboardInterrupt.

    Called in the main thread, Ray Train 2.60's fit installs its own SIGINT handler, which
    aborts the run and then exits the process by itself (status 1, no message); in any other
    thread it installs none (as under Tune). So fit runs in a helper thread and the main
    thread waits for it."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    # A daemon: after a KeyboardInterrupt it is left blocked on the run that Ray's shutdown ends.
    thread = threading.Thread(target=fit, name="raydsnas-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def remove_unregistered_checkpoints(job: JobConfig) -> list[str]:
    """Delete checkpoint folders that Ray Train never registered (written, then the run was
    interrupted before its snapshot named them): Ray Train neither resumes from nor rotates
    them, so each interrupt would leave one more than `storage.keep_checkpoints`. Only with a
    snapshot (without one Ray Train starts from scratch and we leave the folders alone).
    Returns the names removed."""
    uri = run_uri(job)
    fs, root = resolve_filesystem(uri, job.storage.options)
    removed = []
    with storage_errors(uri, job.storage.options):
        snapshot = read_snapshot(fs, root)
        if snapshot is None:
            return removed
        known = registered(snapshot)
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if (info.type == pafs.FileType.Directory and CHECKPOINT_DIR.fullmatch(info.base_name)
                    and info.base_name not in known):
                fs.delete_dir(info.path)
                removed.append(info.base_name)
    return sorted(removed)


def remove_run(job: JobConfig) -> None:
    """Delete the run's folder (only for a run this call started that never checkpointed)."""
    fs, root = resolve_filesystem(run_uri(job), job.storage.options)
    with storage_errors(run_uri(job), job.storage.options):
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            fs.delete_dir(root)


def run_search(job: JobConfig, *, resume_with_changes: bool = False) -> SearchOutcome:
    """Run (or resume) a search job to the end and return where its child network went.

    A rerun of the same `(storage, name)` is checked against the run's recorded configuration
    first (`provenance.reconcile`, before Ray starts): a finished run returns at once
    (`already_finished`), a change to what the run trains raises `RunConflictError`."""
    t0 = time.perf_counter()
    uri = run_uri(job)
    state = reconcile(job, uri, latest_checkpoint_epoch(job),
                      resume_with_changes=resume_with_changes)
    subnet_uri = f"{uri}/subnet"
    if state.finished:
        return SearchOutcome(uri, subnet_uri, state.record, time.perf_counter() - t0,
                             already_finished=True, notes=state.notes)
    connect_ray()
    trainer = build_trainer(job, config_changes=state.pending["changes"] if state.pending
                            else state.changes)
    state.commit()  # the driver's checks passed: the run starts under this configuration
    for name in remove_unregistered_checkpoints(job):
        state.notes.append(f"removed checkpoint folder {name}: written, never registered "
                           "(the run was stopped before Ray Train recorded it)")
    # On a cluster (perhaps autoscaled), say what its autoscaler reports it cannot launch.
    watch = AutoscalerWatch(ray.get_runtime_context().gcs_address,
                            job.scaling.resources_per_worker) \
        if os.environ.get("RAY_ADDRESS") else contextlib.nullcontext()
    try:
        with watch:
            fit_interruptibly(trainer)
    except Exception as err:
        found = input_error(err)
        if found is None:
            raise
        if state.new and latest_checkpoint_epoch(job) == 0:
            remove_run(job)  # it stopped before its first checkpoint: leave storage as it was
        raise WorkerInputError(found.removeprefix("WorkerInputError: ")) from None
    record = read_record(subnet_uri, job.storage.options)
    return SearchOutcome(uri, subnet_uri, record, time.perf_counter() - t0, notes=state.notes)
