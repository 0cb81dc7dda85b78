"""`data.decode: gpu`: training images decoded and cropped on the training device.

The Ray Data tasks then only read each JPEG's header and draw the crop box and flip from the
seeded generator, exactly as the CPU decode step does (`raydsnas.data.pipeline.decode_batch`);
`iter_train_batches` delivers the encoded batch (`raydsnas.data.pipeline.EncodedBatch`):

    {"encoded": [uint8 CPU tensor of each file's bytes] * N, "box": int64 [N, 4]
     (left, top, right, bottom), "flip": bool [N], "plain_jpeg": bool [N] (an RGB or
     grayscale JPEG), "label": int64 [N], "key": str [N], "shard": str [N]}

and the training loop turns it into the batch `decode: cpu` would have given:

    decoder = DeviceDecoder(spec, device, skipped=skipped)
    batch = decoder(batch) if is_encoded(batch) else batch
    x = normalize(batch["image"], device)  # uint8 [N, 3, S, S], already on `device`

Plain JPEGs go to `torchvision.io.decode_jpeg(list, device=device)` in one call (the batched
nvJPEG decode on CUDA; libjpeg-turbo on a CPU device). The rest (PNG, CMYK JPEGs: their
header says so) and what the device refuses (damaged files) are decoded on the CPU (`raydsnas.data.images.decode_rgb`)
and copied over; what the CPU cannot decode either is a corrupt image: `CorruptImageError`
naming shard and key, or, with `data.skip_corrupt`, left out and recorded.

Pixels: on a CPU device the same as `decode: cpu` (the same decoder and resize). On CUDA nvJPEG
differs from libjpeg-turbo by about +-1 and the float resize from the CPU's integer one by
at most 1 (not measured here: no GPU on the development machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from raydsnas.data.errors import CorruptImageError
from raydsnas.data.images import (
    DECODE_ERRORS,
    ResizeCenterCrop,
    decode_rgb,
    resized_crop,
    undecodable_reason,
)
from raydsnas.data.spec import DataSpec

if TYPE_CHECKING:
    from raydsnas.data.pipeline import SkippedImages

JPEG_START = (0xFF, 0xD8)


def is_encoded(batch: dict[str, Any]) -> bool:
    """Whether `batch` holds encoded images (`data.decode: gpu`) rather than decoded `image`."""
    return "encoded" in batch


class DeviceDecoder:
    """Encoded batch -> `{"image": uint8 [N, 3, S, S] on device, "label": int64 [N] (CPU)}`
    (plus `"key"` with `data.keep_keys`), S = `spec.image_size`.

    `training`: crop each image to its `box`, resize to S x S and mirror it where `flip`
    says (the draws `decode_batch` made); otherwise the validation transform (shorter side to
    S / val_crop_ratio, central S x S; no box needed). Rows whose image cannot be decoded
    raise `CorruptImageError`, or with `spec.skip_corrupt` are left out (the returned batch
    is then shorter) and recorded in `skipped` if given (pass `build_datasets(spec).skipped`
    so that `count()` includes them)."""

    def __init__(self, spec: DataSpec, device: torch.device | str, *, training: bool = True,
                 skipped: SkippedImages | None = None) -> None:
        self.size, self.device, self.training = spec.image_size, torch.device(device), training
        self.val_crop = ResizeCenterCrop(spec.image_size, spec.val_crop_ratio)
        self.skip_corrupt, self.keep_keys, self.skipped = (spec.skip_corrupt, spec.keep_keys,
                                                           skipped)
        # torchvision allocates nvJPEG's outputs on the current stream but writes them on a
        # stream of its own that does not wait for the current one: memory the current stream
        # just freed (and may still be reading) could be written early. Its outputs are
        # allocated on a stream nothing else allocates on, then handed over (`_decode_jpeg`).
        self._decode_stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda"
                               else None)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded = batch["encoded"]
        images = self.decode(encoded, batch.get("plain_jpeg"))
        out = torch.empty((len(encoded), 3, self.size, self.size), dtype=torch.uint8,
                          device=self.device)
        kept: list[int] = []
        reasons: dict[str, str] = {}
        for row, image in enumerate(images):
            if not isinstance(image, BaseException):
                image = self.crop(image, batch, row)
            if isinstance(image, BaseException):
                shard, key = str(batch["shard"][row]), str(batch["key"][row])
                reason = undecodable_reason(image)
                if not self.skip_corrupt:
                    raise CorruptImageError(f"shard {shard}, key {key}: {reason}") from None
                reasons[f"{shard}:{key}"] = reason
                continue
            out[len(kept)].copy_(image)
            kept.append(row)
        if reasons and self.skipped is not None:
            self.skipped.record(reasons)
        every = len(kept) == len(encoded)
        result = {"image": out if every else out[: len(kept)],
                  "label": batch["label"] if every else batch["label"][kept]}
        if self.keep_keys:
            result["key"] = batch["key"][kept]
        return result

    def decode(self, encoded: list[torch.Tensor], plain_jpeg: torch.Tensor | None = None
               ) -> list[torch.Tensor | BaseException]:
        """Each file's uint8 [3, H, W] on the device, or the error that says why not.
        `plain_jpeg` (bool [N], from the header) picks the files for the device decoder;
        without it, every file that starts like a JPEG."""
        images: list[torch.Tensor | BaseException | None] = [None] * len(encoded)
        jpegs = self.device_decodable(encoded, plain_jpeg)
        if jpegs:
            try:
                decoded = self._decode_jpeg([encoded[i] for i in jpegs])
            except RuntimeError:  # one refused file fails the whole call: find it alone
                decoded = []
                for i in jpegs:
                    try:
                        decoded.append(self._decode_jpeg([encoded[i]])[0])
                    except RuntimeError:
                        decoded.append(None)
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
        for i, image in enumerate(images):
            if image is None:  # not a JPEG, or one the device refused: the CPU decides
                try:
                    image = decode_rgb(encoded[i].numpy().tobytes())
                    if self.device.type == "cuda":  # a pageable copy would sync the stream
                        image = image.pin_memory()
                    images[i] = image.to(self.device, non_blocking=True)
                except DECODE_ERRORS as error:
                    images[i] = error
        return images  # type: ignore[return-value]

    def _decode_jpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """`decode_jpeg(data, device=self.device)`; on CUDA on the decoder's own stream, the
        outputs then made safe for the current stream (it waits for them; the allocator keeps
        their memory until it is done with them)."""
        if self._decode_stream is None:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        current = torch.cuda.current_stream(self.device)
        self._decode_stream.wait_stream(current)
        with torch.cuda.stream(self._decode_stream):
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        current.wait_stream(self._decode_stream)
        for image in decoded:
            image.record_stream(current)
        return decoded

    @staticmethod
    def device_decodable(encoded: list[torch.Tensor], plain_jpeg: torch.Tensor | None
                         ) -> list[int]:
        if plain_jpeg is not None:
            return [i for i, plain in enumerate(plain_jpeg.tolist()) if plain]
        return [i for i, data in enumerate(encoded) if tuple(data[:2].tolist()) == JPEG_START]

    def crop(self, image: torch.Tensor, batch: dict[str, Any], row: int
             ) -> torch.Tensor | BaseException:
        """The row's uint8 [3, S, S] crop, or an error for a box that does not fit the image
        (its header announced another size than its pixels have)."""
        if not self.training:
            return self.val_crop(image)
        left, top, right, bottom = batch["box"][row].tolist()
        height, width = image.shape[-2:]
        if right > width or bottom > height:
            return ValueError(f"the header says the image is at least {right}x{bottom}, "
                              f"its pixels are {width}x{height}")
        return resized_crop(image, (left, top, right, bottom), self.size,
                            bool(batch["flip"][row]))
