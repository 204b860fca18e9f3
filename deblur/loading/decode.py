"""One shard member's JPEG bytes -> the pixels the torch backend trains on (and evaluation scores):
resized whole (:func:`decode_resized`, the default) or cut at a window (:func:`decode_crop`,
patch training).

The torch backend decodes every member with it, and ``python -m deblur.evaluate`` scores the
pairs it yields, without importing a loader: evaluation sees exactly the pixels the torch
backend trains on, and DALI's within decoder tolerance (its libjpeg-turbo or nvJPEG decode and
resampler differ from these by a mean ~0.002 in normalized units, docs/loading.md).
Decoding is strict: a member libjpeg warns about is refused, as deblur.shard.check refuses it.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from deblur.shard.format import ShardError


def decode_resized(data: bytes, image_size: int, where: str) -> torch.Tensor:
    """JPEG bytes -> (3, S, S) uint8, decoded and resized with an antialiased bilinear filter.

    simplejpeg (libjpeg-turbo, as PIL and DALI's CPU decoder, same pixels) and torch's uint8
    antialiased bilinear (triangle) kernel, which runs vectorised on the decoder's HWC output:
    1.7x faster per 178x218 image than PIL's decode + resize (PIL also parses headers in
    Python) and within one grey level of it. The filter is DALI's (linear + antialias), so the
    backends agree within decoder tolerance. No DCT-domain downscale (PIL's draft(), simplejpeg's
    min_width): faster still, but it moves this reference backend away from DALI's full decode
    (3-4 % of values off by > 0.05 instead of 0.2 %).
    """
    image = torch.from_numpy(decode_full(data, where)).permute(2, 0, 1)
    return F.interpolate(
        image[None], size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )[0]


def decode_full(data: bytes, where: str) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 at the stored size, decoded strictly as above."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except (ValueError, RuntimeError) as error:
        raise ShardError(f"cannot decode {where}: {error}") from error


def decode_crop(data: bytes, x: int, y: int, size: int, where: str) -> torch.Tensor:
    """JPEG bytes -> (3, S, S) uint8: the ``size`` window at (x, y) of the stored image, the
    torch backend's crop (and ``deblur.evaluate --mode crop``'s).

    simplejpeg cannot decode a region, so this decodes the whole image and slices it; libjpeg's
    own region decoding (DALI's ``fn.decoders.image_slice``) gives the very same pixels
    (docs/loading.md has what each costs)."""
    image = decode_full(data, where)
    h, w = image.shape[:2]
    if not (0 <= x <= w - size and 0 <= y <= h - size):
        raise ShardError(f"{where}: a {size}x{size} crop at ({x}, {y}) does not fit the {w}x{h} image")
    return torch.from_numpy(np.ascontiguousarray(image[y : y + size, x : x + size])).permute(2, 0, 1)


def decode_member(data: bytes, image_size: int, where: str) -> np.ndarray:
    """JPEG bytes -> (S, S, 3) uint8 numpy image: the torch backend's pixels (see the module doc)."""
    return decode_resized(data, image_size, where).permute(1, 2, 0).numpy()
