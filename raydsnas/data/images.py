"""Image bytes -> uint8 CHW tensors, and the two crops (training and validation) on tensors.

Ray-free: the Ray Data decode step (`raydsnas.data.pipeline`) and the device decoder
(`raydsnas.data.device_decode`) both use it, so a crop drawn on the host means the same pixels
whichever of them applies it.

JPEGs decode with libjpeg-turbo through `torchvision.io.decode_jpeg` (grayscale and CMYK come
out as RGB); anything it refuses (PNG, damaged files) goes to PIL, which either decodes it or
raises one of `DECODE_ERRORS`, with the message the error reports carry. Resizing is torch's
antialiased bilinear filter (a port of PIL's): against the previous PIL-only path, see
`resized_crop`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

# What PIL raises for a file that is not an image or is damaged.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
JPEG_SIGNATURE = b"\xff\xd8"

Box = tuple[int, int, int, int]  # left, top, right, bottom: PIL's crop box


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_SIGNATURE


def as_byte_tensor(data: bytes) -> torch.Tensor:
    """The encoded bytes as a uint8 CPU tensor (a copy: torch refuses read-only buffers)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode an image file's bytes to uint8 [3, H, W] on the CPU. Raises one of
    `DECODE_ERRORS` (PIL's) for bytes that neither libjpeg-turbo nor PIL can decode."""
    if is_jpeg(data):
        try:
            return decode_jpeg(as_byte_tensor(data), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL decides: it decodes what libjpeg-turbo refused, or says why not
    return pil_decode_rgb(data)


def pil_decode_rgb(data: bytes) -> torch.Tensor:
    """`decode_rgb` through PIL only (PNG, and JPEGs libjpeg-turbo refuses)."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("RGB") if image.mode != "RGB" else image
    image.load()
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def undecodable_reason(error: BaseException) -> str:
    """The reason a `CorruptImageError` and the skipped-image record give for `error`."""
    return f"cannot decode the image: {type(error).__name__}: {error}"


def image_header(data: bytes) -> tuple[int, int, bool]:
    """(width, height, plain_jpeg) from the file's header alone (PIL reads no pixels for
    this); `plain_jpeg`: an RGB or grayscale JPEG (what nvJPEG decodes; not CMYK, not PNG).
    Raises one of `DECODE_ERRORS` for bytes that are no image; damage past the header shows
    only when the pixels are decoded."""
    with Image.open(io.BytesIO(data)) as image:
        return (*image.size, image.format == "JPEG" and image.mode in ("RGB", "L"))


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, height, width], antialiased bilinear, on `image`'s device.

    On the CPU this is torch's uint8 kernel (channels-last, integer arithmetic, ported from
    PIL); elsewhere the float kernel, rounded: the two differ by at most 1."""
    if image.shape[-2:] == (height, width):
        return image
    batch = image.unsqueeze(0)
    if image.device.type == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(batch, size=(height, width), mode="bilinear", antialias=True)
    else:
        out = F.interpolate(batch.float(), size=(height, width), mode="bilinear",
                            antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    return out[0]


def resized_crop(image: torch.Tensor, box: Box, size: int, flip: bool = False) -> torch.Tensor:
    """The `box` region of uint8 [3, H, W], resized to [3, size, size], mirrored if `flip`.

    Against the old PIL path (`image.resize((size, size), BILINEAR, box=box)`): PIL's filter
    may reach past the box into the rest of the image, this one stops at the box edge, so
    the outermost output rows and columns differ by up to ~10 levels; the inner pixels
    differ by at most 1 (tests/data/test_decode.py)."""
    left, top, right, bottom = box
    out = resize(image[:, top:bottom, left:right], size, size)
    return out.flip(-1) if flip else out


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop (10 tries, then a centre crop) + horizontal flip, drawn
    from a given generator so that a sample's augmentation is a function of (seed, epoch, key)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        box, flip = self.draw(image.shape[-1], image.shape[-2], rng)
        return resized_crop(image, box, self.size, flip)

    def draw(self, width: int, height: int, rng: np.random.Generator) -> tuple[Box, bool]:
        """The crop box and the flip of one image, in that order from `rng`."""
        box = self.crop_box(width, height, rng)
        return box, self.hflip and bool(rng.random() < 0.5)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> Box:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Validation: shorter side to round(size / crop_ratio), then the central size x size."""

    size: int
    crop_ratio: float

    def __call__(self, image: torch.Tensor, rng: np.random.Generator | None = None
                 ) -> torch.Tensor:
        (width, height), box = self.plan(image.shape[-1], image.shape[-2])
        left, top, right, bottom = box
        return resize(image, height, width)[:, top:bottom, left:right]

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], Box]:
        """The (width, height) an image of this size is resized to, and the box then cut."""
        short = round(self.size / self.crop_ratio)
        if min(width, height) != short:
            if width <= height:
                width, height = short, int(short * height / width)
            else:
                width, height = int(short * width / height), short
        left = round((width - self.size) / 2)
        top = round((height - self.size) / 2)
        return (width, height), (left, top, left + self.size, top + self.size)
