"""Job configuration: YAML + overrides into typed sections; every bad value named, exit code 2,
nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydsnas.config import ConfigError, load_config
from raydsnas.search import main
from raydsnas.train.loop import world_batch


def test_default_config_is_valid_and_overrides_apply():
    job = load_config(None, ["search.h=0.2", "scaling.num_workers=[1,4]",
                             "storage=s3://bucket/runs", "space.width_mult=0.25",
                             "search.flops_budget=null", "data.crop_scale=[0.5,1]"])
    assert job.search.config.h == 0.2
    assert job.scaling.num_workers == (1, 4) and job.scaling.max_workers == 4
    assert job.storage.uri == "s3://bucket/runs"
    assert job.space.build(10).width_mult == 0.25
    assert job.data.crop_scale == (0.5, 1.0)


def test_yaml_file_loads_and_the_space_takes_the_data_class_count(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: tiny\nspace: {preset: imagenet, num_classes: auto}\n"
                    "data: {uri: builtin:digits, image_size: 224}\n"
                    "search: {epochs: 3, global_batch_size: 32, sampling: per_rank}\n"
                    "storage: {uri: /tmp/x, options: {}}\n")
    job = load_config(path)
    space = job.space.build(7)
    assert job.name == "tiny" and space.num_classes == 7 and space.input_size == 224
    assert job.search.strategy_config(steps_per_epoch=5, lr=0.1).sampling == "per_rank"


def test_batch_and_lr_follow_the_world_size_by_the_documented_rule():
    job = load_config(None, ["search.global_batch_size=64", "search.lr=0.5",
                             "search.lr_reference_batch=1024"])
    assert world_batch(job, 1) == (64, 0.5 * 64 / 1024)
    assert world_batch(job, 4) == (16, 0.5 * 64 / 1024)
    assert world_batch(job, 3) == (21, 0.5 * 63 / 1024)


@pytest.mark.parametrize("override, message", [
    ("search.hh=1", "search: unknown key(s) ['hh']"),
    ("spcae.width_mult=1", "unknown top-level key(s) ['spcae']"),
    ("search.h=abc", "search.h = 'abc' is not allowed; expected a number"),
    ("search.h=1.5", "search.h = 1.5 is not allowed; expected a number in (0, 1]"),
    ("search.sampling=all", "search.sampling = 'all' is not allowed; expected one of"),
    ("scaling.num_workers=[4,1]", "scaling.num_workers = [4, 1] is not allowed"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu = 'maybe' is not allowed; expected true or false"),
    ("scaling.resources.fakegpu=0", "scaling.resources.fakegpu = 0 is not allowed; expected a "
     "number > 0"),
    ("scaling.resources.GPU=1", "scaling.resources.GPU is not allowed; CPUs and GPUs are"),
    ("scaling.resources=4", "scaling.resources = 4 is not allowed"),
    ("space.width_mult=0", "space.width_mult = 0 is not allowed"),
    ("space.preset=resnet", "space.preset = 'resnet' is not allowed"),
    ("data.image_size=2", "data.image_size = 2"),
    ("storage.options.secret_access_key=abc", "credentials: they never go in a config file"),
    ("search.epochs=0", "search.epochs = 0 is not allowed"),
    ("name=../escape", "name = '../escape' is not allowed"),
    ("data.storage_options.secret_access_key=abc", "data.storage_options ['secret_access_key']"),
])
def test_bad_values_exit_2_naming_the_key_and_write_nothing(override, message, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_missing_or_broken_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_exit_code_and_message_for_a_bad_config(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-m", "raydsnas.search", "--set", "search.h=-1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert "search.h = -1 is not allowed" in out.stderr
    assert not (Path(tmp_path) / "runs").exists()


def test_global_batch_norm_is_refused_with_per_rank_sampling():
    # Ranks run different blocks under per_rank: their BN all-reduces would not line up.
    with pytest.raises(ConfigError, match="sync_bn = true is not allowed with search.sampling"):
        load_config(None, ["scaling.sync_bn=true", "search.sampling=per_rank"])
    assert load_config(None, ["scaling.sync_bn=true"]).scaling.sync_bn
