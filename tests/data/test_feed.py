"""The device feed: normalisation against the formula, channels-last output, labels carried, the
constants made once per device, and encoded batches handed to a decoder."""

import pytest
import torch

from raydsnas.data import feed
from raydsnas.data.feed import IMAGENET_MEAN, IMAGENET_STD, DeviceFeed, normalize


def images(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_normalize_matches_the_formula_and_keeps_its_constants_on_the_device():
    x = images()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = normalize(x, "cpu", channels_last=True)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std, rtol=1e-6, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    before = feed._CONSTANTS[(torch.device("cpu"), torch.float32)]
    normalize(images(seed=1), "cpu")
    assert feed._CONSTANTS[(torch.device("cpu"), torch.float32)] is before  # made once
    assert normalize(x, "cpu", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="uint8 images of shape"):
        normalize(x.float(), "cpu")


def test_the_feed_yields_every_batch_normalised_with_its_labels_in_order():
    batches = [{"image": images(seed=i), "label": torch.arange(4) + 10 * i} for i in range(3)]
    out = list(DeviceFeed(torch.device("cpu"), channels_last=True)(iter(batches)))
    assert len(out) == 3
    for (x, y), batch in zip(out, batches):
        torch.testing.assert_close(x, normalize(batch["image"], "cpu"))
        assert torch.equal(y, batch["label"])
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_an_encoded_batch_goes_to_the_decoder_and_needs_one():
    decoded = images(seed=5)
    batch = {"encoded": [b"..."] * 4, "label": torch.zeros(4, dtype=torch.int64)}
    fed = DeviceFeed(torch.device("cpu"), decoder=lambda b: {"image": decoded, "label": b["label"]},
                     is_encoded=lambda b: "encoded" in b)
    (x, _), = fed(iter([batch]))
    torch.testing.assert_close(x, normalize(decoded, "cpu"))
    with pytest.raises(ValueError, match="needs a decoder"):
        list(DeviceFeed(torch.device("cpu"), is_encoded=lambda b: True)(iter([batch])))


def test_a_batch_whose_every_image_was_skipped_is_an_error_not_a_nan_loss():
    batch = {"encoded": [b"..."] * 3, "label": torch.zeros(3, dtype=torch.int64)}
    empty = {"image": torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
             "label": torch.zeros(0, dtype=torch.int64)}
    fed = DeviceFeed(torch.device("cpu"), decoder=lambda b: empty, is_encoded=lambda b: True)
    with pytest.raises(ValueError, match="all 3 images of a training batch were corrupt"):
        list(fed(iter([batch])))
