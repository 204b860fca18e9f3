"""Image quality metrics on [0, 1] images: PSNR and SSIM per image, and their one averaging.

SSIM is pytorch-msssim's (11x11 Gaussian window, sigma 1.5), the same function the generator's
loss uses, so training and evaluation measure one thing. Scores are averaged over images the
same way everywhere (validation in training and ``python -m deblur.evaluate``): each batch's
per-image scores are summed (:func:`score_sums`), sums of batches and ranks are added, and the
total is divided by the image count (:func:`mean_scores`), so batches of any size combine exactly.
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


def score_sums(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[sum of per-image PSNR, sum of per-image SSIM] over a batch of NCHW [0, 1] images; shape (2,)."""
    return torch.stack([psnr(images, targets).sum(), ssim(images, targets).sum()])


def mean_scores(sums: torch.Tensor, count: int) -> dict[str, float]:
    """Added-up :func:`score_sums` of ``count`` images -> their mean PSNR and SSIM (NaN for none)."""
    if not count:
        return {"psnr": float("nan"), "ssim": float("nan")}
    psnr_mean, ssim_mean = (sums.double().cpu() / count).tolist()
    return {"psnr": psnr_mean, "ssim": ssim_mean}
