"""Built-in data sets: small real image sets that ship inside a package we already depend on,
turned into a shard set in the local cache on first use by the same writer as ImageNet, and read
back by the same `read_parquet` + decode path.

`builtin:digits` -- scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1797
images, 8x8, 10 classes "0".."9"). Each image is stored as an 8-bit grayscale PNG with pixel
value round(v * 255 / 16) (the originals are 0..16) and decoded to 3 identical channels like every
image. Fixed split by position in `load_digits()`: train = samples 0..1499 (1500 images),
val = samples 1500..1796 (297 images). Keys are "<digit>/<position:04d>.png";
`digits_arrays(split)` gives the pixels in memory. Upscale it (e.g. `image_size: 32`) and prefer
mild crops (`crop_scale: [0.5, 1.0]`) and no flips (`hflip: false`).

`builtin:shapes` -- a procedurally generated set, larger and harder than digits and needing no
download: 16x16 RGB PNGs, 24 classes = 8 shape kinds (disc, ring, square, frame, triangle, cross,
bars, star) x 3 fill styles (solid, striped, checked), folders "<kind>-<style>" (e.g.
"disc-solid"). Train = images 0..11999 (500 a class), val = images 12000..14399 (100 a class);
image i is of class SHAPES_CLASSES[i % 24] (the sorted class names) with key
"<class>/<i:05d>.png". Each image is drawn by numpy alone from
`default_rng(SeedSequence([SHAPES_SEED=1, split (train 0, val 1), i]))`, so the splits come from
disjoint seeds and are the same on every run; PIL only encodes the PNGs. What is drawn, none of it
depending on the class: a background of random colour with a gradient and a smooth texture, up to
one distractor (a thin stroke or a small blob of any colour), the shape (half-size 5..7.5 pixels,
anywhere it stays mostly inside, rotated by up to 25 degrees either way, anti-aliased by 4x4
supersampling), whose stripes or checks (period 3.5..4.5 pixels) follow its own axes, and
Gaussian pixel noise (sigma 2..6). Colours are a luminance plus a random chroma offset; the shape
differs from the background by at least 90 in luminance, its second pattern colour by at least 70
from both (halved in the rare draws where no luminance in 20..235 is that far from both). The
knobs are in SHAPES_DIFFICULTY; a change of any of them or of the drawing changes the set, so it
must bump the set's cache version in BUILTIN_SETS (now 1). The drawing is floating-point numpy
(trigonometry, bilinear texture): the bytes are the same on every run and machine of the same
numpy build; another build could in principle move a pixel by one level. Use it at its native
`image_size: 16`; it is sized to resolve a 0.5-point difference in top-1 (one val image is 0.04
points). `shapes_arrays(split)` gives the pixels in memory, exactly those of the PNGs.

Cache: `$RAYDSNAS_CACHE/builtin/<name>-v<version>/`, else `$XDG_CACHE_HOME/raydsnas/...`, else
`~/.cache/raydsnas/...`. It is built in a temporary folder and renamed into place, so concurrent
first uses never see half a set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN_PREFIX = "builtin:"
DIGITS_TRAIN_SAMPLES = 1500
DIGITS_SHARD_SIZE = 250

SHAPES_SEED = 1
SHAPES_SIZE = 16
SHAPES_SHARD_SIZE = 1000
SHAPES_KINDS = ("disc", "ring", "square", "frame", "triangle", "cross", "bars", "star")
SHAPES_STYLES = ("solid", "striped", "checked")
# Sorted, as the shard writer numbers the class folders; image i of the whole set is class i % 24.
SHAPES_CLASSES = tuple(sorted(f"{kind}-{style}" for kind in SHAPES_KINDS
                             for style in SHAPES_STYLES))
# split -> (its number in the seeds, index of its first image, images)
SHAPES_SPLITS = {"train": (0, 0, 12_000), "val": (1, 12_000, 2_400)}


def cache_root() -> Path:
    """The raydsnas cache folder (see the module docstring)."""
    if os.environ.get("RAYDSNAS_CACHE"):
        return Path(os.environ["RAYDSNAS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "raydsnas"


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 [N, 8, 8] grayscale, the pixels its PNGs hold) and labels (int64 [N])
    of a split of `builtin:digits`, in position order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    part = slice(None, DIGITS_TRAIN_SAMPLES) if split == "train" else \
        slice(DIGITS_TRAIN_SAMPLES, None)
    pixels = np.round(digits.images[part] * (255 / 16)).astype(np.uint8)
    return pixels, digits.target[part].astype(np.int64)


def write_digits_folders(train_dir: Path, val_dir: Path) -> None:
    """Write scikit-learn's digits as PNG files in ImageNet-style folders <dir>/<digit>/<i>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for position, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = (train_dir if position < DIGITS_TRAIN_SAMPLES else val_dir) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{position:04d}.png")


# -- builtin:shapes ------------------------------------------------------------------------------
# What makes the set hard, tuned so that a child network of the laptop space trained alone for 8
# epochs is far from saturated (see the README): colour spreads and luminance gaps, distractors
# behind and in front of the shape (at most), the shape's half-size and rotation range, pixel noise.
SHAPES_DIFFICULTY = {
    "chroma": 40.0, "texture": 8.0, "gradient": 30.0,
    "fg_gap": 90.0, "fg2_gap": 70.0, "bg2_gap": 70.0,
    "behind": 1, "in_front": 0, "scale": (5.0, 7.5), "rotation": 25.0, "noise": (2.0, 6.0),
}
_SUPERSAMPLE = 4  # shapes are drawn on a 4x finer grid and averaged down: anti-aliased edges
_FINE = (np.arange(SHAPES_SIZE * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE  # fine pixel centres
_FINE_Y, _FINE_X = np.meshgrid(_FINE, _FINE, indexing="ij")
_PIXEL = np.arange(SHAPES_SIZE) + 0.5
_PIXEL_Y, _PIXEL_X = np.meshgrid(_PIXEL, _PIXEL, indexing="ij")
# Bilinear weights that spread a 5x5 grid of random values over the image (background texture).
_TEXTURE_UP = np.clip(1 - np.abs(_PIXEL[:, None] * 4 / SHAPES_SIZE - np.arange(5)[None, :]), 0, 1)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a shape of unit size in its own frame (u, v)."""
    radius, box = np.hypot(u, v), np.maximum(np.abs(u), np.abs(v))
    if kind == "disc":
        return radius <= 1.0
    if kind == "ring":
        return (radius <= 1.0) & (radius >= 0.5)
    if kind == "square":
        return box <= 0.85
    if kind == "frame":
        return (box <= 0.9) & (box >= 0.45)
    if kind == "triangle":  # equilateral, circumradius 1.1: inside the three edges' half-planes
        normals = np.deg2rad([270.0, 30.0, 150.0])
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.55 for a in normals], axis=0)
    if kind == "cross":
        return (((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95))
                | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)))
    if kind == "bars":
        return (np.abs(u) <= 0.9) & (np.abs(v) >= 0.25) & (np.abs(v) <= 0.75)
    if kind == "star":  # five points: the radius runs from 0.45 between points to 1.1 at them
        phase = np.arctan2(v, u) * 5 / (2 * np.pi) % 1.0
        return radius <= 0.45 + 0.65 * np.abs(2 * phase - 1)
    raise ValueError(f"unknown shape kind {kind!r}")


def _colour(rng: np.random.Generator, luminance: float) -> np.ndarray:
    """A random RGB colour of mean `luminance`: grey plus a random zero-mean chroma offset."""
    chroma = rng.normal(0, SHAPES_DIFFICULTY["chroma"], 3)
    return luminance + chroma - chroma.mean()


def _luminance(rng: np.random.Generator, away_from: list[tuple[float, float]]) -> float:
    """A uniform luminance in [20, 235] at least `gap` from each (luminance, gap) of `away_from`
    (drawn from the allowed intervals directly; where none is left, the gaps are halved)."""
    allowed = [(20.0, 235.0)]
    for other, gap in away_from:
        allowed = [piece for low, high in allowed
                   for piece in ((low, min(high, other - gap)), (max(low, other + gap), high))
                   if piece[1] > piece[0]]
    if not allowed:
        return _luminance(rng, [(other, gap / 2) for other, gap in away_from])
    lengths = np.array([high - low for low, high in allowed])
    offset = rng.uniform(0, lengths.sum())
    for (low, _), length in zip(allowed, lengths, strict=True):
        if offset <= length:
            return low + offset
        offset -= length
    return allowed[-1][1]


def _shapes_image(rng: np.random.Generator, kind: str, style: str) -> np.ndarray:
    """One uint8 [16, 16, 3] image of `kind` in `style`; everything else is drawn from `rng`."""
    size = SHAPES_SIZE
    k = SHAPES_DIFFICULTY
    # Background: a colour, a gradient in a random direction and a smooth random texture.
    bg_luminance = rng.uniform(20, 235)
    base = _colour(rng, bg_luminance)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((_PIXEL_X - size / 2) * np.cos(angle) + (_PIXEL_Y - size / 2) * np.sin(angle)) / size
    grid = rng.normal(0, k["texture"], (5, 5, 3))
    texture = (_TEXTURE_UP @ grid.transpose(2, 0, 1) @ _TEXTURE_UP.T).transpose(1, 2, 0)
    image = base + ramp[..., None] * rng.normal(0, k["gradient"], 3) + texture

    # Colours never depend on the class; the shape stands out from the background by luminance.
    fg_luminance = _luminance(rng, [(bg_luminance, k["fg_gap"])])
    fg = _colour(rng, fg_luminance)
    fg2_luminance = _luminance(rng, [(fg_luminance, k["fg2_gap"]), (bg_luminance, k["bg2_gap"])])
    fg2 = _colour(rng, fg2_luminance)

    def paint(mask: np.ndarray, fill: np.ndarray) -> None:
        """Blend `fill` (a colour, or colours on the fine grid) over `image` where `mask` is."""
        fine = mask[..., None] * np.broadcast_to(fill, mask.shape + (3,))
        blocks = (size, _SUPERSAMPLE, size, _SUPERSAMPLE)
        coverage = mask.reshape(blocks).mean(axis=(1, 3))[..., None]
        image[:] = image * (1 - coverage) + fine.reshape(blocks + (3,)).mean(axis=(1, 3))

    def clutter() -> None:
        """A thin stroke or a small blob of a random colour anywhere."""
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            (x0, y0), (x1, y1) = rng.uniform(0, size, (2, 2))
            length = max(np.hypot(x1 - x0, y1 - y0), 1e-6)
            along = ((_FINE_X - x0) * (x1 - x0) + (_FINE_Y - y0) * (y1 - y0)) / length
            across = ((_FINE_X - x0) * (y1 - y0) - (_FINE_Y - y0) * (x1 - x0)) / length
            width = rng.uniform(0.4, 0.9)
            paint((along >= 0) & (along <= length) & (np.abs(across) <= width / 2), colour)
        else:
            x, y = rng.uniform(0, size, 2)
            paint(np.hypot(_FINE_X - x, _FINE_Y - y) <= rng.uniform(0.7, 1.6), colour)

    behind, in_front = rng.integers(0, k["behind"] + 1), rng.integers(0, k["in_front"] + 1)
    for _ in range(behind):
        clutter()

    # The shape: random scale (half-size in pixels), position, rotation.
    scale = rng.uniform(*k["scale"])
    cx, cy = rng.uniform(scale * 0.8, size - scale * 0.8, 2)
    theta = np.deg2rad(rng.uniform(-k["rotation"], k["rotation"]))
    dx, dy = (_FINE_X - cx) / scale, (_FINE_Y - cy) / scale
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    mask = _shape_mask(kind, u, v)
    if style == "solid":
        fill = fg
    else:
        # The pattern runs along the shape's own axes, period 3.5..4.5 pixels, random phase.
        period, phase = rng.uniform(3.5, 4.5), rng.uniform(0, 1, 2)
        s, t = u * scale / period, v * scale / period
        if style == "striped":
            second = (s + phase[0]) % 1.0 < 0.5
        elif style == "checked":
            second = ((s + phase[0]) % 1.0 < 0.5) ^ ((t + phase[1]) % 1.0 < 0.5)
        else:
            raise ValueError(f"unknown shape style {style!r}")
        fill = np.where(second[..., None], fg2, fg)
    paint(mask, fill)

    for _ in range(in_front):
        clutter()
    image += rng.normal(0, rng.uniform(*k["noise"]), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def shapes_image(split: str, index: int, seed: int = SHAPES_SEED) -> np.ndarray:
    """Image `index` (numbered over the whole set, as in its key) of `builtin:shapes`: uint8
    [16, 16, 3] of class SHAPES_CLASSES[index % 24], drawn from
    SeedSequence([seed, split number, index])."""
    number, first, count = SHAPES_SPLITS[split]
    if not first <= index < first + count:
        raise IndexError(f"{split} images are numbered {first}..{first + count - 1}, not {index}")
    kind, style = SHAPES_CLASSES[index % len(SHAPES_CLASSES)].split("-")
    return _shapes_image(np.random.default_rng(np.random.SeedSequence([seed, number, index])),
                         kind, style)


def shapes_arrays(split: str, seed: int = SHAPES_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 [N, 16, 16, 3]) and labels (int64 [N], indices into SHAPES_CLASSES) of
    a split of `builtin:shapes`, in the order of `shapes_keys`."""
    _, first, count = SHAPES_SPLITS[split]
    indices = range(first, first + count)
    images = np.stack([shapes_image(split, i, seed) for i in indices])
    return images, np.array(indices, dtype=np.int64) % len(SHAPES_CLASSES)


def shapes_keys(split: str) -> list[str]:
    """The keys "<class>/<index:05d>.png" of a split, in the order of `shapes_arrays`."""
    _, first, count = SHAPES_SPLITS[split]
    return [f"{SHAPES_CLASSES[i % len(SHAPES_CLASSES)]}/{i:05d}.png"
            for i in range(first, first + count)]


def write_shapes_folders(train_dir: Path, val_dir: Path) -> None:
    """Write `builtin:shapes` as RGB PNG files in ImageNet-style folders <dir>/<class>/<i>.png."""
    for split, root in (("train", train_dir), ("val", val_dir)):
        images, _ = shapes_arrays(split)
        for name in sorted({key.split("/")[0] for key in shapes_keys(split)}):
            (root / name).mkdir(parents=True, exist_ok=True)
        for image, key in zip(images, shapes_keys(split), strict=True):
            Image.fromarray(image).save(root / key)


# -- building a set ------------------------------------------------------------------------------
def _shard_folders(work_dir: Path, shard_dir: Path, shard_size: int) -> None:
    from raydsnas.data.writer import write_shards

    write_shards(
        str(work_dir / "train"),
        str(shard_dir),
        val_src=str(work_dir / "val"),
        shard_size=shard_size,
        seed=0,
        use_ray=False,  # small files: faster here, and the cache is on this node anyway
    )


def _build_digits(shard_dir: Path, work_dir: Path) -> None:
    write_digits_folders(work_dir / "train", work_dir / "val")
    _shard_folders(work_dir, shard_dir, DIGITS_SHARD_SIZE)


def _build_shapes(shard_dir: Path, work_dir: Path) -> None:
    write_shapes_folders(work_dir / "train", work_dir / "val")
    _shard_folders(work_dir, shard_dir, SHAPES_SHARD_SIZE)


# name -> (format version of the built set, builder(shard_dir, scratch_dir))
BUILTIN_SETS: dict[str, tuple[int, Callable[[Path, Path], None]]] = {
    "digits": (1, _build_digits),
    "shapes": (1, _build_shapes),
}


def builtin_shard_set(name: str) -> str:
    """The local path of the shard set of `builtin:<name>`, built on first use."""
    version, build = BUILTIN_SETS[name]
    target = cache_root() / "builtin" / f"{name}-v{version}"
    if (target / "_manifest.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(scratch / "shards", scratch / "images")
        try:
            os.rename(scratch / "shards", target)
        except OSError:
            # Another process finished first; its set is identical, keep it.
            if not (target / "_manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(target)
