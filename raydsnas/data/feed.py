"""From host batches to the training device: normalisation, and on a GPU a copy that overlaps
compute.

`normalize` turns uint8 `[N, 3, H, W]` images into standardised floats on a device, with the
ImageNet mean and std kept there (made once per device and dtype: a `torch.tensor(...,
device="cuda")` is a blocking copy). `DeviceFeed` runs one batch ahead: on a GPU the next
batch is copied from pinned memory (or decoded, with `data.decode: gpu`) on a side stream
while the current one trains, so the host never waits for a copy and the device never waits
for the host's next batch. On the CPU it is the same code without streams.

Ray-free and import-light: the in-process users (`raydsnas.analysis`) import it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CONSTANTS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_shift(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) as `[1, 3, 1, 1]` tensors on `device`, made once."""
    key = (device, dtype)
    if key not in _CONSTANTS:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        _CONSTANTS[key] = ((1 / (255 * std)).to(device, dtype), (-mean / std).to(device, dtype))
    return _CONSTANTS[key]


def normalize(images: torch.Tensor, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> `dtype` on `device`, standardised with the ImageNet mean and std:
    (x / 255 - mean) / std per channel. The copy to the device moves uint8 (4x fewer bytes
    than float32); the arithmetic runs there."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"normalize expects uint8 images of shape [N, 3, H, W], got {images.dtype} "
            f"{tuple(images.shape)}")
    images = images.to(device=device, non_blocking=True)
    scale, shift = _scale_shift(images.device, dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = images.to(dtype, memory_format=memory_format)
    return out.mul_(scale).add_(shift)


Batch = dict[str, Any]
# An encoded batch -> {"image": uint8 [N, 3, S, S] on the device, "label": int64 [N]} (fewer
# rows if it leaves corrupt images out): `raydsnas.data.device_decode.DeviceDecoder`.
Decoder = Callable[[Batch], Batch]


class DeviceFeed:
    """Host batches (`{"image": uint8 [N, 3, H, W], "label": int64 [N]}`, or encoded batches a
    `decoder` turns into uint8 images on the device) -> (normalised images, labels) on
    `device`, prepared one batch ahead.

    On a GPU batch i+1 is copied (from pinned memory; a pageable source is pinned first) and
    normalised on a side stream while batch i trains; the training stream waits for that
    stream's event, not the host. The iterator pulls one host batch ahead of what it yields.
    """

    def __init__(self, device: torch.device, *, channels_last: bool = False,
                 decoder: Decoder | None = None, is_encoded: Callable[[Batch], bool] | None = None):
        self.device, self.channels_last = torch.device(device), channels_last
        self.decoder, self.is_encoded = decoder, is_encoded
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _host_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.cuda and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch on the device, on the current stream."""
        if self.is_encoded is not None and self.is_encoded(batch):
            if self.decoder is None:
                raise ValueError("an encoded batch (data.decode: gpu) needs a decoder")
            rows = len(batch["label"])
            batch = self.decoder(batch)
            images = batch["image"]
            if len(images) == 0:  # a zero-row loss is NaN, and the all-reduce would spread it
                raise ValueError(f"all {rows} images of a training batch were corrupt and "
                                 "skipped (data.skip_corrupt); check the shard set")
        else:
            images = self._host_to_device(batch["image"])
        labels = self._host_to_device(torch.as_tensor(batch["label"]))
        return normalize(images, self.device, channels_last=self.channels_last), labels

    def __call__(self, batches: Iterator[Batch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.cuda:
            for batch in batches:
                yield self.prepare(batch)
            return
        main = torch.cuda.current_stream(self.device)

        def ahead(batch: Batch):
            with torch.cuda.stream(self._stream):
                images, labels = self.prepare(batch)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            return images, labels, ready

        upcoming = None
        for batch in batches:
            current, upcoming = upcoming, ahead(batch)
            if current is not None:
                yield self._hand_over(current, main)
        if upcoming is not None:
            yield self._hand_over(upcoming, main)

    @staticmethod
    def _hand_over(item, main: torch.cuda.Stream) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, ready = item
        main.wait_event(ready)
        # Made on the side stream, used on the main one: the allocator must not hand their
        # memory out again before the main stream is done with them.
        images.record_stream(main)
        labels.record_stream(main)
        return images, labels
