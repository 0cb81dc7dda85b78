"""A short DSNAS search on a small synthetic task, end to end on CPU: the loss falls, the
architecture distribution sharpens, layers freeze, and the exported child is accurate."""

import pytest
import torch

from raydsnas import DSNAS, DSNASConfig, SearchSpace, load_child, save_child
from raydsnas.evaluation import evaluate, recalibrate_bn


def pattern_task(n: int, seed: int):
    """Class k = which of 4 fixed random 16x16 colour patterns is hidden in Gaussian noise."""
    patterns = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    return patterns[labels] + 1.5 * torch.randn(n, 3, 16, 16, generator=g), labels


@pytest.mark.slow
def test_short_search_learns_sharpens_freezes_and_exports(tmp_path):
    torch.set_num_threads(2)
    space = SearchSpace(num_classes=4, input_size=16, width_mult=0.25,
                        stage_repeats=(1, 2, 2, 1), stem_stride=1, dropout=0.0)
    steps_per_epoch, batch = 20, 32
    # A fast alpha and a low h so that layers settle within this short run (then the run
    # is plain training of the chosen child, which a single-path supernet alone learns slowly).
    d = DSNAS(space, DSNASConfig(lr=0.05, alpha_lr=0.1, epochs=10, steps_per_epoch=steps_per_epoch,
                                 warmup_epochs=0.5, h=0.1, freeze_check_every=10, seed=3))
    images, labels = pattern_task(steps_per_epoch * batch, seed=0)
    start_entropy = d.entropy()
    losses = []
    for epoch in range(10):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            losses.append(float(d.step(images[idx], labels[idx]).loss))

    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    assert d.entropy() < start_entropy - 0.1
    assert len(d.frozen) >= 1

    child = d.export_child()
    recalibrate_bn(child, [images[i:i + 64] for i in range(0, 256, 64)])
    uri = save_child(child, str(tmp_path / "subnet"), program=False)
    val_images, val_labels = pattern_task(256, seed=1)
    acc = evaluate(load_child(uri), [(val_images, val_labels)])
    assert acc.top1 > 0.9
