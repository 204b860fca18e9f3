"""Pixel normalization: the one definition of the models' input space, for the loaders, the trainer
and inference.

The paper's reference code normalizes with ImageNet's mean and std; every tensor that flows between
the loaders and the models is in that space: ``(pixel - mean) / std`` per channel, with pixels in
[0, 1] (``max_value`` 1) or [0, 255] (uint8, ``max_value`` 255, the loaders' raw output). Losses and
metrics work on images mapped back to [0, 1] (:func:`denormalize`).

- :func:`channel_stats`: the per-channel numbers, as Python floats, for code that takes numbers
  (DALI's ``crop_mirror_normalize``).
- :func:`normalize` / :func:`denormalize`: tensors of shape (..., 3, H, W) in any memory layout.
  Their constants are tensors made once per (device, dtype, max_value) and kept
  (:func:`constants`): normalizing never builds a tensor from host data, which on a GPU is a
  blocking host-to-device copy that stops the host from running ahead of the device.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CONSTANTS: dict[tuple[torch.device, torch.dtype, float], tuple[torch.Tensor, torch.Tensor]] = {}


def channel_stats(max_value: float = 1.0) -> tuple[list[float], list[float]]:
    """(mean, std) per channel for pixels in [0, max_value]: normalized = (pixel - mean) / std."""
    return [max_value * m for m in IMAGENET_MEAN], [max_value * s for s in IMAGENET_STD]


def constants(
    device: torch.device | str, dtype: torch.dtype = torch.float32, max_value: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (3, 1, 1) tensors on ``device``, made at the first call and kept.

    Read-only (shared by every caller). Code compiled with torch.compile should find them made
    already (call this first): torch.compile then takes them as graph inputs; made while it
    traces, they cost one recompilation once they exist.
    """
    key = (torch.device(device), dtype, float(max_value))
    found = _CONSTANTS.get(key)
    if found is None:
        mean, std = channel_stats(max_value)
        found = tuple(torch.tensor(v, dtype=dtype, device=key[0]).view(3, 1, 1) for v in (mean, std))
        _CONSTANTS[key] = found
    return found


def _float_dtype(images: torch.Tensor) -> torch.dtype:
    return images.dtype if images.is_floating_point() else torch.float32


def _laid_out_like(images: torch.Tensor, stats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The (3, 1, 1) constants, on the CPU expanded to one whole image in ``images``' layout.

    Against a channels_last batch, (3, 1, 1) constants leave the CPU kernel a 3-long inner loop:
    measured 26x slower (9 vs 0.34 ms) on the torch loader's 64-pair batches. Constants with the
    image's own strides let the loop run over whole images. GPU kernels broadcast at full speed,
    so there the cached constants are used as they are."""
    if images.device.type != "cpu" or images.dim() < 3:
        return stats
    one = images[(0,) * (images.dim() - 3)]
    return tuple(torch.empty_like(one, dtype=s.dtype).copy_(s.expand_as(one)) for s in stats)


def normalize(images: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Images in [0, max_value] (..., 3, H, W), float or uint8 -> model space (float32 for uint8
    input, else the input's dtype), in the input's memory layout."""
    mean, std = _laid_out_like(images, constants(images.device, _float_dtype(images), max_value))
    return (images - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Model space (..., 3, H, W) -> [0, 1] scale, in the input's memory layout. Not clamped, so
    gradients flow through it."""
    mean, std = _laid_out_like(x, constants(x.device, x.dtype))
    return x * std + mean
