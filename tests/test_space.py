"""The search space: shapes, the FLOPs/params tables against the paper's figures and against an
independent count on the built module, and what the supernet runs."""

import random

import pytest
import torch
from torch import nn

from raydsnas import SearchSpace
from raydsnas.space import ChoiceBlock

PAPER_DSNAS_ARCH = [0, 0, 3, 0, 3, 2, 0, 0, 3, 3, 2, 3, 3, 3, 2, 0, 0, 3, 3, 0]


def tiny_space(**overrides) -> SearchSpace:
    kwargs = dict(num_classes=5, input_size=16, width_mult=0.25, stage_repeats=(1, 2, 2, 1),
                  stem_stride=1, dropout=0.0)
    kwargs.update(overrides)
    return SearchSpace(**kwargs)


def hooked_cost(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of convs and linears, counted from the shapes seen in a real forward pass."""
    total = 0

    def conv_hook(m, inputs, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += out[0].numel() * (m.in_channels // m.groups) * k

    def linear_hook(m, inputs, out):
        nonlocal total
        total += m.in_features * m.out_features

    handles = [m.register_forward_hook(conv_hook) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(linear_hook) for m in model.modules()
                if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


def test_imagenet_flops_table_matches_reference_figures():
    space = SearchSpace.imagenet()
    assert (space.num_layers, space.num_choices) == (20, 4)
    assert space.choice_names == ("choice_3", "choice_5", "choice_7", "choice_x")
    table = space.flops_table()
    mflops = lambda row: [round(f / 1e6, 2) for f in row]
    assert mflops(table.per_layer[0]) == [13.40, 15.81, 19.42, 13.15]
    for layer in (17, 18, 19):  # stage 4, stride 1
        assert mflops(table.per_layer[layer]) == [10.18, 10.43, 10.80, 15.48]
    assert 322e6 < space.flops(PAPER_DSNAS_ARCH) < 325e6
    assert 269e6 < table.total(table.smallest()) < 272e6
    assert 397e6 < table.total(table.largest()) < 400e6


def test_imagenet_flops_and_params_equal_an_independent_count_on_the_child():
    space = SearchSpace.imagenet()
    child = space.child(PAPER_DSNAS_ARCH)
    assert hooked_cost(child, torch.zeros(1, 3, 224, 224)) == space.flops(PAPER_DSNAS_ARCH)
    assert sum(p.numel() for p in child.parameters()) == space.params(PAPER_DSNAS_ARCH)


@pytest.mark.parametrize("space", [
    tiny_space(),
    tiny_space(input_size=28, stem_stride=2, num_classes=3),
    SearchSpace.cifar(num_classes=10, width_mult=0.5, stage_repeats=(1, 1, 2, 1)),
], ids=["tiny16", "tiny28-stem2", "cifar-half"])
def test_flops_and_params_tables_match_the_built_child_for_random_archs(space):
    rng = random.Random(0)
    x = torch.zeros(2, 3, space.input_size, space.input_size)
    for _ in range(4):
        arch = [rng.randrange(space.num_choices) for _ in range(space.num_layers)]
        child = space.child(arch)
        assert hooked_cost(child, x[:1]) == space.flops(arch)
        assert sum(p.numel() for p in child.parameters()) == space.params(arch)
        assert child(x).shape == (2, space.num_classes)


def test_supernet_holds_every_candidate_and_its_parameter_count_adds_up():
    space = tiny_space()
    net = space.supernet()
    params = space.params_table()
    expected = params.fixed + sum(sum(row) for row in params.per_layer)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert all(list(layer.keys()) == list(space.choice_names) for layer in net.layers)


def test_supernet_forward_runs_only_the_given_path():
    space = tiny_space()
    net = space.supernet()
    calls = []
    for l, layer in enumerate(net.layers):
        for name, block in layer.items():
            block.register_forward_hook(lambda m, i, o, l=l, name=name: calls.append((l, name)))
    path = [3, 0, 2, 1, 0, 3]
    net(torch.randn(2, 3, 16, 16), path)
    assert calls == [(l, space.choice_names[k]) for l, k in enumerate(path)]


def test_child_has_only_the_chosen_blocks_and_reproduces_the_supernet_path():
    space = tiny_space()
    net = space.supernet().eval()
    arch = [1, 3, 0, 2, 3, 1]
    child = net.extract_child(arch).eval()
    assert [b.name for b in child.blocks] == space.arch_names(arch)
    assert all(isinstance(b, ChoiceBlock) for b in child.blocks)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(child(x), net(x, arch))


def test_stride_two_blocks_halve_resolution_and_stride_one_blocks_keep_channels():
    space = SearchSpace.cifar(num_classes=10, width_mult=0.25)
    child = space.child([0] * space.num_layers)
    x = child.stem(torch.zeros(1, 3, 32, 32))
    sizes = []
    for block in child.blocks:
        x = block(x)
        sizes.append((x.shape[1], x.shape[2]))
    stage_c = space.stage_c
    assert sizes[0] == (stage_c[0], 16) and sizes[3] == (stage_c[0], 16)
    assert sizes[4] == (stage_c[1], 8) and sizes[8] == (stage_c[2], 4) and sizes[-1] == (stage_c[3], 2)


@pytest.mark.parametrize("kwargs, key", [
    (dict(stem_stride=3), "stem_stride"),
    (dict(width_mult=0), "width_mult"),
    (dict(stage_repeats=(4, 4)), "stage_channels"),
    (dict(choices=("choice_3", "choice_9")), "choices"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_space_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"space.{key}"):
        SearchSpace(**kwargs)


def test_bad_arch_is_rejected_with_its_layer():
    space = tiny_space()
    with pytest.raises(ValueError, match="6 layers"):
        space.flops([0, 0])
    with pytest.raises(ValueError, match=r"\(2, 7\)"):
        space.child([0, 0, 7, 0, 0, 0])


def test_space_round_trips_through_a_dict():
    space = SearchSpace.cifar(num_classes=7, width_mult=0.5)
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ValueError, match="unknown key"):
        SearchSpace.from_dict({**space.to_dict(), "depth": 3})
