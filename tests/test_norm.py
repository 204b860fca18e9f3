"""deblur.norm: the one definition of the models' input space."""

from __future__ import annotations

import torch

from deblur.norm import IMAGENET_MEAN, IMAGENET_STD, channel_stats, constants, denormalize, normalize


def test_normalize_is_imagenet_and_denormalize_undoes_it():
    unit = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(unit), (unit - mean) / std)
    torch.testing.assert_close(denormalize(normalize(unit)), unit)
    torch.testing.assert_close(normalize(unit[0]), normalize(unit)[0])  # CHW as well as NCHW


def test_uint8_pixels_normalize_as_their_unit_scale():
    pixels = torch.randint(0, 256, (2, 2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    normalized = normalize(pixels, max_value=255)
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, normalize(pixels.float() / 255))
    assert channel_stats(255) == ([255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])


def test_the_layout_is_kept_and_the_constants_are_made_once():
    # The loaders' batches are channels_last views; the models run in that layout.
    hwc = torch.rand(4, 16, 16, 3)
    images = hwc.permute(0, 3, 1, 2)
    for out in (normalize(images), denormalize(images), normalize((hwc * 255).byte().permute(0, 3, 1, 2), 255)):
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalize(images), normalize(images.contiguous()))
    assert constants("cpu")[0] is constants(torch.device("cpu"))[0]
    assert constants("cpu", torch.float64)[0].dtype == torch.float64
