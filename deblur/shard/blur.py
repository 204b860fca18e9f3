"""Synthetic blur: deterministic parameters per (seed, key), kernels, and their application.

The json member of every sample stores the blur that was applied, in pixels/degrees at the
SOURCE image's resolution (where it was applied), so ``kernel_from_params`` rebuilds the exact
kernel; for shards stored downscaled (``python -m deblur.shard --store-size``),
``kernel_from_params(stored_blur(meta))`` is the kernel at the stored resolution:

- ``{"type": "gaussian", "sigma": s}``: isotropic Gaussian, standard deviation ``s`` px,
  truncated at ``ceil(4 s)`` px from the centre, normalized to sum 1.
- ``{"type": "motion", "length": L, "angle": a}``: a straight, centred line segment ``L`` px
  long at ``a`` degrees counter-clockwise from the +x axis (image y points down), rasterized
  by splatting ``ceil(8 L)`` evenly spaced points bilinearly, normalized to sum 1.
- ``{"type": "real"}`` (:data:`REAL_BLUR`): a photographed pair (paired sources,
  deblur/shard/pairs.py); there is no kernel, and ``kernel_from_params`` says so.

Strength. The paper trains at 64x64, so the ranges in :class:`BlurConfig` are given at a
64-px reference (docs/design.md: sigma 1.6-2.6 px or length 7-12 px lands at roughly 20-27 dB PSNR
after resizing to 64x64) and scaled by ``min(w, h) / 64`` to the source image. One scale for
both axes keeps the kernel a physically plausible (isotropic / straight) blur at the source
resolution; for CelebA's 178x218 the short side maps exactly onto 64 px.

Convolution reflects at the borders (``d c b a | a b c d``, scipy.ndimage's "reflect") and runs
through a float32 FFT, so large kernels on large images stay cheap.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from scipy import fft

BLUR_TYPES = ("gaussian", "motion")
# The json "blur" of a photographed pair (python -m deblur.shard --sharp/--gopro/--pairs): the
# blur is real, so there is no kernel to rebuild and nothing to rescale.
REAL_BLUR = {"type": "real"}


def is_real(blur: dict) -> bool:
    """Whether a json "blur" describes a photographed pair (no kernel)."""
    return isinstance(blur, dict) and blur.get("type") == REAL_BLUR["type"]


class BlurConfig(BaseModel):
    """How blur parameters are drawn. Ranges are at the 64-px reference resolution.

    Its fields are also the builder's options (deblur/shard/settings.py): ``--motion-fraction``,
    ``--sigma-range LO HI``, ``--motion-length-range LO HI``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # The resolution the ranges are given at: fixed, not an option (the ranges scale with it).
    reference_size: int = Field(64, gt=0, json_schema_extra={"cli": False})
    motion_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of samples with motion blur")
    sigma_range: tuple[float, float] = Field((1.6, 2.6), description="Gaussian sigma range in px at 64-px scale")
    motion_length_range: tuple[float, float] = Field(
        (7.0, 12.0), description="motion length range in px at 64-px scale"
    )

    @field_validator("sigma_range", "motion_length_range")
    @classmethod
    def _range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        # A blur wider than the image is no photograph's blur, and its kernel (4 sigma each
        # side, scaled up to the source size) could take gigabytes.
        lo, hi = value
        top = info.data.get("reference_size", 64)
        if not 0 < lo <= hi <= top:
            raise ValueError(f"must satisfy 0 < LO <= HI <= {top} (px at {top}-px scale), got {lo:g} {hi:g}")
        return value


def rng_for(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key): independent of order and worker count."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def draw_params(seed: int, key: str, size: tuple[int, int], config: BlurConfig) -> dict:
    """The blur dict for one sample whose source image is ``size`` = (w, h) pixels."""
    rng = rng_for(seed, key)
    scale = min(size) / config.reference_size
    if rng.random() < config.motion_fraction:
        length = rng.uniform(*config.motion_length_range) * scale
        angle = rng.uniform(0.0, 180.0)
        # Rounded before use so the json value rebuilds the very kernel that was applied.
        return {"type": "motion", "length": round(length, 3), "angle": round(angle, 2)}
    sigma = rng.uniform(*config.sigma_range) * scale
    return {"type": "gaussian", "sigma": round(sigma, 3)}


def gaussian_kernel(sigma: float) -> np.ndarray:
    if not sigma > 0:
        raise ValueError(f"gaussian sigma must be > 0, got {sigma}")
    radius = math.ceil(4 * sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k1 = np.exp(-0.5 * (x / sigma) ** 2)
    k = np.outer(k1, k1)
    return k / k.sum()


def motion_kernel(length: float, angle: float) -> np.ndarray:
    if not length > 0:
        raise ValueError(f"motion length must be > 0, got {length}")
    radius = math.ceil(length / 2) + 1  # +1: room for the bilinear splat of the end points
    size = 2 * radius + 1
    t = np.linspace(-length / 2, length / 2, max(2, math.ceil(8 * length)))
    theta = math.radians(angle)
    xs = radius + t * math.cos(theta)
    ys = radius - t * math.sin(theta)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    k = np.zeros((size, size), dtype=np.float64)
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy, x0 + dx), w)
    return k / k.sum()


def kernel_from_params(blur: dict) -> np.ndarray:
    """The exact float64 kernel (2-D, odd-sized, centred, sums to 1) described by a json "blur"."""
    kind = blur.get("type")
    if is_real(blur):
        raise ValueError("the blur of this pair is real (photographed): there is no kernel")
    if kind == "gaussian":
        return gaussian_kernel(float(blur["sigma"]))
    if kind == "motion":
        return motion_kernel(float(blur["length"]), float(blur["angle"]))
    raise ValueError(f"unknown blur type {kind!r} in {blur!r}; expected one of {BLUR_TYPES}")


def stored_blur(meta: dict) -> dict:
    """A sample json's blur params rescaled from the source to the stored resolution.

    Downscaling both members by ``s`` (the builder keeps the aspect ratio) turns a blur of
    sigma / length ``p`` at the source into one of ``p * s`` at the stored size; the angle is
    unchanged. Shards stored at source size (or built before ``source_size`` existed) get the
    params back unchanged.
    """
    blur, stored = meta["blur"], meta["size"]
    source = meta.get("source_size", stored)
    if list(source) == list(stored):
        return blur
    scale = min(stored) / min(source)  # the short side is exactly --store-size: no rounding
    scaled = dict(blur)
    for name in ("sigma", "length"):
        if name in scaled:
            scaled[name] = float(scaled[name]) * scale
    return scaled


def apply_kernel(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve an HxWxC (or HxW) uint8 image with ``kernel``, reflecting at the borders."""
    kh, kw = kernel.shape
    # float32 halves the FFT cost (~1 ms per CelebA image); against float64 it changes ~1e-5
    # of the pixels by one grey level, far below the JPEG quality-95 loss that follows.
    x = image.astype(np.float32)
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) + ((0, 0),) * (x.ndim - 2)
    x = np.pad(x, pad, mode="symmetric")
    # Circular FFT convolution of the padded image: wrap-around only touches the first
    # kh-1 rows / kw-1 columns, which are exactly the padding we cut off again. (scipy.fft
    # rather than scipy.signal.fftconvolve: the latter costs each worker ~1 s of imports.)
    hp, wp = x.shape[:2]
    shape = (fft.next_fast_len(hp, real=True), fft.next_fast_len(wp, real=True))
    k = kernel.astype(np.float32).reshape(kernel.shape + (1,) * (x.ndim - 2))
    spectrum = fft.rfft2(x, shape, axes=(0, 1)) * fft.rfft2(k, shape, axes=(0, 1))
    out = fft.irfft2(spectrum, shape, axes=(0, 1))[kh - 1 : hp, kw - 1 : wp]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply_blur(image: np.ndarray, blur: dict) -> np.ndarray:
    """Blur an HxWx3 uint8 image as described by a json "blur" dict."""
    return apply_kernel(image, kernel_from_params(blur))
