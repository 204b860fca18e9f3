"""Image quality metrics on [0, 1] images: PSNR and SSIM per image, and their one averaging.

SSIM is pytorch-msssim's (11x11 Gaussian window, sigma 1.5), the same function the generator's
loss uses (deblur.training.gan), so training and evaluation measure one thing. Its window is made
once per device and dtype (:func:`ssim_window`) and passed in: left to itself, pytorch-msssim
builds it on the host and copies it to the device at every call, which on a GPU is a blocking
host-to-device copy. Scores are averaged over images the
same way everywhere (validation in training and ``python -m deblur.evaluate``): each batch's
per-image scores are summed (:func:`score_sums`), sums of batches and ranks are added, and the
total is divided by the image count (:func:`mean_scores`), so batches of any size combine exactly.
"""

from __future__ import annotations

import torch
from pytorch_msssim import SSIM
from pytorch_msssim import ssim as _ssim

_WINDOWS: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}


def psnr(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of NCHW tensors in [0, data_range]; shape (N,)."""
    mse = (restored.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim_window(device: torch.device | str, dtype: torch.dtype = torch.float32, channels: int = 3) -> torch.Tensor:
    """pytorch-msssim's default Gaussian window for ``channels``-channel images on ``device``,
    made at the first call and kept (read-only). Like deblur.norm.constants, call it before
    compiled code uses :func:`ssim`, so that torch.compile takes the window as an input."""
    key = (torch.device(device), dtype, channels)
    found = _WINDOWS.get(key)
    if found is None:
        found = _WINDOWS[key] = SSIM(channel=channels).win.to(key[0], dtype)
    return found


def ssim(restored: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of NCHW tensors in [0, data_range], in float32; shape (N,)."""
    restored, target = restored.float(), target.float()
    window = ssim_window(restored.device, restored.dtype, restored.shape[1])
    return _ssim(restored, target, data_range=data_range, size_average=False, win=window)


def score_sums(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[sum of per-image PSNR, sum of per-image SSIM] over a batch of NCHW [0, 1] images; shape (2,)."""
    return torch.stack([psnr(images, targets).sum(), ssim(images, targets).sum()])


def mean_scores(sums: torch.Tensor, count: int) -> dict[str, float]:
    """Added-up :func:`score_sums` of ``count`` images -> their mean PSNR and SSIM (NaN for none)."""
    if not count:
        return {"psnr": float("nan"), "ssim": float("nan")}
    psnr_mean, ssim_mean = (sums.double().cpu() / count).tolist()
    return {"psnr": psnr_mean, "ssim": ssim_mean}
