"""Pixel normalization shared by the loaders, the trainer and inference.

The paper's reference code normalizes with ImageNet's mean and std; every tensor that flows between the
loader and the models is in that space. Losses and metrics work on images mapped back to [0, 1].
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 3, 1, 1) if like.dim() == 4 else (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(IMAGENET_STD, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def normalize(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (CHW or NCHW) -> normalized model space."""
    mean, std = _stats(unit)
    return (unit - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalized model space -> [0, 1] scale. Not clamped, so gradients flow through it."""
    mean, std = _stats(x)
    return x * std + mean
