"""Patch training: where each pair's crop lies, one pure function for both backends and evaluation.

``make_loader(..., crop=True)`` (config ``data.crop: true``) cuts an ``image_size`` window out of
each pair at full stored resolution instead of resizing the whole image: the window is the same
in both members, and so is the mirror. Both loader backends, and ``python -m deblur.evaluate
--mode crop``, take the window from :func:`crop_window`, so they cut the same pixels:

- Training (``shuffle=True``): a new window every epoch, drawn from ``(seed, epoch, key)``.
- Evaluation (``shuffle=False``): one fixed window per sample, drawn from its key alone, so
  validation and test see the same crops in every run, whatever the seed or the rank layout.
- ``flip=True``: the mirror is drawn from ``(seed, epoch, key)`` too (one coin per pair).

The draw is a sha256 of those values, not a random generator's state: it depends on nothing
but the sample and the epoch, so a resumed run, any worker count and any rank cut the same
windows. Coordinates are whole pixels, ``0 <= x <= w - size`` and ``0 <= y <= h - size``; the
stored size comes from the sharp member's JPEG header (both members have it: the builder
refuses pairs of different sizes, and the loader checks again).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import simplejpeg

from deblur.shard.format import ShardError


@dataclass(frozen=True)
class Window:
    """A crop: the top-left corner in pixels and whether both members are mirrored."""

    x: int
    y: int
    mirror: bool


def jpeg_size(data: bytes, where: str) -> tuple[int, int]:
    """(w, h) of a JPEG member, read from its header (microseconds: nothing is decoded)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError) as error:
        raise ShardError(f"cannot decode {where}: {error}") from None
    return width, height


def _draw(*values: object) -> bytes:
    return hashlib.sha256("\x00".join(map(str, ("crop", *values))).encode()).digest()


def crop_window(
    key: str, size: tuple[int, int], crop: int, *, seed: int, epoch: int, random: bool, flip: bool
) -> Window:
    """The window of sample ``key`` (stored ``size`` = (w, h)) in ``epoch``: random per epoch
    when ``random`` (training), else fixed per key (evaluation); see the module docstring."""
    w, h = size
    if w < crop or h < crop:
        raise ValueError(f"a {w}x{h} image is smaller than the {crop}x{crop} crop")
    every_epoch = _draw(seed, epoch, key)
    where = every_epoch if random else _draw(key)
    # 64-bit draws modulo a few thousand positions: the bias is below 1e-15.
    x = int.from_bytes(where[0:8], "little") % (w - crop + 1)
    y = int.from_bytes(where[8:16], "little") % (h - crop + 1)
    return Window(x, y, mirror=flip and bool(every_epoch[16] & 1))
