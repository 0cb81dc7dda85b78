"""Ranking correlation: Kendall's tau-b against hand-computed values and scipy, and the `rank`
command on a real (tiny) supernet checkpoint."""

import math
import random

import pytest
import torch

from raydsnas.analysis import kendall_tau, main
from raydsnas.data.tensors import TensorBatches
from raydsnas.space import SearchSpace
from raydsnas.strategies import SPOS, SPOSConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_kendall_tau_matches_hand_computed_values_without_and_with_ties():
    # b = 3,4,1,2,5 against an increasing a: 6 concordant, 4 discordant pairs of 10.
    assert kendall_tau([1, 2, 3, 4, 5], [3, 4, 1, 2, 5]) == pytest.approx(0.2)
    # a = 1,2,2,3 and b = 1,3,2,2: 3 concordant, 1 discordant, one tie in each of 6 pairs:
    # tau-b = (3 - 1) / sqrt((6 - 1) * (6 - 1)) = 0.4.
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.4)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_kendall_tau_equals_scipy_on_random_lists_with_ties():
    rng = random.Random(0)
    cases = [([rng.randint(0, 4) for _ in range(n)], [rng.randint(0, 3) for _ in range(n)])
             for n in (5, 12, 30) for _ in range(5)]
    from scipy.stats import kendalltau  # installed with scikit-learn, a dependency

    for a, b in cases:
        assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)


def test_rank_command_scores_architectures_with_a_checkpoint_and_prints_tau(tmp_path, capsys):
    space = SearchSpace(num_classes=4, input_size=8, width_mult=0.25, stage_repeats=(1, 1, 1, 1),
                        stem_stride=1, dropout=0.0)
    s = SPOS(space, SPOSConfig(lr=0.05, epochs=1, steps_per_epoch=4, warmup_epochs=0))
    g = torch.Generator().manual_seed(0)
    data = TensorBatches((torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,),
                                                                               generator=g)),
                         (torch.randn(8, 3, 8, 8, generator=g), torch.zeros(8).long()), 8)
    for images, labels in data.train(0):
        s.step(images, labels)
    torch.save({"strategy": s.state_dict()}, tmp_path / "state.pt")
    archs = tmp_path / "archs.txt"
    archs.write_text("# three architectures\n0,1,2,3\n3 3 3 3\n")
    assert main(["rank", "--checkpoint", str(tmp_path / "state.pt"), "--archs", str(archs),
                 "--arch", "1,0,1,0", "--epochs", "1", "--data", "synthetic:4/32/16",
                 "--batch-size", "8", "--bn-batches", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["arch", "MFLOPs", "search_top1", "eval_top1"]
    rows = [line.split() for line in lines[1:4]]
    assert [r[0] for r in rows] == ["1,0,1,0", "0,1,2,3", "3,3,3,3"]
    assert all(float(r[1]) == pytest.approx(space.flops(list(map(int, r[0].split(",")))) / 1e6,
                                            abs=1e-3) for r in rows)
    search, evaluation = [float(r[2]) for r in rows], [float(r[3]) for r in rows]
    assert all(0 <= v <= 1 for v in search + evaluation)
    tau = kendall_tau(search, evaluation)
    assert lines[4].startswith("kendall_tau ")
    assert lines[4].split()[1] == f"{tau:.4f}" or math.isnan(tau)

    assert main(["rank", "--checkpoint", str(tmp_path / "state.pt"), "--arch", "0,1",
                 "--arch", "1,1"]) == 2
    assert "arch has 2 entries" in capsys.readouterr().err
