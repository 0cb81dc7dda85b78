"""The driver side of a search: read the data set's facts, build the `TorchTrainer`, run it.

Runs and resumes are keyed by `(storage, name)`: running the same job again continues from the
latest checkpoint under `<storage>/<name>/` (Ray Train finds it; we pass the epoch to the data
pipeline so the data order continues too).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from raydsnas.config import JobConfig
from raydsnas.data.pipeline import build_datasets, execution_options
from raydsnas.data.storage import (
    is_local_uri,
    join_path,
    read_bytes,
    resolve_filesystem,
    storage_errors,
)
from raydsnas.export import read_record
from raydsnas.local_ray import start_local_ray
from raydsnas.train.loop import train_func
from raydsnas.train.synthetic import PREFIX as SYNTHETIC
from raydsnas.train.synthetic import SyntheticData

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's registry of checkpoints
CHECKPOINT_DIR = re.compile(r"epoch_(\d{6})-[0-9a-f]{8}")


@dataclass
class SearchOutcome:
    run_uri: str
    subnet_uri: str
    record: dict[str, Any]
    wall_s: float


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
    """The epoch of the checkpoint Ray Train will resume from (0 if none).

    That is the latest *registered* checkpoint, from Ray Train's snapshot file. A folder that
    was written but never registered (the run stopped first) does not count, and without a
    snapshot Ray Train 2.60 starts from scratch however many folders there are
    (`CheckpointManager._maybe_load_state_from_storage`).
    """
    fs, root = resolve_filesystem(run_uri(job), job.storage.options)
    with storage_errors(run_uri(job), job.storage.options):
        snapshot = join_path(root, SNAPSHOT_FILE)
        if fs.get_file_info(snapshot).type != pafs.FileType.File:
            return 0
        latest = json.loads(read_bytes(fs, snapshot)).get("latest_checkpoint_result") or {}
    match = CHECKPOINT_DIR.fullmatch(latest.get("checkpoint_dir_name", ""))
    return int(match.group(1)) if match else 0


def build_trainer(job: JobConfig, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    """The `TorchTrainer` of a job (datasets read and checked here, before any worker starts).
    `callbacks`: Ray Train callbacks, e.g. Tune's `TuneReportCallback` inside a sweep trial."""
    datasets: dict[str, Any] = {}
    # SPOS/random hold a share of the training split out to score candidates ("select");
    # `num_train` is what is left, the exact count the schedule's steps come from.
    fraction = job.search.selection_fraction
    if job.data.uri.startswith(SYNTHETIC):
        synthetic = SyntheticData.parse(job.data.uri, job.data.image_size, job.data.seed,
                                        fraction)
        num_classes = synthetic.num_classes
        num_train = synthetic.num_train - synthetic.num_select
    else:
        # The data order continues where Ray Train will resume the weights.
        data = build_datasets(job.data, start_epoch=latest_checkpoint_epoch(job),
                              selection_fraction=fraction)
        datasets = {"train": data.train, "val": data.val}
        if data.select is not None:
            datasets["select"] = data.select
        num_classes = data.manifest.num_classes
        num_train = data.num_train
    job.space.build(num_classes)  # fails here, not in a worker, if the space cannot be built

    fs, root = resolve_filesystem(job.storage.uri, job.storage.options)
    if is_local_uri(job.storage.uri):
        storage = dict(storage_path=root)
    else:
        storage = dict(storage_path=root, storage_filesystem=fs)
    scaling = job.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job.to_dict(), "num_classes": num_classes,
                           "num_train": num_train, "run_uri": run_uri(job)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s),
        run_config=ray.train.RunConfig(
            name=job.name,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.storage.keep_checkpoints),
            callbacks=list(callbacks), **storage),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets),
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


def run_search(job: JobConfig) -> SearchOutcome:
    """Run (or resume) a search job to the end and return where its child network went."""
    t0 = time.perf_counter()
    connect_ray()
    trainer = build_trainer(job)
    fit_interruptibly(trainer)
    subnet_uri = f"{run_uri(job)}/subnet"
    record = read_record(subnet_uri, job.storage.options)
    return SearchOutcome(run_uri(job), subnet_uri, record, time.perf_counter() - t0)
