"""deblur.metrics against an independent implementation (scikit-image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblur.metrics import psnr, ssim


def _pairs(n=3, size=64, seed=0):
    """Smooth-ish images and degraded copies of varying quality, so SSIM spans a real range."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, size // 8, size // 8, generator=g)
    target = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.randn(n, 3, size, size, generator=g) * torch.tensor([0.02, 0.1, 0.3]).view(n, 1, 1, 1)
    restored = (target + noise).clamp(0, 1)
    return restored, target


def _hwc(t):
    return t.permute(1, 2, 0).double().numpy()


def test_psnr_matches_scikit_image():
    restored, target = _pairs()
    ours = psnr(restored, target)
    assert ours.shape == (3,)
    for i in range(3):
        ref = peak_signal_noise_ratio(_hwc(target[i]), _hwc(restored[i]), data_range=1)
        assert ours[i].item() == pytest.approx(ref, abs=1e-3)
    # the three noise levels give clearly different scores: the comparison is not trivial
    assert ours[0] > ours[1] > ours[2]


def test_ssim_matches_scikit_image():
    restored, target = _pairs()
    ours = ssim(restored, target)
    assert ours.shape == (3,)
    for i in range(3):
        # pytorch-msssim's settings: 11x11 Gaussian window (sigma 1.5, truncate 3.5 -> radius 5),
        # population covariances, K1=0.01, K2=0.03, mean over the valid region and channels
        ref = structural_similarity(
            _hwc(target[i]),
            _hwc(restored[i]),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=2,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)
    assert ours[0] > ours[1] > ours[2]
    assert 0.0 < ours[2] < 0.9


def test_identical_images_score_perfect_ssim():
    _, target = _pairs()
    assert torch.allclose(ssim(target, target), torch.ones(3), atol=1e-5)
    assert np.all(psnr(target, target).numpy() > 100)


def test_ssim_uses_one_window_per_device_and_matches_pytorch_msssim_default():
    from pytorch_msssim import ssim as library_ssim

    from deblur.metrics import ssim_window

    restored, target = _pairs()
    expected = library_ssim(restored, target, data_range=1.0, size_average=False)  # builds its own window
    torch.testing.assert_close(ssim(restored, target), expected, rtol=0, atol=0)
    assert ssim_window("cpu") is ssim_window(torch.device("cpu"))  # made once, then kept
    assert ssim_window("cpu").shape == (3, 1, 1, 11)
