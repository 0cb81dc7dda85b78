"""Job configuration: one YAML file with sections `name`, `space`, `data`, `search`, `scaling`,
`storage`, plus `--set dotted.key=value` overrides, validated before anything starts.

Every error is a `ConfigError` naming the key, the value and what is allowed.

Batch size and learning rate across world sizes (documented rule): `search.global_batch_size`
is fixed by the config; each of W workers takes `global_batch_size // W` samples a step, and the
weight learning rate is `search.lr * (per_worker_batch * W) / search.lr_reference_batch`
(linear scaling; the paper's 0.5 at 1024). So an epoch has the same number of steps and the
same schedule whatever W is, and an elastic resize continues the same recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from raydsnas.checks import check, check_known
from raydsnas.data.errors import DataSpecError
from raydsnas.data.spec import DataSpec
from raydsnas.data.storage import CREDENTIAL_KEYS, S3_OPTION_KEYS
from raydsnas.space import SearchSpace
from raydsnas.strategies import STRATEGIES as STRATEGY_REGISTRY
from raydsnas.strategies import TrainingConfig

STRATEGIES = tuple(STRATEGY_REGISTRY)
SPACE_PRESETS = ("cifar", "imagenet", "custom")


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type, or out of range."""


# -- typed sections ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpaceSection:
    """`preset` (cifar: 32x32, stem stride 1; imagenet: 224; custom: all defaults of
    `SearchSpace`) plus any `SearchSpace` field to override. `num_classes: auto` takes the
    number of classes of the data set.

    Attributes:
        preset: `cifar` (32x32 input, stem stride 1, no dropout), `imagenet` (the paper's
            224x224 space) or `custom` (`SearchSpace` defaults; set the fields yourself).
        num_classes: classifier outputs; `auto` takes the data set's class count.
    """

    preset: str = "cifar"
    num_classes: int | str = "auto"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def build(self, num_classes: int | None = None) -> SearchSpace:
        classes = self.num_classes if self.num_classes != "auto" else num_classes
        if classes is None:
            raise ConfigError("space.num_classes = 'auto' needs the data set's class count")
        if self.preset == "imagenet":
            base = SearchSpace.imagenet(classes).to_dict()
        elif self.preset == "cifar":
            base = SearchSpace.cifar(classes).to_dict()
        else:
            base = SearchSpace(num_classes=classes).to_dict()
        try:
            return SearchSpace.from_dict({**base, **self.overrides})
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class SearchSection:
    """The job-level part of `search`; every other key belongs to the chosen `strategy`'s config
    dataclass (`DSNASConfig`, `SNASConfig`, ...), held typed in `config` from the YAML to the
    workers. `epochs` are the search epochs; a strategy may add epochs after them
    (SPOS/random `final_epochs`).

    Attributes:
        strategy: the search method: `dsnas`, or a baseline on the same space and loop.
        epochs: search epochs (SPOS/random may add `final_epochs` after them).
        global_batch_size: samples per step over all workers; each of W workers takes
            `global_batch_size // W` (fixed by the config, so the schedule does not depend on W).
        lr_reference_batch: the batch `lr` is given for; the weight lr scales linearly to the
            actual global batch.
        eval_every: epochs between validations of the current argmax architecture.
        checkpoint_every: epochs between checkpoints (the last epoch always checkpoints).
        bn_recalibration_batches: training batches that recompute the child's BN statistics
            before export (0: off).
        log_every: steps between progress lines.
        max_steps_per_epoch: cap on steps per epoch (null: the whole training split), for
            smoke runs and benchmarks.
    """

    strategy: str = "dsnas"
    epochs: int = 20
    global_batch_size: int = 64
    lr_reference_batch: int = 1024
    eval_every: int = 1
    checkpoint_every: int = 1
    bn_recalibration_batches: int = 8
    log_every: int = 10
    max_steps_per_epoch: int | None = None
    # The strategy's config: `epochs` is this section's, `steps_per_epoch` 1 and `lr` the
    # configured one until a worker knows its data and world size (`strategy_config`).
    config: TrainingConfig = field(default_factory=lambda: STRATEGY_REGISTRY["dsnas"].config())

    def __post_init__(self) -> None:
        expected = STRATEGY_REGISTRY[self.strategy].config if self.strategy in \
            STRATEGY_REGISTRY else None
        if expected is not None and type(self.config) is not expected:
            raise ConfigError(f"search.strategy = {self.strategy!r} needs a "
                              f"{expected.__name__}, got a {type(self.config).__name__}")

    def strategy_config(self, steps_per_epoch: int, lr: float) -> TrainingConfig:
        """The strategy's config for a run: `steps_per_epoch` from the data, `lr` scaled to
        the world's batch."""
        return dataclasses.replace(self.config, steps_per_epoch=steps_per_epoch, lr=lr)

    @property
    def base_lr(self) -> float:
        """The weight learning rate as configured, for `lr_reference_batch`."""
        return float(self.config.lr)

    @property
    def selection_fraction(self) -> float:
        """The share of the training split held out as the selection split (SPOS/random's
        `selection_fraction`; 0 for strategies that do not choose on one)."""
        return float(self.config.selection_share)


@dataclass(frozen=True)
class ScalingSection:
    """How many Ray Train workers (an int, or `[min, max]` for elastic training) and of what.

    Attributes:
        num_workers: data-parallel workers: a number, or `[min, max]` for elastic training
            (Ray Train V2 starts with what the cluster has, at least `min`, and grows to `max`
            as nodes join; the global batch and the schedule stay the same).
        use_gpu: one GPU per worker (NCCL, bf16 autocast, channels_last); false: CPU and gloo.
        cpus_per_worker: CPUs reserved per worker (also its torch threads on CPU). Leave CPUs
            free on each node for Ray Data's read and decode tasks.
        gpus_per_worker: GPUs per worker when `use_gpu` (1 for data parallelism).
        resources: further Ray resources per worker, beyond CPU and GPU: a custom resource
            that marks the node types to train on (e.g. `{fakegpu: 1}` on
            clusters/local-autoscaling.yaml), as Ray's `resources_per_worker`.
        max_failures: worker-group restarts (from the last checkpoint) before the run fails,
            for crashed workers and lost nodes. Bad input in a worker (a corrupt image, a
            malformed shard) is not retried: the run stops with exit 2.
        max_preemption_failures: restarts after announced preemptions (a spot reclaim or node
            drain that Ray was told of), counted apart from `max_failures`; -1: unlimited.
        sync_bn: BatchNorm statistics over the global batch (all workers) instead of each
            worker's slice; needs `search.sampling: shared`.
        elastic_resize_interval_s: how often an elastic run checks whether it could grow.
    """

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources: Mapping[str, float] = field(default_factory=dict)
    max_failures: int = 3
    max_preemption_failures: int = -1
    sync_bn: bool = False
    elastic_resize_interval_s: float = 60.0

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """What Ray Train reserves for each worker (and preflight checks the nodes against)."""
        per_worker = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            per_worker["GPU"] = self.gpus_per_worker
        return {**per_worker, **self.resources}


@dataclass(frozen=True)
class StorageSection:
    """Where runs go: a local folder or `s3://bucket/prefix`. Credentials never go here: they
    come from the environment (AWS_*) or the cloud role. `options` takes e.g. `endpoint_url`,
    `region`, `anonymous`.

    Attributes:
        uri: a folder or `s3://bucket/prefix` (`gs://` with the `gcp` extra); the run writes
            `<uri>/<name>/`. A relative folder is taken from the current directory, or from the
            head node's home directory in a `ray job submit --working-dir` job. Multi-node runs
            need object storage (every node writes checkpoints there).
        options: object-store options: `endpoint_url`, `region`, `anonymous`, ... (never keys:
            credentials come from AWS_* variables or the instance role).
        keep_checkpoints: how many of the latest checkpoints Ray Train keeps.
    """

    uri: str = "./runs"
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class JobConfig:
    name: str
    space: SpaceSection
    data: DataSpec
    search: SearchSection
    scaling: ScalingSection
    storage: StorageSection
    source: dict = field(default_factory=dict, compare=False)  # the validated mapping, for records

    def to_dict(self) -> dict:
        """The validated mapping as given (only the keys that were set)."""
        return self.source

    def resolved(self) -> dict:
        """Every setting with the value the run uses (defaults filled in), JSON-shaped: what
        `--print-config` shows, what a run records, and what a rerun is compared against."""
        classes = self.space.num_classes if self.space.num_classes != "auto" else 10
        built = self.space.build(classes).to_dict()
        space = {"preset": self.space.preset, "num_classes": self.space.num_classes,
                 **{k: v for k, v in built.items() if k != "num_classes"}}
        search = {f.name: getattr(self.search, f.name) for f in fields(SearchSection)
                  if f.name != "config"}
        strategy = asdict(self.search.strategy_config(1, self.search.base_lr))  # lr: a float
        search.update({k: v for k, v in strategy.items() if k not in ("epochs", "steps_per_epoch")})
        out = {"name": self.name, "space": space, "data": asdict(self.data), "search": search,
               "scaling": asdict(self.scaling),
               "storage": {"uri": self.storage.uri, "options": dict(self.storage.options),
                           "keep_checkpoints": self.storage.keep_checkpoints}}
        return json.loads(json.dumps(out))  # tuples -> lists, as it is stored


DEFAULT_CONFIG: dict[str, Any] = {
    "name": "dsnas-digits",
    "space": {"preset": "cifar", "num_classes": "auto", "width_mult": 0.5,
              "stage_repeats": [2, 2, 4, 2]},
    "data": {"uri": "builtin:digits", "image_size": 32, "crop_scale": [0.6, 1.0], "hflip": False,
             "shuffle_buffer": 256},
    # The reference recipe scaled to a laptop run (benchmarks/end_to_end.py measured it): the
    # search ends by epoch 4 of 12 (`freeze_by`, 1/3 as the reference's 80 of 240), then the
    # argmax child is rewound to its initialisation and trains alone on its own warm-up and
    # cosine (`child_start: rewind`); BatchNorm eps 1e-2 and zero gradients for idle
    # candidates are the defaults. A fast alpha (0.1; the paper: 1e-3 over 240 epochs) and an
    # early-stop check every 10 steps let layers settle by h within those 4 epochs.
    "search": {"strategy": "dsnas", "epochs": 12, "global_batch_size": 64, "lr": 0.1,
               "lr_reference_batch": 64, "h": 0.15, "alpha_lr": 0.1, "warmup_epochs": 1,
               "freeze_check_every": 10, "freeze_by": 0.3333, "child_schedule": "restart",
               "child_start": "rewind", "bn_recalibration_batches": 8},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
    "storage": {"uri": "./runs"},
}


# -- loading -------------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file, or a `ConfigError` naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got "
                          f"{type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """The job config from a YAML file (or the embedded default) with `key=value` overrides."""
    raw = _deep_copy(DEFAULT_CONFIG) if path is None else read_config_file(path)
    for item in overrides:
        apply_override(raw, item)
    if path is None:
        _drop_default_keys_of_other_strategies(raw, overrides)
    return parse_config(raw)


def _drop_default_keys_of_other_strategies(raw: dict, overrides: Sequence[str]) -> None:
    """The embedded default tunes DSNAS (`h`, `freeze_check_every`, ...). With
    `--set search.strategy=snas` those defaults would be foreign keys; drop the ones the user
    did not set, so the default runs with any strategy. Keys set explicitly are still checked."""
    search = raw.get("search")
    if not isinstance(search, dict) or search.get("strategy", "dsnas") not in STRATEGY_REGISTRY:
        return
    own = _strategy_keys(search["strategy"]) | {f.name for f in fields(SearchSection)}
    explicit = {item.split("=", 1)[0].split(".", 1)[1] for item in overrides
                if item.startswith("search.") and "=" in item}
    for key in list(search):
        if key not in own and key not in explicit and key in DEFAULT_CONFIG["search"]:
            del search[key]


def apply_override(raw: dict, item: str) -> None:
    """Apply `dotted.key=value` (value parsed as YAML: numbers, lists, null, strings)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, text = item.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node.get(part), str) and part == "storage":
            node[part] = {"uri": node[part]}
        if not isinstance(node.setdefault(part, {}), dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = node[part]
    node[parts[-1]] = value


def parse_config(raw: Mapping[str, Any]) -> JobConfig:
    sections = ("name", "space", "data", "search", "scaling", "storage")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {list(sections)}")
    name = raw.get("name", DEFAULT_CONFIG["name"])
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ConfigError(f"name = {name!r} is not allowed; expected letters, digits, '.', '_', "
                          "'-' (a folder name, at most 128 characters)")
    space = _parse_space(_section(raw, "space"))
    try:
        data = DataSpec.from_dict(_section(raw, "data"))
    except DataSpecError as err:
        raise ConfigError(str(err)) from None
    search = _parse_search(_section(raw, "search"))
    try:  # settings that must fit the space (fixed's `arch`)
        search.config.check_space(space.build(10))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    scaling = _parse_scaling(_section(raw, "scaling"))
    storage_raw = raw.get("storage", {})
    if isinstance(storage_raw, str):
        storage_raw = {"uri": storage_raw}
    storage = _parse_storage(_mapping("storage", storage_raw))
    storage = StorageSection(anchor_local_storage(storage.uri), storage.options,
                             storage.keep_checkpoints)
    if scaling.sync_bn and not search.config.same_path_on_every_rank:
        raise ConfigError("scaling.sync_bn = true is not allowed with search.sampling = "
                          "'per_rank': ranks run different blocks, so their BatchNorm "
                          "all-reduces would not match; use sampling 'shared' or sync_bn false")
    _check_s3_options("data.storage_options", data.uri, data.storage_options)
    secret = sorted(k for k in data.storage_options if k in CREDENTIAL_KEYS)
    if secret:
        raise ConfigError(f"data.storage_options {secret} are credentials: they never go in a "
                          "config file. Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the "
                          "environment or use the cloud role")
    if scaling.max_workers > search.global_batch_size:
        raise ConfigError(f"scaling.num_workers = {scaling.num_workers!r} is not allowed with "
                          f"search.global_batch_size = {search.global_batch_size}: every worker "
                          "needs at least one sample a step")
    source = {"name": name, "space": _section(raw, "space"), "data": _section(raw, "data"),
              "search": _section(raw, "search"), "scaling": _section(raw, "scaling"),
              "storage": {"uri": storage.uri, "options": dict(storage.options),
                          "keep_checkpoints": storage.keep_checkpoints}}
    return JobConfig(name, space, data, search, scaling, storage, source)


def submitted_with_working_dir() -> bool:
    """True inside a `ray job submit --working-dir ...` job: its current directory is Ray's
    temporary copy of the submitter's folder, deleted some time after the job ends."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return False
    try:
        return bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def anchor_local_storage(uri: str) -> str:
    """A local `storage.uri` as an absolute path (workers run in other directories).

    A relative path is taken from the current directory, except in a job submitted with
    `--working-dir`, where it is taken from the home directory of the node the driver runs on
    (`./runs` -> `~/runs`): the current directory there is a temporary copy that Ray deletes.
    """
    if "://" in uri and not uri.startswith("file://"):
        return uri
    path = os.path.expanduser(uri.removeprefix("file://"))
    if not os.path.isabs(path) and submitted_with_working_dir():
        path = os.path.join(os.path.expanduser("~"), path)
    return os.path.abspath(path)


def _section(raw: Mapping[str, Any], name: str) -> dict:
    return dict(_mapping(name, raw.get(name, {}) or {}))


def _mapping(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} = {value!r} is not allowed; expected a mapping of keys")
    return value


def _parse_space(raw: dict) -> SpaceSection:
    preset = raw.pop("preset", "cifar")
    if preset not in SPACE_PRESETS:
        raise ConfigError(f"space.preset = {preset!r} is not allowed; expected one of "
                          f"{list(SPACE_PRESETS)}")
    num_classes = raw.pop("num_classes", "auto")
    if num_classes != "auto" and not _is_int(num_classes):
        raise ConfigError(f"space.num_classes = {num_classes!r} is not allowed; expected 'auto' "
                          "or an integer >= 1")
    allowed = {f.name for f in fields(SearchSpace) if f.init} - {"num_classes"}
    check_known("space", raw, ["preset", "num_classes", *sorted(allowed)], ConfigError)
    _check_types("space", SearchSpace, raw)
    section = SpaceSection(preset, num_classes, raw)
    section.build(num_classes if num_classes != "auto" else 10)  # validate the values now
    return section


def _parse_search(raw: dict) -> SearchSection:
    job_keys = {f.name for f in fields(SearchSection)} - {"config"}
    job = {k: raw.pop(k) for k in list(raw) if k in job_keys}
    _check_types("search", SearchSection, job)
    strategy = job.get("strategy", SearchSection.strategy)
    _check_choice("search.strategy", strategy, STRATEGIES)
    own = _strategy_keys(strategy)
    foreign = {k: [name for name in STRATEGIES if k in _strategy_keys(name)]
               for k in sorted(set(raw) - own)}
    foreign = {k: owners for k, owners in foreign.items() if owners}
    if foreign:
        raise ConfigError(
            "search: " + "; ".join(f"key {k!r} belongs to search.strategy {owners}"
                                   for k, owners in foreign.items())
            + f", not to search.strategy = {strategy!r}; keys allowed for {strategy!r}: "
            f"{sorted(job_keys | own)}")
    check_known("search", set(raw) - own, sorted(job_keys | own), ConfigError)
    _check_types("search", STRATEGY_REGISTRY[strategy].config, raw)
    for key in ("epochs", "global_batch_size", "lr_reference_batch", "eval_every",
                "checkpoint_every", "log_every"):
        _check_range(f"search.{key}", job.get(key, getattr(SearchSection, key)), 1)
    _check_range("search.bn_recalibration_batches",
                 job.get("bn_recalibration_batches", SearchSection.bn_recalibration_batches), 0)
    if job.get("max_steps_per_epoch") is not None:
        _check_range("search.max_steps_per_epoch", job["max_steps_per_epoch"], 1)
    try:
        config = STRATEGY_REGISTRY[strategy].config(
            **raw, epochs=job.get("epochs", SearchSection.epochs), steps_per_epoch=1)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return SearchSection(**job, config=config)


def _strategy_keys(strategy: str) -> set[str]:
    """The `search` keys of one strategy's config (epochs and steps come from the job)."""
    return {f.name for f in fields(STRATEGY_REGISTRY[strategy].config)} - {"epochs",
                                                                          "steps_per_epoch"}


def _parse_scaling(raw: dict) -> ScalingSection:
    _known("scaling", ScalingSection, raw)
    workers = raw.get("num_workers", 1)
    if _is_int(workers) and workers >= 1:
        pass
    elif (isinstance(workers, (list, tuple)) and len(workers) == 2 and all(map(_is_int, workers))
          and 1 <= workers[0] <= workers[1]):
        raw["num_workers"] = (int(workers[0]), int(workers[1]))
    else:
        raise ConfigError(f"scaling.num_workers = {workers!r} is not allowed; expected an integer "
                          ">= 1 or [min, max] with 1 <= min <= max")
    rest = {k: v for k, v in raw.items() if k != "num_workers"}
    _check_types("scaling", ScalingSection, rest)
    section = ScalingSection(**raw)
    _check_range("scaling.max_failures", section.max_failures, 0)
    _check_range("scaling.max_preemption_failures", section.max_preemption_failures, -1)
    _check_range("scaling.cpus_per_worker", section.cpus_per_worker, 0)
    _check_range("scaling.gpus_per_worker", section.gpus_per_worker, 0)
    for name, amount in section.resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"scaling.resources.{name} is not allowed; CPUs and GPUs are "
                              "scaling.cpus_per_worker and scaling.gpus_per_worker")
        if (not isinstance(amount, (int, float)) or isinstance(amount, bool)
                or amount <= 0):
            raise ConfigError(f"scaling.resources.{name} = {amount!r} is not allowed; "
                              "expected a number > 0")
    if section.elastic_resize_interval_s <= 0:
        raise ConfigError("scaling.elastic_resize_interval_s = "
                          f"{section.elastic_resize_interval_s!r} is not allowed; expected > 0")
    return section


def _parse_storage(raw: Mapping[str, Any]) -> StorageSection:
    raw = dict(raw)
    _known("storage", StorageSection, raw)
    _check_types("storage", StorageSection, raw)
    options = dict(raw.get("options", {}))
    secret = sorted(k for k in options if k in CREDENTIAL_KEYS)
    if secret:
        raise ConfigError(f"storage.options {secret} are credentials: they never go in a config "
                          "file. Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment "
                          "or use the cloud role")
    section = StorageSection(**{**raw, "options": options})
    _check_s3_options("storage.options", section.uri, options)
    if not section.uri.strip():
        raise ConfigError("storage.uri = '' is not allowed; expected a folder or s3://bucket/prefix")
    _check_range("storage.keep_checkpoints", section.keep_checkpoints, 1)
    return section


# -- checks ---------------------------------------------------------------------------------------
def _check_s3_options(key: str, uri: str, options: Mapping[str, Any]) -> None:
    """Unknown object-store options fail here, before Ray starts (credentials are refused
    separately, with where they go instead)."""
    if not uri.startswith("s3://"):
        return
    check_known(key, set(options) - set(CREDENTIAL_KEYS),
                [k for k in S3_OPTION_KEYS if k not in CREDENTIAL_KEYS], ConfigError,
                suffix=f" for {uri}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _known(section: str, cls: type, raw: Mapping[str, Any]) -> None:
    check_known(section, raw, [f.name for f in fields(cls)], ConfigError)


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    check(value in allowed, key, value, f"one of {list(allowed)}", ConfigError)


def _check_range(key: str, value: float, minimum: float) -> None:
    check(value >= minimum, key, value, f"a number >= {minimum}", ConfigError)


def _check_types(section: str, cls: type, raw: dict) -> None:
    """Coerce/check each value against the dataclass field's annotation (ints for floats are
    fine; lists for tuples are fine); a mismatch names the key, the value and the type."""
    hints = typing.get_type_hints(cls)
    for key, value in list(raw.items()):
        if key not in hints:
            continue
        ok, coerced = _conform(value, hints[key])
        if not ok:
            raise ConfigError(f"{section}.{key} = {value!r} is not allowed; expected "
                              f"{_describe(hints[key])}")
        raw[key] = coerced


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, coerced = _conform(value, arg)
            if ok:
                return True, coerced
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return _is_int(value), value
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            return False, value
        item = args[0] if args else Any
        items = []
        for i, v in enumerate(value):
            arg = args[i] if origin is tuple and args and args[-1] is not Ellipsis else item
            ok, c = _conform(v, arg)
            if not ok:
                return False, value
            items.append(c)
        return True, tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping), value
    return True, value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        if args and args[-1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "JobConfig",
    "ScalingSection",
    "SearchSection",
    "SpaceSection",
    "StorageSection",
    "apply_override",
    "load_config",
    "parse_config",
]
