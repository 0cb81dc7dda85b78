"""The search's convergence guarantee and what comes with it, in-process: `freeze_by` freezes
every remaining layer exactly at its epoch, the child phase's schedule (`restart` / `continue`),
exact resume across the deadline, the per-layer credit diagnostic, BatchNorm epsilon in the
exported child, the `fixed` strategy (a plain network trained alone), and the report."""

import pytest
import torch
import torch.nn.functional as F

from raydsnas import DSNAS, DSNASConfig, SearchSpace, load_child, save_child
from raydsnas.search import main as search_main
from raydsnas.strategies import FixedArchitecture, FixedConfig
from raydsnas.strategies.optim import warmup_cosine, weight_param_groups

SPACE = SearchSpace(num_classes=5, input_size=16, width_mult=0.25, stage_repeats=(1, 2, 2, 1),
                    stem_stride=1, dropout=0.0)
STEPS = 4  # per epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(**overrides) -> DSNAS:
    # h = 1: no layer can settle by the gap, so only the deadline freezes.
    cfg = dict(lr=0.05, alpha_lr=0.05, epochs=6, steps_per_epoch=STEPS, warmup_epochs=1, h=1.0,
               freeze_check_every=2)
    cfg.update(overrides)
    return DSNAS(SPACE, DSNASConfig(**cfg))


def batch(step: int, n: int = 8):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(n, 3, 16, 16, generator=g),
            torch.randint(0, SPACE.num_classes, (n,), generator=g))


def run(d: DSNAS, steps: int) -> list[tuple[int, int, float]]:
    """(step, frozen layers, lr of the next step) after each step."""
    out = []
    for _ in range(steps):
        d.step(*batch(d.step_count))
        out.append((d.step_count, len(d.frozen), d.weight_opt.param_groups[0]["lr"]))
    return out


@pytest.mark.parametrize("freeze_by, epoch", [(2, 2), (0.5, 3), (1 / 3, 2)])
def test_freeze_by_freezes_every_remaining_layer_exactly_at_its_epoch(freeze_by, epoch):
    d = make(freeze_by=freeze_by)
    for step, frozen, _ in run(d, 6 * STEPS):
        assert frozen == (SPACE.num_layers if step >= epoch * STEPS else 0), (step, frozen)
    assert d.search_end_step == epoch * STEPS
    assert sorted(d.forced) == list(range(SPACE.num_layers))
    # Frozen on the argmax of alpha (which stops moving at the deadline).
    assert F.softmax(d.alpha_matrix(), -1).argmax(-1).tolist() == [
        d.frozen[l] for l in range(SPACE.num_layers)]
    assert all(len(layer) == 1 for layer in d.supernet.layers)  # pruned: the child alone


def test_restart_begins_a_new_cosine_where_the_search_ended_and_continue_does_not():
    restart, cont = make(freeze_by=2), make(freeze_by=2, child_schedule="continue")
    end, total = 2 * STEPS, 6 * STEPS
    search = warmup_cosine(total, STEPS)
    child = warmup_cosine(total - end, 0)
    for (step, _, lr_r), (_, _, lr_c) in zip(run(restart, total), run(cont, total)):
        assert lr_c == pytest.approx(0.05 * search(step))
        expected = search(step) if step < end else child(step - end)
        assert lr_r == pytest.approx(0.05 * expected), step
    assert restart.weight_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_search_that_ends_inside_the_warm_up_lets_the_warm_up_finish():
    # Every layer frozen after step 1 of a 2-epoch warm-up: no jump from the warm-up's small
    # rate to the full rate; the warm-up and the run's own cosine carry on.
    d = make(warmup_epochs=2)
    for layer in range(SPACE.num_layers):
        d.freeze_layer(layer, 0)
    total = 6 * STEPS
    schedule = warmup_cosine(total, 2 * STEPS)
    for step, _, lr in run(d, total):
        assert d.search_end_step == 1
        assert lr == pytest.approx(0.05 * schedule(step)), step
    assert d.child_schedule_start == 2 * STEPS


def test_a_rewound_child_trains_exactly_as_its_architecture_alone_from_where_the_search_ended():
    d = make(freeze_by=2, child_start="rewind")
    run(d, 2 * STEPS)
    assert d.search_end_step == 2 * STEPS and d.child_schedule_start == 2 * STEPS
    # The rest of the run (4 epochs) as `fixed` would train the found architecture from scratch.
    alone = FixedArchitecture(SPACE, FixedConfig(lr=0.05, epochs=4, steps_per_epoch=STEPS,
                                                 warmup_epochs=1, arch=tuple(d.argmax_arch())))
    mine, theirs = d.supernet.state_dict(), alone.supernet.state_dict()
    assert list(mine) == list(theirs)
    for name in mine:  # weights and BN statistics back at their initialisation
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0)
    # Momentum cleared (zero buffers, created up front: SGD's first update gives the gradient).
    assert all(not torch.any(state["momentum_buffer"]) for state in d.weight_opt.state.values())
    for i in range(4 * STEPS):
        if i == STEPS + 1:  # a checkpoint round trip in the child phase changes nothing
            resumed = make(freeze_by=2, child_start="rewind")
            resumed.load_state_dict(d.state_dict())
            d = resumed
        assert d.weight_opt.param_groups[0]["lr"] == pytest.approx(
            alone.weight_opt.param_groups[0]["lr"]), i
        x, y = batch(100 + i)
        d.step(x, y)
        alone.step(x, y)
    for (name, a), b in zip(d.supernet.state_dict().items(), alone.supernet.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert d.weight_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_rewind_needs_its_own_schedule():
    with pytest.raises(ValueError, match=r"search\.child_start.*child_schedule = 'restart'"):
        make(child_start="rewind", child_schedule="continue")
    with pytest.raises(ValueError, match=r"search\.child_start"):
        make(child_start="fresh")


def test_a_run_resumed_before_the_deadline_freezes_at_the_same_step_with_the_same_weights():
    reference = make(freeze_by=3)
    run(reference, 5 * STEPS)
    first = make(freeze_by=3)
    run(first, 2 * STEPS + 1)  # interrupted mid-epoch, before the deadline
    state = first.state_dict()
    resumed = make(freeze_by=3)
    resumed.load_state_dict(state)
    trace = run(resumed, 5 * STEPS - resumed.step_count)
    assert resumed.search_end_step == reference.search_end_step == 3 * STEPS
    assert resumed.frozen == reference.frozen and resumed.forced == reference.forced
    assert trace[-1][2] == pytest.approx(reference.weight_opt.param_groups[0]["lr"])
    for a, b in zip(resumed.supernet.state_dict().values(), reference.supernet.state_dict().values()):
        torch.testing.assert_close(a, b)
    # ... and one resumed after the deadline keeps the child phase's schedule.
    after = make(freeze_by=3)
    after.load_state_dict(reference.state_dict())
    assert after.search_end_step == 3 * STEPS
    assert after.weight_opt.param_groups[0]["lr"] == pytest.approx(
        reference.weight_opt.param_groups[0]["lr"])


def test_bad_deadlines_name_the_key():
    for bad in (0, -1, 2.5, 7, 1.0 + 1e-9):
        with pytest.raises(ValueError, match=r"search\.freeze_by"):
            make(freeze_by=bad)
    with pytest.raises(ValueError, match=r"search\.freeze_by.*pretrain_epochs"):
        make(freeze_by=2, pretrain_epochs=2)
    with pytest.raises(ValueError, match=r"search\.child_schedule"):
        make(child_schedule="warm")


def test_credit_diagnostic_is_the_running_mean_of_the_absolute_credit_per_layer():
    d = make(freeze_by=None, h=1.0)
    expected = torch.zeros(SPACE.num_layers, dtype=torch.float64)
    weight = 0.0
    for _ in range(5):
        x, y = batch(d.step_count)
        path = d.sample_path()
        _, _, cost = d.compute_gradients(x, y, path)  # what step() will compute
        expected = 0.98 * expected + 0.02 * cost.double().abs()
        weight = 0.98 * weight + 0.02
        d.step(x, y)
    got = torch.tensor(d.credit_magnitude(), dtype=torch.float64)
    torch.testing.assert_close(got, expected / weight, rtol=1e-4, atol=1e-12)
    assert (got > 0).all()


def test_exported_child_keeps_the_batchnorm_epsilon_it_was_trained_with(tmp_path):
    for eps in (1e-2, 1e-5):
        space = SearchSpace.from_dict({**SPACE.to_dict(), "bn_eps": eps})
        d = DSNAS(space, DSNASConfig(epochs=1, steps_per_epoch=2, freeze_by=None))
        d.step(*batch(0))
        uri = save_child(d.export_child(), str(tmp_path / f"eps{eps}"), program=False)
        child = load_child(uri)
        norms = [m for m in child.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and {m.eps for m in norms} == {eps}
        x, _ = batch(3)
        torch.testing.assert_close(child(x), d.predict(x), rtol=1e-5, atol=1e-6)
    # A record written before the setting existed was trained with PyTorch's default.
    legacy = {k: v for k, v in SPACE.to_dict().items() if k != "bn_eps"}
    assert SearchSpace.from_dict(legacy).bn_eps == 1e-5


def test_fixed_strategy_is_plain_training_of_the_child_network():
    arch = [3, 0, "choice_7", 1, 0, 2]
    cfg = FixedConfig(lr=0.1, epochs=2, steps_per_epoch=3, warmup_epochs=1, arch=tuple(arch))
    fixed = FixedArchitecture(SPACE, cfg)
    assert fixed.argmax_arch() == [3, 0, 2, 1, 0, 2]
    assert all(len(layer) == 1 for layer in fixed.supernet.layers)
    # An independent plain training: the same initial weights in a ChildNet, torch's SGD.
    child = fixed.export_child()
    opt = torch.optim.SGD(weight_param_groups(child, cfg.weight_decay), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(6, 3))
    for step in range(6):
        x, y = batch(step)
        fixed.step(x, y)
        child.train()
        opt.zero_grad()
        F.cross_entropy(child(x), y, label_smoothing=0.1).backward()
        opt.step()
        sched.step()
    x, _ = batch(99)
    child.eval()
    torch.testing.assert_close(fixed.predict(x), child(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, message", [
    ("[0,1,2]", r"search\.arch = \[0, 1, 2\] is not allowed: it has 3 entries and this space "
                r"has 10 layers"),
    ("[0,1,2,3,0,1,2,3,0,4]", r"search\.arch = .* layer 9 is 4; expected an index 0\.\.3"),
    ("[0,1,2,3,0,1,2,3,0,choice_9]", r"search\.arch = .* layer 9 is 'choice_9'"),
    ("null", r"search\.arch = null is not allowed with search\.strategy = 'fixed'"),
])
def test_fixed_rejects_a_wrong_architecture_with_exit_2_naming_search_arch(arch, message,
                                                                           capsys):
    code = search_main(["--set", "search.strategy=fixed", "--set", f"search.arch={arch}",
                        "--print-config"])
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_report_marks_the_search_end_and_shows_the_credit():
    from raydsnas.report import run_section

    layers = 3
    history = []
    for epoch in range(1, 5):
        h = {"epoch": epoch, "entropy": 1.0 / epoch, "frozen": 0 if epoch < 2 else layers,
             "train_top1": 0.5, "train_loss": 1.0, "val_top1": 0.4, "expected_flops": 1e6,
             "arch": [0, 1, 2], "probs": [[0.25] * 4] * layers,
             "credit": [1e-2, 1e-7, 3e-3]}
        if epoch >= 2:
            h.update(search_end_epoch=2, search_end_step=8, forced_frozen=2)
        history.append(h)
    page = run_section("r", history)
    assert 'id="search-end"' in page and "ended in epoch 2 (step 8)" in page
    assert "1 layer(s) frozen by h, 2 by the freeze_by deadline" in page
    assert page.count('class="marker"') >= 4  # entropy, frozen, credit, accuracy, loss
    assert 'id="credit-r"' in page and "barely steered" in page  # layer 1: 1e-5 of the median
    not_ended = run_section("s", [{**history[0]}])
    assert "did not end" in not_ended
