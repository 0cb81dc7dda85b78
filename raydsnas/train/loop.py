"""The per-worker search loop that Ray Train runs on every worker (`train_func(config)`).

Each worker: builds the supernet and the search strategy named by `search.strategy` (DSNAS or
a baseline, from the `raydsnas.strategies.STRATEGIES` registry), restores the latest checkpoint
if there is one, runs strategy steps on its data shard (all ranks in lockstep: every step ends
in one all-reduce of weight and architecture gradients), checks every epoch that no rank
diverged, evaluates the argmax architecture on the validation split, reports metrics, and
checkpoints from rank 0. After the last search epoch the strategy's `end_search` hook runs
(SPOS/random: the architecture search over the trained supernet), then any epochs the strategy
adds (retrain/finetune). At the end the child network is exported to `<storage>/<run>/subnet/`.

`train_func` reads top to bottom: `start_worker` (strategy, batches, event log), `resume` (the
checkpoint's strategy and `RunState`, `raydsnas.train.checkpoint`), then per epoch
`train_epoch` (the steps), `end_epoch` (search stage, validation, history, events) and
`report_epoch` (export on the last, checkpoint, report).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray.train
import torch

from raydsnas.config import JobConfig
from raydsnas.data.device_decode import DeviceDecoder, is_encoded
from raydsnas.data.feed import DeviceFeed
from raydsnas.data.sources import WorkerData
from raydsnas.data.storage import join_path, resolve_filesystem
from raydsnas.evaluation import accuracy_from_sums, accuracy_sums, recalibrate_bn
from raydsnas.export import save_child
from raydsnas.strategies import Collective, build_strategy, default_collective
from raydsnas.strategies.base import HostCopy, SearchStrategy
from raydsnas.strategies.collective import average_bn_buffers
from raydsnas.train.checkpoint import (
    RunState,
    checkpoint_dir_name,
    restore_checkpoint,
    write_checkpoint,
)
from raydsnas.train.events import EventLog
from raydsnas.train.sync_bn import use_global_batch_norm


def say(message: str) -> None:
    """One progress line on the worker's real stdout (Ray forwards it to the driver once;
    Train's patched `print` would also log it, and the driver would show it twice)."""
    print(message, file=sys.__stdout__, flush=True)


class RanksDivergedError(RuntimeError):
    """Ranks disagree on alpha or on the frozen layers: a bug or a non-deterministic step."""


def world_batch(job: JobConfig, world: int) -> tuple[int, float]:
    """(per-worker batch, weight lr) for `world` workers: the documented scaling rule."""
    per_worker = job.search.global_batch_size // world
    lr = job.search.base_lr * per_worker * world / job.search.lr_reference_batch
    return per_worker, lr


def quiet_report_log() -> None:
    """Ray Train 2.60 logs each `ray.train.report` call, its whole metrics dict included, at
    INFO through a logger named after its source file's path, so RunConfig's log level (which
    filters `ray.train.*` names) misses it. Our own epoch line says the same, once."""
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


@dataclass
class Worker:
    """One worker's part of a run: who it is, its strategy and batches, where it writes."""

    job: JobConfig
    facts: dict[str, Any]  # train_func's config: num_classes, num_train, run_uri, ...
    rank: int
    world: int
    device: torch.device
    collective: Collective
    strategy: SearchStrategy
    data: Batches
    events: EventLog
    attempt: str  # this worker group's id, in the names of the checkpoints it writes
    latest_eval: dict[str, float] = field(default_factory=dict)  # the last validation

    @property
    def total_epochs(self) -> int:
        """The search epochs and any the strategy adds (e.g. SPOS's retrain/finetune)."""
        return self.job.search.epochs + self.strategy.extra_epochs

    def say(self, message: str) -> None:
        if self.rank == 0:
            say(message)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. `config`: the validated `JobConfig` (`job`), the
    data set facts the driver read (`num_classes`, `num_train`: the training samples left
    once any selection split is held out), and `run_uri`."""
    quiet_report_log()
    worker = start_worker(config["job"], config)
    run = resume(worker)
    start = run.epoch
    for epoch in range(start, worker.total_epochs):
        train = train_epoch(worker, run, epoch)
        report_epoch(worker, run, end_epoch(worker, run, epoch, train))
    if start >= worker.total_epochs:  # resumed a finished run (e.g. its export failed)
        last = {k: v for k, v in (run.history[-1] if run.history else {}).items()
                if k != "probs"}
        ray.train.report({**last, "arch": json.dumps(worker.strategy.argmax_arch()),
                          **export_result(worker, run)})
    worker.events.close()


def start_worker(job: JobConfig, facts: dict[str, Any]) -> Worker:
    """This worker's strategy (on its device, with this world's batch and learning rate), its
    batches and its event log."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    collective = default_collective()
    device = ray.train.torch.get_device() if job.scaling.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    else:
        # cuDNN picks the fastest kernels per shape once (each candidate block has its own).
        torch.backends.cudnn.benchmark = True
    per_worker, lr = world_batch(job, world)
    # From the configured global batch, not per_worker * world: the schedule (and so the
    # checkpoint) is the same whatever the world size.
    steps_per_epoch = facts["num_train"] // job.search.global_batch_size
    if job.search.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, job.search.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {facts['num_train']} samples, fewer than one "
                         f"global batch ({per_worker * world}); lower search.global_batch_size")
    space = job.space.build(facts["num_classes"])
    strategy = build_strategy(job.search.strategy, space,
                              job.search.strategy_config(steps_per_epoch, lr), device=device,
                              collective=collective)
    if job.scaling.sync_bn and world > 1:
        use_global_batch_norm(strategy.supernet)
    data = Batches(job, rank, world, per_worker, steps_per_epoch, device,
                   strategy.channels_last, collective, facts.get("skipped"))
    fs, run_root = resolve_filesystem(facts["run_uri"], job.storage.options)
    events = EventLog(rank == 0, fs, join_path(run_root, "events"))
    return Worker(job, facts, rank, world, device, collective, strategy, data, events,
                  attempt_id(collective, device))


def resume(worker: Worker) -> RunState:
    """The run so far: from the checkpoint Ray Train hands this worker group, or a new one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return RunState()
    with checkpoint.as_directory() as folder:
        run = restore_checkpoint(folder, worker.strategy)
    per_worker, lr = world_batch(worker.job, worker.world)
    worker.say(f"[raydsnas] resumed from epoch {run.epoch} (step {worker.strategy.step_count}), "
               f"world size {worker.world}, per-worker batch {per_worker}, lr {lr:g}")
    return run


def train_epoch(worker: Worker, run: RunState, epoch: int) -> dict[str, Any]:
    """One epoch of strategy steps on this rank's batches; the epoch's training metrics over
    all ranks. No step waits for the device on the loop's account: the sums stay there, and a
    progress line is printed one `log_every` interval after its step (its numbers are long
    computed by then), the last one after the epoch."""
    strategy, job = worker.strategy, worker.job
    t0 = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=worker.device)
    seen = 0
    line: ProgressLine | None = None  # the last logged step's, printed at the next one
    for i, (images, labels) in enumerate(worker.data.train(epoch)):
        stats = strategy.step(images, labels)
        sums += torch.stack([stats.loss.double() * stats.batch_size, stats.correct.double()])
        seen += stats.batch_size
        if (i + 1) % job.search.log_every == 0:
            if line is not None:
                worker.say(line.text())
            rate = seen * worker.world / (time.perf_counter() - t0)
            line = ProgressLine(worker, epoch, i + 1, stats, rate)
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)  # the epoch's time includes its queued GPU work
    epoch_s = time.perf_counter() - t0
    if line is not None:
        worker.say(line.text())
    run.add_time(epoch_s, worker.world)
    worker.data.check_lockstep()
    check_ranks_agree(strategy, worker.collective)
    average_bn_buffers(strategy.supernet, worker.collective)
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64,
                                           device=worker.device)])
    worker.collective.all_reduce_sum(totals)
    totals = totals.cpu()
    return {"train_loss": float(totals[0] / max(totals[2], 1)),
            "train_top1": float(totals[1] / max(totals[2], 1)),
            "images_per_s": float(totals[2]) / max(epoch_s, 1e-9)}


@dataclass
class ProgressLine:
    """One progress line, taken at a logged step: the host's numbers now, the device's loss
    and accuracy read when printed (an interval later, when they are long computed)."""

    worker: Worker
    epoch: int
    step: int
    stats: Any  # StepStats
    rate: float
    entropy: float = field(init=False)
    frozen: int = field(init=False)
    flops: float = field(init=False)

    def __post_init__(self) -> None:
        # Copied to the host behind the step's work: `text()` waits for this copy only, not
        # for everything queued after it (a `float(loss)` would drain the whole stream).
        self._values = HostCopy(torch.stack([self.stats.loss.detach().float(),
                                             self.stats.correct.detach().float()]))
        self.entropy = self.stats.entropy
        self.frozen = self.stats.num_frozen
        self.flops = self.stats.expected_flops

    def text(self) -> str:
        w, stats = self.worker, self.stats
        loss, correct = self._values.wait().tolist()
        return (f"[raydsnas] epoch {self.epoch + 1}/{w.total_epochs} step {self.step}/"
                f"{w.data.steps} loss {loss:.4f} acc "
                f"{correct / stats.batch_size:.3f} entropy {self.entropy:.3f} "
                f"frozen {self.frozen}/{w.strategy.space.num_layers} E[FLOPs] "
                f"{self.flops / 1e6:.2f}M {self.rate:.0f} img/s")


def end_epoch(worker: Worker, run: RunState, epoch: int, train: dict[str, float]
              ) -> dict[str, Any]:
    """After an epoch's steps: the strategy's search stage (after the last search epoch),
    validation, the epoch's record in the history and the event log; returns the epoch's
    metrics (`train`'s among them)."""
    strategy, job = worker.strategy, worker.job
    end_metrics: dict[str, Any] = {}
    if epoch + 1 == job.search.epochs:
        # The strategy's search stage (SPOS: the evolutionary search), timed as compute.
        t1 = time.perf_counter()
        end_metrics = strategy.end_search(worker.data, epoch + 1)
        end_s = time.perf_counter() - t1
        run.add_time(end_s, worker.world)
        end_metrics["end_search_s"] = end_s
        check_ranks_agree(strategy, worker.collective)
    last = epoch + 1 == worker.total_epochs
    metrics = {
        "epoch": epoch + 1, "step": strategy.step_count, "world_size": worker.world,
        "train_loss": train["train_loss"], "train_top1": train["train_top1"],
        "entropy": strategy.entropy(), "frozen": len(strategy.frozen),
        "expected_flops": strategy.expected_flops(),
        "argmax_flops": strategy.space.flops(strategy.argmax_arch()),
        "lr": strategy.weight_opt.param_groups[0]["lr"],
        "images_per_s": train["images_per_s"], "elapsed_s": run.elapsed_s,
        "arch": json.dumps(strategy.argmax_arch()), **end_metrics,
    }
    if worker.facts.get("skipped") is not None:  # data.skip_corrupt: images left out so far
        metrics["skipped_images"] = worker.facts["skipped"].count()
    if last or (epoch + 1) % job.search.eval_every == 0:
        worker.latest_eval = worker.data.evaluate(strategy.predict, worker.collective)
    metrics.update(worker.latest_eval)  # every report carries the latest validation (for Tune)
    search = search_progress(strategy, run.history, epoch + 1)
    metrics.update(search["metrics"])
    run.epoch = epoch + 1
    run.history.append({**{k: v for k, v in metrics.items() if k != "arch"},
                        "probs": [[round(p, 5) for p in row] for row in strategy.probs().tolist()],
                        "arch": strategy.argmax_arch(), **search["history"]})
    events = worker.events
    events.scalars(strategy.step_count, {k: v for k, v in metrics.items()
                                         if isinstance(v, (int, float)) and k != "epoch"})
    events.arch(strategy.step_count, strategy.probs(), strategy.frozen)
    events.credit(strategy.step_count, search["history"].get("credit"))
    if search["ended_now"]:
        events.text(strategy.step_count, "search", search["ended_now"])
        worker.say(f"[raydsnas] {search['ended_now']}")
    events.sync()
    return metrics


def report_epoch(worker: Worker, run: RunState, metrics: dict[str, Any]) -> None:
    """Report the epoch to Ray Train, with a checkpoint every `checkpoint_every` epochs and at
    the end; the last epoch first exports the child."""
    job, epoch = worker.job, run.epoch
    worker.say(f"[raydsnas] epoch {epoch}/{worker.total_epochs} done: "
               + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in metrics.items()))
    name = checkpoint_dir_name(epoch, worker.attempt)
    last = epoch == worker.total_epochs
    if last:
        # Export before the last report: a scheduler (Tune's ASHA at max_t) may stop the
        # trial on that report. If the export fails, the final checkpoint is still
        # committed first, so the retry resumes here and only exports again.
        try:
            metrics.update(export_result(worker, run))
        except Exception:
            report_with_checkpoint(worker, run, metrics, name)
            raise
    if last or epoch % job.search.checkpoint_every == 0:
        report_with_checkpoint(worker, run, metrics, name)
    else:
        ray.train.report(metrics)


def search_progress(strategy: SearchStrategy, history: list[dict], epoch: int) -> dict[str, Any]:
    """What this epoch adds about the search itself (strategies with progressive freezing):
    `metrics` (the step and epoch the search ended, how many layers the deadline froze),
    `history` (the per-layer credit), and `ended_now` (a sentence, in the epoch it ended)."""
    out: dict[str, Any] = {"metrics": {}, "history": {}, "ended_now": ""}
    credit = getattr(strategy, "credit_magnitude", None)
    if credit is not None:
        out["history"]["credit"] = credit()
    end_step = getattr(strategy, "search_end_step", None)
    if end_step is None:
        return out
    previous = next((h["search_end_epoch"] for h in history if "search_end_epoch" in h), None)
    epoch = previous if previous is not None else epoch
    forced = list(getattr(strategy, "forced", []))
    out["metrics"] = {"search_end_step": end_step, "search_end_epoch": epoch,
                      "forced_frozen": len(forced)}
    if previous is None:
        by_h = strategy.space.num_layers - len(forced)
        start = getattr(strategy, "child_schedule_start", None)
        lr = ("the same cosine" if start is None
              else "its weights rewound to their initialisation, a new warm-up and cosine"
              if getattr(strategy.config, "child_start", "inherit") == "rewind"
              else "a new cosine" if start == end_step
              else f"the warm-up runs to step {start}, then the run's cosine")
        out["ended_now"] = (
            f"search ended at step {end_step} (epoch {epoch}): {by_h} layer(s) frozen by h, "
            f"{len(forced)} by the freeze_by deadline {forced if forced else ''}; the rest of "
            f"the run trains the child {strategy.argmax_arch()} ({lr})").replace(" ;", ";")
    return out


def export_result(worker: Worker, run: RunState) -> dict[str, Any]:
    """BN-recalibrate, evaluate and export the argmax child (every rank computes, rank 0 writes).

    `worker_hours` counts every epoch the run took, search and any retrain/finetune phase, so
    DSNAS and the two-stage baselines compare on the same footing."""
    job, strategy, data, collective = worker.job, worker.strategy, worker.data, worker.collective
    total_epochs = worker.total_epochs
    skipped = worker.facts.get("skipped")
    skipped_images = skipped.reasons() if skipped is not None else None
    arch = strategy.argmax_arch()
    child = strategy.export_child(arch)
    if job.search.bn_recalibration_batches:
        batches = (images for images, _ in data.train(total_epochs,
                                                      limit=job.search.bn_recalibration_batches))
        recalibrate_bn(child, batches)
        average_bn_buffers(child, collective)
    child.eval()
    accuracy = data.evaluate(child, collective, prefix="child_val")
    space = strategy.space
    meta = {
        "name": job.name, "top1": accuracy["child_val_top1"], "top5": accuracy["child_val_top5"],
        "val_samples": accuracy["child_val_samples"], "flops": space.flops(arch),
        "params": space.params(arch), "wall_time_s": run.elapsed_s,
        "worker_hours": run.worker_s / 3600, "steps": strategy.step_count,
        "frozen_layers": {str(k): v for k, v in strategy.frozen.items()},
        "bn_recalibrated": bool(job.search.bn_recalibration_batches), "config": job.resolved(),
        "config_changes": list(worker.facts.get("config_changes", ())),
        "strategy": job.search.strategy, "search_epochs": job.search.epochs,
        "epochs": total_epochs, "search_end_step": getattr(strategy, "search_end_step", None),
        "forced_layers": list(getattr(strategy, "forced", [])),
        # With data.skip_corrupt: the undecodable images left out ("<shard>:<key>" -> reason).
        **({"skipped_images": skipped_images} if skipped_images is not None else {}),
    }
    subnet_uri = f"{worker.facts['run_uri'].rstrip('/')}/subnet"
    if worker.rank == 0:
        save_child(child.cpu(), subnet_uri, meta=meta, storage_options=job.storage.options)
        say(f"[raydsnas] child network written to {subnet_uri}: top-1 {meta['top1']:.4f}, "
            f"top-5 {meta['top5']:.4f}, {meta['flops'] / 1e6:.2f}M FLOPs, "
            f"{meta['params'] / 1e6:.3f}M params")
    return {**accuracy, "subnet_uri": subnet_uri, "child_flops": meta["flops"],
            "child_params": meta["params"], "worker_hours": meta["worker_hours"]}


def attempt_id(collective: Collective, device: torch.device) -> str:
    """A random id shared by this worker group's ranks: a group restarted from an older
    checkpoint (failure, resize) writes new checkpoint folders, never over registered ones."""
    value = torch.tensor([int.from_bytes(os.urandom(4), "little")], dtype=torch.int64,
                         device=device)
    collective.broadcast(value, src=0)
    return f"{int(value):08x}"


def report_with_checkpoint(worker: Worker, run: RunState, metrics: dict, dir_name: str) -> None:
    """Checkpoint (rank 0 writes, every rank reports): everything to continue exactly."""
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=dir_name)
        return
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, worker.strategy, run)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=dir_name)


def check_ranks_agree(strategy: SearchStrategy, collective: Collective) -> None:
    """Fail loudly (on every rank) if any rank's alpha or frozen set differs from rank 0's."""
    if collective.world_size == 1:
        return
    frozen = torch.full((strategy.space.num_layers,), -1.0)
    for layer, choice in strategy.frozen.items():
        frozen[layer] = choice
    mine = torch.cat([strategy.alpha_matrix().reshape(-1).double(), frozen.double()])
    device = strategy.device
    reference = mine.clone().to(device)
    collective.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(reference.cpu(), mine))], device=device)
    collective.all_reduce_sum(differs)
    if float(differs) > 0:
        raise RanksDivergedError(
            f"{int(float(differs))} rank(s) disagree with rank 0 on alpha or the frozen layers "
            f"after step {strategy.step_count} (rank {collective.rank}: frozen {strategy.frozen})")


class Batches:
    """The worker's batches: its Ray Data shard (or the synthetic task), on the device through a
    `DeviceFeed` (normalised there, one batch ahead). Every rank takes the same number of steps
    with no per-step agreement: Ray Train's split gives each rank the same number of rows, so
    every rank's shard ends at the same batch; `train_epoch` checks the counts once an epoch
    (`served`: batches handed out so far)."""

    def __init__(self, job: JobConfig, rank: int, world: int, per_worker: int,
                 steps_per_epoch: int, device: torch.device, channels_last: bool,
                 collective: Collective, skipped: Any = None):
        self.job, self.rank, self.world = job, rank, world
        self.collective = collective
        self.served = 0
        self.per_worker, self.steps = per_worker, steps_per_epoch
        self.device, self.channels_last = device, channels_last
        # The selection split (SPOS/random): held out of `train` by the driver's datasets (or
        # here, for synthetic data), read by `evaluate(split="select")`.
        self.selection_fraction = job.search.selection_fraction
        self.source = WorkerData(job.data, self.selection_fraction, rank, world)
        # data.decode: gpu: training batches arrive encoded and are decoded on `device`.
        decoder = (DeviceDecoder(job.data, device, training=True, skipped=skipped)
                   if job.data.decode == "gpu" else None)
        self.feed = DeviceFeed(device, channels_last=channels_last, decoder=decoder,
                               is_encoded=is_encoded)

    def train(self, epoch: int, limit: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of one epoch (`limit`: only the first few, e.g. for BN
        recalibration after the last epoch)."""
        steps = min(self.steps, limit or self.steps)
        source = self.source.train_batches(epoch, self.per_worker, steps)
        taken = 0
        for images, labels in self.feed(itertools.islice(source, steps)):
            taken += 1
            self.served += 1
            yield images, labels
        if taken < steps and self.rank == 0:
            say(f"[raydsnas] epoch {epoch + 1}: the shard ran out after {taken} of {steps} "
                "batches (images skipped as corrupt?); ending the epoch there")
        if limit is None:
            for _ in source:  # finish the shard's epoch so the next one starts cleanly
                pass

    def check_lockstep(self) -> None:
        """Fail on every rank if the ranks have taken different numbers of batches so far (one
        small all-reduce; every step's gradient all-reduce assumes they have not)."""
        if self.world == 1:
            return
        counts = torch.tensor([float(self.served), float(self.served) ** 2],
                              dtype=torch.float64, device=self.device)
        self.collective.all_reduce_sum(counts)
        total, squares = counts.tolist()
        if squares * self.world != total * total:
            raise RanksDivergedError(f"ranks are at different steps (rank {self.rank} at batch "
                                     f"{self.served}, mean {total / self.world:g})")

    def evaluate(self, forward, collective: Collective, prefix: str | None = None,
                 split: str = "val") -> dict[str, float]:
        """Top-1/top-5 of `forward` over this rank's shard of `split` (`val`, or `select`: the
        selection split), summed over ranks; `prefix` defaults to the split's name."""
        if split not in ("val", "select"):
            raise ValueError(f"split = {split!r}: expected 'val' or 'select'")
        if split == "select" and not self.selection_fraction:
            raise ValueError("no selection split: search.strategy "
                             f"{self.job.search.strategy!r} has no selection_fraction")
        prefix = split if prefix is None else prefix
        source = self.source.eval_batches(split, self.per_worker)
        sums = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            for images, labels in self.feed(source):
                sums += accuracy_sums(forward(images), labels)
        sums = sums.to(self.device)
        collective.all_reduce_sum(sums)
        acc = accuracy_from_sums(sums.cpu())
        return {f"{prefix}_top1": acc.top1, f"{prefix}_top5": acc.top5,
                f"{prefix}_loss": acc.loss, f"{prefix}_samples": acc.count}
