"""The deployable artifact: round trip, the exported program, safety of loading, atomicity,
and BatchNorm recalibration."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from raydsnas import DSNAS, DSNASConfig, SearchSpace, load_child, save_child
from raydsnas.evaluation import evaluate, recalibrate_bn
from raydsnas.export import ArtifactError, load_program, read_record

SPACE = SearchSpace(num_classes=6, input_size=16, width_mult=0.25, stage_repeats=(1, 1, 2, 1),
                    stem_stride=1, dropout=0.1)


@pytest.fixture(scope="module")
def trained():
    """A strategy after a few real steps (BN statistics and weights moved away from init)."""
    d = DSNAS(SPACE, DSNASConfig(lr=0.1, alpha_lr=0.05, epochs=1, steps_per_epoch=8,
                                 warmup_epochs=0, h=0.2, freeze_check_every=4,
                                 freeze_by=None))  # no deadline: any arch stays exportable
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        d.step(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 6, (16,), generator=g))
    return d


def test_loaded_child_and_exported_program_reproduce_the_supernet_logits(trained, tmp_path):
    arch = trained.argmax_arch()
    uri = save_child(trained.export_child(), str(tmp_path / "subnet"), meta={"top1": 0.5})
    x = torch.randn(5, 3, 16, 16)
    expected = trained.predict(x, arch)

    child = load_child(uri)
    assert child.arch == arch and not child.training
    assert child.meta == {"top1": 0.5, "flops": SPACE.flops(arch), "params": SPACE.params(arch)}
    assert child.record["meta"] == {"top1": 0.5}
    assert child.record["flops"] == SPACE.flops(arch) and child.record["params"] == SPACE.params(arch)
    with torch.no_grad():
        assert (child(x) - expected).abs().max() <= 1e-5
        program = load_program(uri, trusted=True).module()
        assert (program(x) - expected).abs().max() <= 1e-5
        assert program(x[:1]).shape == (1, 6)  # the batch dimension is dynamic
    assert sorted(os.listdir(uri)) == ["arch.json", "model.pt2", "model.safetensors"]


def test_loading_a_child_neither_imports_the_supernet_nor_unpickles(trained, tmp_path):
    uri = save_child(trained.export_child(), str(tmp_path / "subnet"), program=False)
    code = (
        "import pickle, sys\n"
        "def refuse(*a, **k): raise AssertionError('unpickling during load_child')\n"
        "pickle.load = pickle.loads = refuse\n"
        "pickle.Unpickler = refuse\n"
        "from raydsnas import load_child\n"
        f"m = load_child({uri!r})\n"
        "assert 'raydsnas.space.supernet' not in sys.modules, 'supernet imported'\n"
        "print(m.arch)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == trained.argmax_arch()


def test_a_tampered_or_half_written_artifact_is_refused(trained, tmp_path):
    uri = save_child(trained.export_child(), str(tmp_path / "subnet"), program=False)
    weights = tmp_path / "subnet" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])
    with pytest.raises(ArtifactError, match="checksum"):
        load_child(uri)
    (tmp_path / "subnet" / "arch.json").unlink()
    with pytest.raises(ArtifactError, match="no arch.json"):
        load_child(uri)


def test_saving_leaves_no_temporary_files_and_overwrites_as_a_whole(trained, tmp_path):
    uri = str(tmp_path / "subnet")
    save_child(trained.export_child([0] * SPACE.num_layers), uri, program=False)
    save_child(trained.export_child([3] * SPACE.num_layers), uri, program=False)
    assert sorted(os.listdir(uri)) == ["arch.json", "model.safetensors"]
    assert read_record(uri)["arch"] == [3] * SPACE.num_layers
    assert load_child(uri).arch == [3] * SPACE.num_layers


def test_export_cli_verifies_and_runs_the_artifact(trained, tmp_path):
    uri = save_child(trained.export_child(), str(tmp_path / "subnet"), program=False)
    out = subprocess.run([sys.executable, "-m", "raydsnas.export", uri, "--batch", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["forward"]["output"] == [3, 6] and summary["arch"] == trained.argmax_arch()
    bad = subprocess.run([sys.executable, "-m", "raydsnas.export", str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no arch.json" in bad.stderr


def test_bn_recalibration_sets_running_stats_to_the_data_statistics(trained):
    child = trained.export_child()
    first_bn = child.stem[1]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 16, 16, generator=g) * 2 + 1 for _ in range(3)]
    conv_out = []
    handle = child.stem[0].register_forward_hook(lambda m, i, o: conv_out.append(o.detach()))
    params = {k: v.clone() for k, v in child.named_parameters()}

    assert recalibrate_bn(child, batches) == 24
    handle.remove()
    feats = torch.cat(conv_out)
    # Cumulative average of per-batch means / unbiased variances (equal batch sizes).
    means = torch.stack([f.mean((0, 2, 3)) for f in conv_out])
    variances = torch.stack([f.transpose(0, 1).reshape(f.shape[1], -1).var(1) for f in conv_out])
    torch.testing.assert_close(first_bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_bn.running_var, variances.mean(0), rtol=1e-4, atol=1e-6)
    assert feats.shape[0] == 24 and not child.training
    assert all(torch.equal(v, dict(child.named_parameters())[k]) for k, v in params.items())
    assert all(m.momentum == 0.1 for m in child.modules() if isinstance(m, nn.BatchNorm2d))


def test_evaluate_counts_top1_and_top5():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 9, 1, 1, 1, 1]])
    labels = torch.tensor([0, 0, 2])
    acc = evaluate(lambda x: x, [(logits, labels)])
    assert acc.count == 3 and acc.top1 == pytest.approx(1 / 3) and acc.top5 == pytest.approx(2 / 3)


def test_artifact_round_trips_through_s3_without_leaking_the_secret(trained, s3_server):
    from tests.conftest import TEST_SECRET_ACCESS_KEY

    bucket = s3_server.make_bucket("subnet")
    uri = f"s3://{bucket}/run/subnet"
    save_child(trained.export_child(), uri, storage_options=s3_server.storage_options)
    objects = s3_server.object_contents(bucket)
    assert sorted(objects) == [f"{bucket}/run/subnet/{n}"
                               for n in ("arch.json", "model.pt2", "model.safetensors")]
    assert not any(TEST_SECRET_ACCESS_KEY.encode() in data for data in objects.values())
    child = load_child(uri, storage_options=s3_server.storage_options)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (child(x) - trained.predict(x, child.arch)).abs().max() <= 1e-5
    with pytest.raises(ArtifactError, match="no arch.json"):
        load_child(f"s3://{bucket}/elsewhere", storage_options=s3_server.storage_options)


def test_load_child_imports_neither_the_search_nor_ray(trained, tmp_path):
    """What the README says of serving: `from raydsnas import load_child` and a load import the
    artifact reader and the child network, not the supernet, a strategy or Ray."""
    uri = save_child(trained.export_child(), str(tmp_path / "subnet"), program=False)
    code = ("import sys\n"
            "from raydsnas import load_child\n"
            f"child = load_child({uri!r})\n"
            "print(sorted(m for m in sys.modules if m.startswith(('raydsnas', 'ray.', 'ray'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    modules = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "raydsnas.export" in modules and "raydsnas.space.child" in modules
    assert not {m for m in modules if m.startswith(("raydsnas.strategies", "ray.", "raydsnas.train"))
                or m in ("ray", "raydsnas.space.supernet")}, modules
