"""`python -m raydsnas.tune --config jobs/sweep.yaml [--set key=value ...]`: a Ray Tune sweep of
search runs (early-stop threshold h, learning rates, any config key).

The config is a search job's config plus a `sweep` section:

    sweep:
      params:                         # any dotted job key -> a search space
        search.h: {grid: [0.1, 0.2, 0.3]}
        search.lr: {loguniform: [0.01, 0.5]}
        search.alpha_lr: {choice: [0.001, 0.01]}
        search.weight_decay: {uniform: [0.0, 1.0e-4]}
      num_samples: 1                  # samples of the random params (grids are crossed with them)
      max_concurrent_trials: 1
      metric: child_val_top1          # ranks the trials (the argmax child's validation top-1)
      mode: max
      scheduler: {type: asha, metric: val_top1, grace_period: 1, reduction_factor: 2}
                                      # optional; `mode` defaults to the sweep's; any metric the
                                      # search reports every epoch (val_top1, train_loss, ...)
      trial_resources: {CPU: 0, memory: 268435456}   # the trial's driver only (the default);
                                      # its Train workers ask for `scaling`

Each trial is a Ray Train search run (`TorchTrainer` with `TuneReportCallback`) named after the
trial, so everything of trial T lives in `<storage>/<sweep>/<T>/` (Tune's results, Train's
checkpoints, `events/`, `subnet/`). At the end `<storage>/<sweep>/summary.json` and `summary.csv`
list every trial's parameters, status, accuracy, FLOPs, params, wall time and subnet URI, and
name the best trial and the accuracy-vs-FLOPs Pareto front. Running the same command again
resumes the sweep (finished trials are kept, unfinished ones continue from their checkpoints).
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydsnas.checks import check_known
from raydsnas.config import ConfigError, apply_override, parse_config, read_config_file
from raydsnas.data.errors import DataError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
SCHEDULERS = ("asha",)
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class SweepConfig:
    """The `sweep` section of a sweep config (the rest is a search job's config).

    Attributes:
        params: dotted job key -> `{grid: [...]}`, `{choice: [...]}`, `{uniform: [lo, hi]}` or
            `{loguniform: [lo, hi]}`; every value (or range end) is validated on the job first.
        num_samples: samples of the random params (grids are crossed with them).
        max_concurrent_trials: trials running at once (each asks for its `scaling` workers).
        metric: what ranks the trials: the exported child's `child_val_top1`, or any metric
            the search reports.
        mode: `max` or `min` for `metric`.
        scheduler: null, or `{type: asha, metric, mode, grace_period, reduction_factor}` to stop
            weak trials early on a metric reported every epoch (e.g. `val_top1`).
        trial_resources: what each trial's driver asks for (its Train workers ask for
            `scaling`); a CPU here would starve Ray Data on a small machine.
    """

    params: Mapping[str, tuple[str, list]]
    num_samples: int = 1
    max_concurrent_trials: int = 1
    metric: str = "child_val_top1"
    mode: str = "max"
    scheduler: Mapping[str, Any] | None = None
    # The trial's driver only needs memory: a fractional CPU here would leave less than one
    # whole CPU for Ray Data's decode tasks on a small machine, and the search would starve.
    trial_resources: Mapping[str, float] = field(
        default_factory=lambda: {"CPU": 0, "memory": 256 * 2**20})


def parse_sweep(raw: Mapping[str, Any], job_raw: dict) -> SweepConfig:
    """Validate the `sweep` section; every swept key is tried on the job config now."""
    allowed = ("params", "num_samples", "max_concurrent_trials", "metric", "mode", "scheduler",
               "trial_resources")
    check_known("sweep", raw, allowed, ConfigError)
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise ConfigError("sweep.params must map at least one dotted config key to "
                          f"{{{' | '.join(DISTRIBUTIONS)}: [...]}}")
    params: dict[str, tuple[str, list]] = {}
    for key, spec in params_raw.items():
        where = f"sweep.params.{key}"
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where} = {spec!r} is not allowed; expected one of "
                              f"{{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, "
                              "{loguniform: [low, high]}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind} = {values!r} is not allowed; expected a list")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) \
                    or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
                raise ConfigError(f"{where}.{kind} = {values!r} is not allowed; expected "
                                  f"[low, high] with {'0 < ' if kind == 'loguniform' else ''}"
                                  "low < high")
        for value in values:  # every value (or both ends of a range) must make a valid job
            trial = copy.deepcopy(job_raw)
            set_dotted(trial, key, value)
            try:
                parse_config(trial)
            except ConfigError as err:
                raise ConfigError(f"{where}: value {value!r} makes an invalid job: {err}") from None
        params[key] = (kind, list(values))
    sweep = SweepConfig(params=params, **{k: raw[k] for k in allowed[1:] if k in raw})
    for key in ("num_samples", "max_concurrent_trials"):
        value = getattr(sweep, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"sweep.{key} = {value!r} is not allowed; expected an integer >= 1")
    if sweep.mode not in ("max", "min"):
        raise ConfigError(f"sweep.mode = {sweep.mode!r} is not allowed; expected 'max' or 'min'")
    if sweep.scheduler is not None:
        kind = sweep.scheduler.get("type") if isinstance(sweep.scheduler, Mapping) else None
        if kind not in SCHEDULERS:
            raise ConfigError(f"sweep.scheduler = {sweep.scheduler!r} is not allowed; expected "
                              "null or {type: asha, metric, grace_period, reduction_factor}")
        check_known("sweep.scheduler", sweep.scheduler,
                    ("type", "metric", "mode", "grace_period", "reduction_factor"), ConfigError)
    return sweep


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `a.b.c = value` in a nested mapping (same rules as `--set`)."""
    apply_override(raw, f"{key}={json.dumps(value)}")


def load_sweep(path: str, overrides: Sequence[str] = ()) -> tuple[dict, SweepConfig]:
    """(the job's raw mapping with overrides, the validated sweep) from a sweep YAML file."""
    raw = read_config_file(path)
    if "sweep" not in raw:
        raise ConfigError(f"config file {path} has no 'sweep' section (a plain job? use "
                          "python -m raydsnas.search)")
    wrapper = {"sweep": raw.pop("sweep") or {}}
    for item in overrides:
        apply_override(wrapper if item.startswith("sweep.") else raw, item)
    parse_config(raw)  # the base job must be valid on its own
    return raw, parse_sweep(wrapper["sweep"], raw)


# -- the trial -------------------------------------------------------------------------------------
def run_trial(config: dict) -> None:
    """A Tune function trainable: one search run on Ray Train with this trial's parameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydsnas.train.launcher import build_trainer

    raw = copy.deepcopy(config["job"])
    for key, value in config["params"].items():
        set_dotted(raw, key, value)
    raw["name"] = ray.tune.get_context().get_trial_name()  # stable across sweep restores
    storage = raw.get("storage") or {}
    raw["storage"] = {**({"uri": storage} if isinstance(storage, str) else storage),
                      "uri": config["sweep_uri"]}
    build_trainer(parse_config(raw), callbacks=[TuneReportCallback()]).fit()


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, (kind, values) in sweep.params.items()}


def trial_label(trial) -> str:
    return f"trial-{trial.trial_id}"


def build_tuner(job_raw: dict, sweep: SweepConfig):
    """A new `Tuner`, or the restored one if this sweep already started."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from raydsnas.train.launcher import run_uri

    job = parse_config(job_raw)
    sweep_uri = run_uri(job)  # <storage>/<sweep>, absolute for a local folder
    storage_path, storage_fs = _tune_storage(job)
    trainable = ray.tune.with_resources(run_trial, dict(sweep.trial_resources))
    experiment = f"{storage_path.rstrip('/')}/{job.name}"
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        return ray.tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                      restart_errored=True, storage_filesystem=storage_fs)
    scheduler = None
    if sweep.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="epoch", metric=sweep.scheduler.get("metric", "val_top1"),
            mode=sweep.scheduler.get("mode", sweep.mode),
            max_t=job.search.epochs, grace_period=sweep.scheduler.get("grace_period", 1),
            reduction_factor=sweep.scheduler.get("reduction_factor", 2))
    return ray.tune.Tuner(
        trainable,
        param_space={"job": job_raw, "sweep_uri": sweep_uri, "params": search_space(sweep)},
        tune_config=ray.tune.TuneConfig(
            num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials,
            scheduler=scheduler, trial_name_creator=trial_label,
            trial_dirname_creator=trial_label),
        run_config=ray.tune.RunConfig(name=job.name, storage_path=storage_path,
                                      storage_filesystem=storage_fs),
    )


def _tune_storage(job) -> tuple[str, Any]:
    from raydsnas.data.storage import is_local_uri, resolve_filesystem

    fs, root = resolve_filesystem(job.storage.uri, job.storage.options)
    return (root, None) if is_local_uri(job.storage.uri) else (root, fs)


# -- the summary -----------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, accuracy, flops) points no other point beats on both (higher
    accuracy, lower FLOPs), sorted by FLOPs."""
    front = [p for p in points
             if not any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2])
                        for q in points)]
    return [p[0] for p in sorted(front, key=lambda p: p[2])]


def summarise(result_grid, job_raw: dict, sweep: SweepConfig) -> dict[str, Any]:
    """Per-trial rows from Tune's results and each trial's exported `arch.json`."""
    from raydsnas.export import ArtifactError, read_record
    from raydsnas.train.launcher import run_uri

    job = parse_config(job_raw)
    sweep_uri = run_uri(job)
    rows = []
    for result in result_grid:
        name = Path(result.path).name
        params = (result.config or {}).get("params", {})
        subnet_uri = f"{sweep_uri}/{name}/subnet"
        metrics = result.metrics or {}
        row: dict[str, Any] = {"trial": name, "params": params,
                               "epochs_done": metrics.get("epoch", 0),
                               "error": str(result.error).splitlines()[0] if result.error else None}
        try:
            record = read_record(subnet_uri, job.storage.options)
        except (ArtifactError, DataError):
            record = None
        if record is not None:
            meta = record["meta"]
            row.update(status="completed", top1=meta["top1"], top5=meta["top5"],
                       flops=record["flops"], params_count=record["params"],
                       wall_time_s=meta["wall_time_s"], worker_hours=meta["worker_hours"],
                       subnet_uri=subnet_uri, arch=record["arch"],
                       metric=meta["top1"] if sweep.metric == "child_val_top1"
                       else metrics.get(sweep.metric))
        else:
            row.update(status="error" if result.error else "stopped", subnet_uri=None,
                       metric=metrics.get(sweep.metric))
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    scored = [r for r in rows if r["status"] == "completed" and r["metric"] is not None
              and not (isinstance(r["metric"], float) and math.isnan(r["metric"]))]
    best = None
    if scored:
        pick = max if sweep.mode == "max" else min
        best = pick(scored, key=lambda r: r["metric"])["trial"]
    done = [r for r in rows if r["status"] == "completed"]
    front = pareto_front([(r["trial"], r["top1"], r["flops"]) for r in done])
    return {"sweep": job.name, "uri": sweep_uri, "metric": sweep.metric, "mode": sweep.mode,
            "params": {k: {kind: values} for k, (kind, values) in sweep.params.items()},
            "trials": rows, "best_trial": best, "pareto_front": front}


def write_summary(summary: dict, job_raw: dict) -> str:
    from raydsnas.data.storage import join_path, resolve_filesystem, write_bytes_atomic

    job = parse_config(job_raw)
    fs, root = resolve_filesystem(summary["uri"], job.storage.options)
    write_bytes_atomic(fs, join_path(root, SUMMARY_FILE),
                       json.dumps(summary, indent=2, sort_keys=True).encode())
    columns = ["trial", "status", "epochs_done", *[f"param:{k}" for k in summary["params"]],
               "top1", "top5", "flops", "params_count", "wall_time_s", "worker_hours",
               "subnet_uri", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in summary["trials"]:
        writer.writerow({**{c: row.get(c) for c in columns if not c.startswith("param:")},
                         **{f"param:{k}": v for k, v in row["params"].items()}})
    write_bytes_atomic(fs, join_path(root, "summary.csv"), text.getvalue().encode())
    return f"{summary['uri']}/{SUMMARY_FILE}"


def run_sweep(job_raw: dict, sweep: SweepConfig) -> dict[str, Any]:
    from raydsnas.train.launcher import connect_ray

    connect_ray()
    results = build_tuner(job_raw, sweep).fit()
    summary = summarise(results, job_raw, sweep)
    write_summary(summary, job_raw)
    return summary


def format_table(summary: dict) -> str:
    keys = list(summary["params"])
    header = ["trial", "status", *keys, "top1", "MFLOPs", "Mparams", "wall s"]
    lines = [header]
    for r in summary["trials"]:
        done = r["status"] == "completed"
        lines.append([r["trial"] + (" *" if r["trial"] == summary["best_trial"] else ""),
                      r["status"] + ("" if done else f" @{r['epochs_done']}"),
                      *[f"{r['params'].get(k)!s:.8}" for k in keys],
                      f"{r['top1']:.4f}" if done else "-",
                      f"{r['flops'] / 1e6:.2f}" if done else "-",
                      f"{r['params_count'] / 1e6:.3f}" if done else "-",
                      f"{r['wall_time_s']:.0f}" if done else "-"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydsnas.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (a job config + `sweep`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a job or sweep value (repeatable)")
    args = parser.parse_args(argv)
    try:
        job_raw, sweep = load_sweep(args.config, args.overrides)
    except ConfigError as err:
        print(f"raydsnas: configuration error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_sweep(job_raw, sweep)
    except (DataError, ConfigError) as err:
        print(f"raydsnas: input error: {err}", file=sys.stderr)
        return 2
    print(f"\nraydsnas: sweep '{summary['sweep']}' - {len(summary['trials'])} trials "
          f"(* best by {summary['metric']}, {summary['mode']})")
    print(format_table(summary))
    print(f"  Pareto front (top-1 vs FLOPs): {', '.join(summary['pareto_front']) or '-'}")
    print(f"  summary: {summary['uri']}/{SUMMARY_FILE} (and summary.csv)")
    return 0 if any(r["status"] == "completed" for r in summary["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
