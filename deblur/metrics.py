"""Image quality metrics on [0, 1] images: PSNR and SSIM per image.

SSIM is pytorch-msssim's (11x11 Gaussian window, sigma 1.5), the same function the generator's
loss uses, so training and evaluation measure one thing.
"""

from __future__ import annotations

import torch
from pytorch_msssim import ssim as _ssim


def psnr(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of NCHW tensors in [0, data_range]; shape (N,)."""
    mse = (restored.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of NCHW tensors in [0, data_range]; shape (N,)."""
    return _ssim(restored.float(), target.float(), data_range=data_range, size_average=False)
