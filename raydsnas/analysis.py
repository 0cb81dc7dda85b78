"""Ranking correlation between the search stage and the evaluation stage (DSNAS paper, Sec. 4.1
and Table 2): do architectures that score well with a supernet's shared weights also score well
when trained alone?

`kendall_tau(a, b)` is Kendall's tau-b (ties in either ranking handled; equal to
`scipy.stats.kendalltau`). `rank_architectures` scores each architecture twice: its "search"
top-1 with the supernet's weights (BN statistics recalibrated through its path first, as SPOS
does), and its "evaluation" top-1 after training the child alone from scratch for `epochs`.

Command line (in-process, no Ray, CPU is fine for small spaces):

    python -m raydsnas.analysis rank --checkpoint RUN_DIR_OR_STATE_PT \\
        --arch 0,1,2,3,... --arch ... [--archs FILE] [--epochs 5] [--data builtin:digits]

`--checkpoint` is a run folder (its latest registered checkpoint's `state.pt`) or a `state.pt`
file of any strategy. Frozen/pruned layers of that checkpoint (DSNAS early stop, SPOS final phase) must
keep their choice in every architecture. `--archs FILE` has one architecture a line (commas or
spaces; `#` starts a comment). `--data` is `builtin:digits` (scikit-learn's digits, the
built-in set's split, resized to the space's input size with bilinear interpolation: close to,
not bit-identical with, the Ray Data pipeline's PIL resize), `builtin:shapes` (the generated
set's pixels, exactly those of its PNGs at the native 16x16; resized like digits at other sizes)
or `synthetic:<classes>/<train>/<val>`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from raydsnas.data.tensors import TensorBatches
from raydsnas.evaluation import recalibrate_bn
from raydsnas.space import SearchSpace
from raydsnas.strategies.optim import warmup_cosine, weight_param_groups
from raydsnas.train.checkpoint import load_state, read_latest_state


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long score lists: (concordant - discordant) pairs over
    sqrt((pairs - ties in a) * (pairs - ties in b)). NaN when either list is constant."""
    if len(a) != len(b):
        raise ValueError(f"kendall_tau needs equally long lists, got {len(a)} and {len(b)}")
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                ties_a += 1
                ties_b += 1
            elif da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = len(a) * (len(a) - 1) // 2
    denominator = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return (concordant - discordant) / denominator if denominator > 0 else float("nan")


@dataclass
class RankRow:
    arch: list[int]
    flops: int
    search_top1: float
    eval_top1: float


def load_supernet(checkpoint: str | Path, device: str = "cpu"):
    """(space, supernet) from a run folder or a `state.pt`: the supernet pruned as the
    checkpoint's was, with its weights."""
    path = Path(checkpoint)
    if path.is_dir():  # a run folder: its latest registered checkpoint
        state = read_latest_state(pafs.LocalFileSystem(), str(path.resolve()), where=str(path))
    else:
        state = load_state(path)
    state = state.get("strategy", state)
    space = SearchSpace.from_dict(state["space"])
    supernet = space.supernet()
    supernet.fixed = {}  # layer -> the only candidate the checkpoint kept
    for l in range(space.num_layers):
        present = {key.split(".")[2] for key in state["supernet"]
                   if key.startswith(f"layers.{l}.")}
        if len(present) == 1 and space.num_choices > 1:
            supernet.fixed[l] = space.choices.index(present.pop())
            supernet.prune(l, supernet.fixed[l])
    supernet.load_state_dict(state["supernet"])
    return space, supernet.to(device)


def load_data(uri: str, image_size: int, batch_size: int) -> TensorBatches:
    """A built-in or synthetic set (`in_memory_splits`) as normalised tensors at `image_size`."""
    from raydsnas.data.sources import in_memory_splits

    (train_images, train_labels), (val_images, val_labels) = in_memory_splits(
        uri, image_size, name="--data")
    return TensorBatches((_resized_rgb(train_images, image_size), train_labels),
                         (_resized_rgb(val_images, image_size), val_labels), batch_size)


def _resized_rgb(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> normalised float [N, 3, S, S]; bilinear resize only if H, W != S."""
    from raydsnas.data.feed import normalize

    if pixels.shape[-2:] != (image_size, image_size):
        pixels = F.interpolate(pixels.float(), size=(image_size, image_size), mode="bilinear",
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return normalize(pixels.contiguous())


def search_score(supernet, arch: list[int], data: TensorBatches, bn_batches: int) -> float:
    """Top-1 of `arch` with the supernet's weights, BN recalibrated through its path."""
    if bn_batches:
        recalibrate_bn(supernet, (x for x, _ in data.train(0, limit=bn_batches)),
                       forward=lambda x: supernet(x, arch))
    supernet.eval()
    return data.evaluate(lambda x: supernet(x, arch))["val_top1"]


def evaluation_score(space: SearchSpace, arch: list[int], data: TensorBatches, epochs: int,
                     lr: float = 0.1, seed: int = 0) -> float:
    """Top-1 of `arch` trained alone from scratch for `epochs` (SGD momentum 0.9, weight decay
    4e-5 off BN, cosine schedule, label smoothing 0.1: the search's recipe)."""
    torch.manual_seed(seed)
    child = space.child(arch)
    opt = torch.optim.SGD(weight_param_groups(child, 4e-5), lr=lr, momentum=0.9)
    steps = max(1, epochs * data.steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 0))
    for epoch in range(epochs):
        child.train()
        for images, labels in data.train(epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(child(images), labels, label_smoothing=0.1).backward()
            opt.step()
            schedule.step()
    child.eval()
    return data.evaluate(child)["val_top1"]


def rank_architectures(space: SearchSpace, supernet, archs: Sequence[Sequence[int]],
                       data: TensorBatches, epochs: int, bn_batches: int = 8,
                       lr: float = 0.1, seed: int = 0) -> list[RankRow]:
    """Search and evaluation top-1 of every architecture."""
    fixed = getattr(supernet, "fixed", {})
    rows = []
    for arch in archs:
        arch = space.validate_arch(arch)
        clash = {l: k for l, k in fixed.items() if arch[l] != k}
        if clash:
            raise ValueError(f"arch {arch} changes layers the checkpoint pruned "
                             f"(layer: kept choice) {clash}")
        rows.append(RankRow(arch, space.flops(arch), search_score(supernet, arch, data, bn_batches),
                            evaluation_score(space, arch, data, epochs, lr, seed)))
    return rows


def format_table(rows: Sequence[RankRow]) -> str:
    """One line per architecture (arch, MFLOPs, both top-1s), then Kendall's tau."""
    width = max(4, *(len(_arch_text(r.arch)) for r in rows))
    lines = [f"{'arch':<{width}}  {'MFLOPs':>8}  {'search_top1':>11}  {'eval_top1':>9}"]
    for r in rows:
        lines.append(f"{_arch_text(r.arch):<{width}}  {r.flops / 1e6:>8.3f}  "
                     f"{r.search_top1:>11.4f}  {r.eval_top1:>9.4f}")
    tau = kendall_tau([r.search_top1 for r in rows], [r.eval_top1 for r in rows])
    lines.append(f"kendall_tau {tau:.4f} over {len(rows)} architectures")
    return "\n".join(lines)


def _arch_text(arch: Sequence[int]) -> str:
    return ",".join(map(str, arch))


def parse_arch(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"architecture {text!r} is not a list of choice indices "
                         "(e.g. 0,1,3,2)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydsnas.analysis")
    commands = parser.add_subparsers(dest="command", required=True)
    rank = commands.add_parser("rank", help="search-vs-evaluation ranking correlation")
    rank.add_argument("--checkpoint", required=True, help="run folder or state.pt")
    rank.add_argument("--arch", action="append", default=[], help="choice indices, e.g. 0,1,3")
    rank.add_argument("--archs", help="file with one architecture a line")
    rank.add_argument("--epochs", type=int, default=5, help="epochs of training each child alone")
    rank.add_argument("--data", default="builtin:digits")
    rank.add_argument("--batch-size", type=int, default=64)
    rank.add_argument("--bn-batches", type=int, default=8)
    rank.add_argument("--lr", type=float, default=0.1)
    rank.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        texts = list(args.arch)
        if args.archs:
            for line in Path(args.archs).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    texts.append(line)
        archs = [parse_arch(t) for t in texts]
        if len(archs) < 2:
            raise ValueError("rank needs at least two architectures (--arch or --archs)")
        space, supernet = load_supernet(args.checkpoint)
        data = load_data(args.data, space.input_size, args.batch_size)
        rows = rank_architectures(space, supernet, archs, data, args.epochs, args.bn_batches,
                                  args.lr, args.seed)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
