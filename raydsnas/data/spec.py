"""`DataSpec`: where a job's data is and how to turn it into batches (the `data:` section of a
job file), validated on construction.

Ray-free on purpose (numpy, PIL and pyarrow's filesystem layer at most, through
`raydsnas.data.builtin` and `raydsnas.data.storage`): `raydsnas.config` builds a `DataSpec` for
every job, so `--print-config` and `--dry-run` must not pay for importing Ray. The sources a
`uri` can name are opened by `raydsnas.data.sources`; shard sets are read by
`raydsnas.data.pipeline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from raydsnas.checks import check, check_known
from raydsnas.data.builtin import BUILTIN_PREFIX, BUILTIN_SETS
from raydsnas.data.errors import DataSpecError
from raydsnas.data.storage import redact_storage_options

# Where `DataSpec.decode` may put the decoding of training images.
DECODE_PLACES = ("cpu", "gpu")


@dataclass(frozen=True)
class DataSpec:
    """Where the data is and how to turn it into batches. Validated on construction: an invalid
    value raises `DataSpecError` naming the key (`data.<field>`), the value and what is allowed.

    Attributes:
        uri: the source (`raydsnas.data.sources`): a shard-set root (a local path or
            `s3://bucket/prefix`), `builtin:<name>` or `synthetic:<classes>/<train>/<val>`.
        image_size: side of the square crops fed to the network.
        storage_options: object-store options (see `raydsnas.data.storage`); secrets are
            redacted from `repr`.
        seed: base seed of the file order, the shuffle buffer and the augmentations.
        shuffle_buffer: rows in each training worker's local shuffle buffer (0: off).
        skip_corrupt: skip undecodable images (and count them) instead of failing.
        crop_scale, crop_ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        hflip: random horizontal flip during training.
        val_crop_ratio: validation resizes the shorter side to `image_size / val_crop_ratio`,
            then centre-crops `image_size` (0.875: 256 -> 224, as for ImageNet).
        preserve_order: make the row order a pure function of the seed (Ray Data
            `preserve_order`); costs some throughput.
        object_store_limit_bytes: cap on the object-store memory the pipeline may hold
            (None: Ray Data's default share of the object store).
        keep_keys: also emit each row's `key` (strings: use `iter_batches`, not torch batches).
        target_block_bytes: largest block the read and decode steps emit, i.e. how many
            encoded images one decode call takes (8 MiB: ~70 ImageNet JPEGs) and how much
            memory one task holds.
        decode: where training images are decoded. `cpu`: in the Ray Data tasks (uint8
            crops reach the workers). `gpu`: the tasks read only each JPEG's header and draw
            the crop and flip; the workers get the encoded bytes and decode them on their
            device (`raydsnas.data.device_decode.DeviceDecoder`, nvJPEG on CUDA). Validation
            and the selection split are decoded on CPU either way.
    """

    uri: str = f"{BUILTIN_PREFIX}digits"
    image_size: int = 224
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    shuffle_buffer: int = 1024
    skip_corrupt: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    val_crop_ratio: float = 0.875
    preserve_order: bool = False
    object_store_limit_bytes: int | None = None
    keep_keys: bool = False
    target_block_bytes: int = 8 * 2**20
    decode: str = "cpu"

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            check(False, f"data.{name}", getattr(self, name), allowed, DataSpecError)

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(self.uri, str) or not self.uri.strip():
            fail("uri", "a local path, s3://bucket/prefix or builtin:<name>")
        if (
            self.uri.startswith(BUILTIN_PREFIX)
            and self.uri[len(BUILTIN_PREFIX) :] not in BUILTIN_SETS
        ):
            fail(
                "uri",
                f"one of the built-in data sets {[BUILTIN_PREFIX + n for n in BUILTIN_SETS]}",
            )
        if not is_int(self.image_size) or not 4 <= self.image_size <= 4096:
            fail("image_size", "an integer from 4 to 4096")
        if not isinstance(self.storage_options, Mapping) or not all(
            isinstance(k, str) for k in self.storage_options
        ):
            fail("storage_options", "a mapping with string keys")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "a non-negative integer")
        if not is_int(self.shuffle_buffer) or self.shuffle_buffer < 0:
            fail("shuffle_buffer", "a non-negative integer (0 turns the buffer off)")
        for name in ("skip_corrupt", "hflip", "preserve_order", "keep_keys"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        object.__setattr__(self, "crop_scale", _pair(self, "crop_scale"))
        object.__setattr__(self, "crop_ratio", _pair(self, "crop_ratio"))
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            fail("crop_scale", "[min, max] with 0 < min <= max <= 1")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            fail("crop_ratio", "[min, max] with 0 < min <= max")
        if not isinstance(self.val_crop_ratio, (int, float)) or not 0 < self.val_crop_ratio <= 1:
            fail("val_crop_ratio", "a number in (0, 1]")
        if not is_int(self.target_block_bytes) or self.target_block_bytes < 2**16:
            fail("target_block_bytes", "an integer of at least 65536 bytes")
        if self.decode not in DECODE_PLACES:
            fail("decode", f"one of {list(DECODE_PLACES)}")
        if self.object_store_limit_bytes is not None and (
            not is_int(self.object_store_limit_bytes) or self.object_store_limit_bytes <= 0
        ):
            fail("object_store_limit_bytes", "a positive integer or null")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataSpec:
        """Build from a config mapping (e.g. the `data:` section of a YAML job file)."""
        check_known("data", values, [f.name for f in fields(cls)], DataSpecError)
        return cls(**values)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["storage_options"] = redact_storage_options(self.storage_options)
        return f"DataSpec({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _pair(spec: DataSpec, name: str) -> tuple[float, float]:
    value = getattr(spec, name)
    check(isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
          f"data.{name}", value, "a pair of numbers [min, max]", DataSpecError)
    return float(value[0]), float(value[1])
