"""The baseline strategies (SNAS, ProxylessNAS, SPOS, random search) on a tiny space, pure
torch: their gradients against independent computations, the EA's constraint, determinism and
quality, and that each exports the same child artifact as DSNAS, equal to its own `predict`."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from raydsnas import SearchSpace, load_child, save_child
from raydsnas.data.tensors import TensorBatches
from raydsnas.strategies import STRATEGIES, build_strategy
from raydsnas.strategies.snas import SNAS, SNASConfig, relaxed_choice, temperature

SPACE = SearchSpace(num_classes=4, input_size=8, width_mult=0.25, stage_repeats=(1, 1, 2, 1),
                    stem_stride=1, dropout=0.0)
TRAIN = {"lr": 0.05, "epochs": 2, "steps_per_epoch": 3, "warmup_epochs": 0, "label_smoothing": 0.1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one intra-op thread (two contend badly on a shared 2-core machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def batch(seed: int, n: int = 6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, SPACE.num_classes, (n,), generator=g))


def tiny_data(n_train: int = 24, n_val: int = 12, selection_fraction: float = 0.0
              ) -> TensorBatches:
    return TensorBatches(batch(1, n_train), batch(2, n_val), batch_size=6,
                         selection_fraction=selection_fraction)


def hand_forward(supernet, x, layer_fn):
    """An independent supernet forward: stem, `layer_fn(l, {name: block}, x)`, head."""
    x = supernet.stem(x)
    for l, layer in enumerate(supernet.layers):
        x = layer_fn(l, layer, x)
    return supernet.head(x)


# -- SNAS --------------------------------------------------------------------------------------
def test_snas_alpha_gradient_is_the_gumbel_softmax_jacobian_times_dl_dz():
    s = SNAS(SPACE, SNASConfig(**TRAIN, tau_start=0.7, tau_end=0.7))
    s.supernet.double()
    x, y = batch(0, dtype=torch.float64)
    gumbel = s.sample_gumbel().double()
    with torch.no_grad():
        s.alpha.data = s.alpha.data.double() + 0.3 * torch.randn(s.alpha.shape,
                                                                 dtype=torch.float64)
    s.compute_gradients(x, y, gumbel)
    got = s.alpha.grad.clone()

    # dL/dz with z a leaf at its sampled value, through a hand-written mixed forward.
    tau = 0.7
    logits_z = (s.alpha.detach() + gumbel) / tau
    z = (logits_z.exp() / logits_z.exp().sum(-1, keepdim=True)).requires_grad_(True)
    names = SPACE.choice_names
    out = hand_forward(s.supernet, x, lambda l, layer, h: sum(
        z[l, k] * layer[names[k]](h) for k in range(len(names))))
    (dz,) = torch.autograd.grad(F.cross_entropy(out, y, label_smoothing=0.1), z)
    # dz_j/dalpha_k = z_j (delta_jk - z_k) / tau   =>   dL/dalpha_k = z_k (dz_k - <dz, z>) / tau
    zd = z.detach()
    expected = zd * (dz - (dz * zd).sum(-1, keepdim=True)) / tau
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-10)


def test_snas_hard_option_forwards_one_hot_and_temperature_anneals():
    alpha, gumbel = torch.randn(3, 4), torch.randn(3, 4)
    hard = relaxed_choice(alpha, gumbel, 0.5, hard=True)
    torch.testing.assert_close(hard, F.one_hot((alpha + gumbel).argmax(-1), 4).float())
    assert temperature(0, 11, 1.0, 0.01, "exponential") == 1.0
    assert temperature(5, 11, 1.0, 0.01, "exponential") == pytest.approx(0.1)
    assert temperature(10, 11, 1.0, 0.01, "exponential") == pytest.approx(0.01)
    assert temperature(5, 11, 2.0, 1.0, "linear") == pytest.approx(1.5)


# -- every strategy ----------------------------------------------------------------------------
def strategy_config(name: str):
    extra = {"spos": {"population": 4, "iterations": 2, "top_k": 2, "mutations": 2, "crossovers": 2,
                          "bn_batches": 2, "selection_fraction": 0.25},
             "random": {"num_samples": 3, "bn_batches": 2, "selection_fraction": 0.25},
             "fixed": {"arch": [0, 3, 1, "choice_7", 0]}}.get(name, {})
    return STRATEGIES[name].config(**TRAIN, **extra)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_steps_and_exports_a_child_equal_to_its_predict(name, tmp_path):
    s = build_strategy(name, SPACE, strategy_config(name))
    # As the loop does: a selection split only for the strategies with selection_fraction.
    data = tiny_data(selection_fraction=getattr(s.config, "selection_fraction", 0.0))
    before = {n: p.detach().clone() for n, p in s.supernet.named_parameters()}
    losses = []
    for epoch in range(2):
        for images, labels in data.train(epoch):
            losses.append(float(s.step(images, labels).loss))
    s.end_search(data, 2)
    assert s.step_count == 2 * data.steps_per_epoch
    # Strategies that freeze layers prune candidates: compare the parameters still there.
    moved = sum(float((before[n] - p.detach()).abs().sum())
                for n, p in s.supernet.named_parameters())
    assert moved > 0
    arch = s.argmax_arch()
    child = s.export_child()
    assert child.arch == arch
    uri = save_child(child, str(tmp_path / "subnet"), program=False)
    loaded = load_child(uri)
    x, _ = batch(5)
    torch.testing.assert_close(loaded(x), s.predict(x), rtol=1e-5, atol=1e-6)


# -- ProxylessNAS ------------------------------------------------------------------------------
def test_proxyless_two_path_gate_gradient_and_alpha_update_match_an_independent_computation():
    from raydsnas.strategies.proxyless import ProxylessConfig, ProxylessNAS

    s = ProxylessNAS(SPACE, ProxylessConfig(**TRAIN, alpha_lr=0.01))
    s.supernet.double()
    with torch.no_grad():
        s.alpha.add_(0.5 * torch.randn(s.alpha.shape, generator=torch.Generator().manual_seed(3)))
    x, y = batch(0, dtype=torch.float64)
    _, pairs, active = s.sample()
    gate_grad = s.gate_gradients(x, y, pairs, active)

    # Independent: a hand-written forward where layer l is g0 * block_i(x) + g1 * block_j(x).
    names = SPACE.choice_names
    g = F.one_hot(active, 2).double().requires_grad_(True)
    out = hand_forward(s.supernet, x, lambda l, layer, h: (
        g[l, 0] * layer[names[int(pairs[l, 0])]](h) + g[l, 1] * layer[names[int(pairs[l, 1])]](h)))
    (expected_gate,) = torch.autograd.grad(F.cross_entropy(out, y, label_smoothing=0.1), g)
    assert expected_gate.abs().max() > 1e-4
    torch.testing.assert_close(gate_grad, expected_gate, rtol=1e-6, atol=1e-10)

    # The alpha gradient, written out with loops: sum_m dL/dg_m q_m (delta_am - q_a).
    from raydsnas.strategies.proxyless import binary_gate_alpha_grad

    alpha = s.alpha_matrix().double()
    got = binary_gate_alpha_grad(alpha, pairs, gate_grad)
    expected = torch.zeros_like(alpha)
    for l in range(SPACE.num_layers):
        i, j = int(pairs[l, 0]), int(pairs[l, 1])
        e = [float(torch.exp(alpha[l, i])), float(torch.exp(alpha[l, j]))]
        q = [e[0] / sum(e), e[1] / sum(e)]
        for a, col in enumerate((i, j)):
            expected[l, col] = sum(float(expected_gate[l, m]) * q[m] * ((a == m) - q[a])
                                   for m in range(2))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)

    # The update moves only the pair and keeps the unsampled candidates' probabilities.
    p_before = s.probs()
    s._apply_pair_update(pairs, got.float())
    p_after = s.probs()
    off_pair = torch.ones_like(p_before, dtype=torch.bool).scatter(1, pairs, False)
    torch.testing.assert_close(p_after[off_pair], p_before[off_pair], rtol=1e-5, atol=1e-7)
    assert (p_after - p_before).abs().max() > 1e-4


# -- SPOS and random search --------------------------------------------------------------------
SEARCH_SPACE = SearchSpace.cifar(10, width_mult=0.25, stage_repeats=(2, 2, 4, 2))


def toy_fitness(target, log):
    """Layers matching `target` (ties: fewer FLOPs), recording every evaluated arch."""
    def fitness(arch):
        log.append(list(arch))
        return sum(a == t for a, t in zip(arch, target)), -SEARCH_SPACE.flops(arch)
    return fitness


def test_evolution_search_respects_the_limit_is_deterministic_and_beats_random_search():
    from raydsnas.strategies.spos import evolution_search, random_search

    table = SEARCH_SPACE.flops_table()
    limit = (table.total(table.smallest()) + table.total(table.largest())) / 2
    gen = torch.Generator().manual_seed(11)
    target = None
    while target is None or SEARCH_SPACE.flops(target) > limit:
        target = torch.randint(4, (SEARCH_SPACE.num_layers,), generator=gen).tolist()
    settings = {"flops_limit": limit, "population": 20, "iterations": 10, "top_k": 5, "mutations": 10,
                    "crossovers": 10, "mutation_prob": 0.1, "seed": 3}
    log_a, log_b, log_r = [], [], []
    a = evolution_search(SEARCH_SPACE, toy_fitness(target, log_a), **settings)
    b = evolution_search(SEARCH_SPACE, toy_fitness(target, log_b), **settings)
    assert log_a == log_b and a.arch == b.arch  # deterministic for a seed
    assert len(log_a) == len({tuple(x) for x in log_a}) <= 20 * 10  # each arch scored once
    assert all(SEARCH_SPACE.flops(arch) <= limit for arch in log_a)
    assert SEARCH_SPACE.flops(a.arch) <= limit
    r = random_search(SEARCH_SPACE, toy_fitness(target, log_r), num_samples=len(log_a),
                      flops_limit=limit, seed=3)
    assert all(SEARCH_SPACE.flops(arch) <= limit for arch in log_r)
    assert len(log_r) == len(log_a)
    assert a.score[0] >= 9 and a.score[0] > r.score[0]  # 10 layers; random reaches ~6
    assert evolution_search(SEARCH_SPACE, toy_fitness(target, []), **{**settings, "seed": 4}
                            ).evaluated != a.evaluated


@pytest.mark.parametrize("name, phase", [("spos", "finetune"), ("random", "retrain")])
def test_one_shot_search_picks_under_the_limit_then_trains_the_child_alone(name, phase, tmp_path):
    table = SPACE.flops_table()
    limit = (table.total(table.smallest()) + table.total(table.largest())) / 2
    cfg = {**TRAIN, **{"spos": {"population": 4, "iterations": 2, "top_k": 2, "mutations": 2,
                                    "crossovers": 2}, "random": {"num_samples": 4}}[name]}
    s = build_strategy(name, SPACE, STRATEGIES[name].config(
        **cfg, bn_batches=2, flops_limit=limit, flops_max=limit * 1.1, final_phase=phase,
        final_epochs=1, selection_fraction=0.25))
    data = tiny_data(selection_fraction=0.25)
    assert s.extra_epochs == 1
    for epoch in range(2):
        for images, labels in data.train(epoch):
            s.step(images, labels)
    metrics = s.end_search(data, 2)
    assert all(SPACE.flops(e["arch"]) <= limit for e in s.search_log)
    assert metrics["search_evaluated"] == len(s.search_log) >= 4
    best = max(s.search_log, key=lambda e: (e["select_top1"], -e["select_loss"]))
    assert s.argmax_arch() == best["arch"] and metrics["search_flops"] <= limit
    # The final phase trains the chosen child only: the supernet holds one block per layer.
    assert all(len(layer) == 1 for layer in s.supernet.layers)
    before = {k: v.clone() for k, v in s.supernet.state_dict().items()}
    state = copy.deepcopy(s.state_dict())  # tensors, not references into the live modules
    for images, labels in data.train(2):
        assert s.step(images, labels).path == best["arch"]
    after = s.supernet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    resumed = build_strategy(name, SPACE, s.config)
    resumed.load_state_dict(state)
    for images, labels in data.train(2):
        resumed.step(images, labels)
    for k, v in s.supernet.state_dict().items():
        torch.testing.assert_close(resumed.supernet.state_dict()[k], v)
    x, _ = batch(7)
    loaded = load_child(save_child(s.export_child(), str(tmp_path / "c"), program=False))
    torch.testing.assert_close(loaded(x), s.predict(x), rtol=1e-5, atol=1e-6)


# -- configuration -----------------------------------------------------------------------------
def test_config_selects_the_strategy_and_names_foreign_or_bad_keys():
    from raydsnas.config import ConfigError, load_config

    job = load_config(None, ["search.strategy=spos", "search.flops_limit=2000000",
                             "search.final_phase=finetune", "search.final_epochs=2"])
    cfg = job.search.strategy_config(steps_per_epoch=3, lr=0.1)
    assert type(cfg).__name__ == "SPOSConfig" and cfg.population == 50 and cfg.final_epochs == 2
    # The embedded default's DSNAS keys (h, freeze_check_every) do not get in the way.
    assert type(load_config(None, ["search.strategy=snas"]).search.strategy_config(1, 0.1)
                ).__name__ == "SNASConfig"
    with pytest.raises(ConfigError, match=r"search.strategy = 'darts' is not allowed; expected "
                       r"one of \['dsnas', 'snas', 'proxyless', 'spos', 'random', 'fixed'\]"):
        load_config(None, ["search.strategy=darts"])
    with pytest.raises(ConfigError, match=r"key 'h' belongs to search.strategy \['dsnas'\], not "
                       r"to search.strategy = 'snas'"):
        load_config(None, ["search.strategy=snas", "search.h=0.2"])
    with pytest.raises(ConfigError, match=r"key 'tau_start' belongs to search.strategy \['snas'\]"):
        load_config(None, ["search.strategy=spos", "search.tau_start=1"])
    with pytest.raises(ConfigError, match=r"search.final_phase = 'again' is not allowed; expected "
                       r"one of \['none', 'finetune', 'retrain'\]"):
        load_config(None, ["search.strategy=spos", "search.final_phase=again"])
    with pytest.raises(ConfigError, match=r"search.tau_schedule = 'cosine' is not allowed"):
        load_config(None, ["search.strategy=snas", "search.tau_schedule=cosine"])
    with pytest.raises(ConfigError, match=r"search: unknown key\(s\) \['populaton'\]"):
        load_config(None, ["search.strategy=spos", "search.populaton=3"])


# -- end to end through Ray Train --------------------------------------------------------------
def ray_job_sets(storage, name: str, **extra) -> list[str]:
    sets = {
        "name": name, "storage": str(storage),
        "data.uri": "synthetic:4/128/32", "data.image_size": 16,
        "space.preset": "cifar", "space.input_size": 16, "space.width_mult": 0.25,
        "space.stage_repeats": "[1,1,1,1]",
        "search.epochs": 1, "search.global_batch_size": 16, "search.lr": 0.05,
        "search.lr_reference_batch": 16, "search.max_steps_per_epoch": 3,
        "search.warmup_epochs": 0, "search.bn_recalibration_batches": 1, "search.log_every": 100,
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 1, "scaling.max_failures": 0,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.mark.slow
def test_spos_with_finetune_on_two_workers_and_snas_run_through_ray_train(ray_local, tmp_path):
    from raydsnas.config import load_config
    from raydsnas.data.synthetic import SyntheticData
    from raydsnas.train.launcher import run_search
    from tests.test_search_job import final_state

    space = SearchSpace.cifar(4, width_mult=0.25, stage_repeats=(1, 1, 1, 1))
    space = SearchSpace.from_dict({**space.to_dict(), "input_size": 16})
    table = space.flops_table()
    limit = (table.total(table.smallest()) + table.total(table.largest())) // 2
    spos = run_search(load_config(None, ray_job_sets(tmp_path, "spos", **{
        "search.strategy": "spos", "search.population": 4, "search.iterations": 2,
        "search.top_k": 2, "search.mutations": 2, "search.crossovers": 2,
        "search.bn_batches": 1, "search.flops_limit": limit, "search.final_phase": "finetune",
        "search.final_epochs": 1, "scaling.num_workers": 2})))
    state = final_state(tmp_path / "spos")
    assert state["epoch"] == 2 and state["strategy"]["step"] == 6  # 1 search + 1 finetune epoch
    assert state["strategy"]["phase"] == "final"
    log = state["strategy"]["search_log"]
    assert len(log) >= 4 and all(space.flops(e["arch"]) <= limit for e in log)
    # Candidates were scored on the selection split, held out of training (both ranks' shards).
    held_out = SyntheticData.parse("synthetic:4/128/32", 16, 0, 0.1).num_select
    search = json.loads(state["history"])[0]
    assert search["search_split"] == "select" and search["search_select_samples"] == held_out
    assert search["search_select_top1"] == max(e["select_top1"] for e in log)
    meta = spos.record["meta"]
    assert (meta["strategy"], meta["search_epochs"], meta["epochs"]) == ("spos", 1, 2)
    child = load_child(spos.subnet_uri)
    assert child.arch == state["strategy"]["chosen"] and child.meta["flops"] <= limit
    assert child.meta["worker_hours"] > 0

    snas = run_search(load_config(None, ray_job_sets(tmp_path, "snas", **{
        "search.strategy": "snas", "search.epochs": 2, "search.alpha_lr": 0.05})))
    state = final_state(tmp_path / "snas")["strategy"]
    assert state["step"] == 6 and (state["alpha"] - 1).abs().max() > 0.02  # alpha moved
    child = load_child(snas.subnet_uri)
    assert child.arch == state["alpha"].argmax(-1).tolist() == snas.record["arch"]
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(child(x), load_child(snas.subnet_uri)(x))
