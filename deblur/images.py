"""Robust image reading: any JPEG/PNG/WebP, recognised by content, to 8-bit RGB.

``load_rgb(path)`` is what other modules (inference, evaluation) call; the shard builder uses
``decode_rgb(data, name)`` on bytes it has already read, because it may store those bytes as-is.
Every failure is an :class:`ImageError` whose message starts with the file's name.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from deblur.errors import InputError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
# PIL's own default (about 89 Mpx); a larger image is refused as a likely decompression bomb.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_EXIF_ORIENTATION = 0x0112
_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ImageError(InputError, ValueError):
    """An input image that cannot be used: "<file>: <category>: <details>"."""


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # mode "RGB", orientation applied
    format: str  # "JPEG", "PNG" or "WEBP": what the content is, whatever the file is called
    reusable_jpeg: bool  # the source bytes are a baseline RGB JPEG showing exactly ``image``


def _to_rgb(im: Image.Image) -> Image.Image:
    """Correct 8-bit RGB from any mode PIL opens JPEG/PNG/WebP files in."""
    if im.mode.startswith("I"):
        # 16-bit greyscale ("I;16*") or 32-bit "I" from a 16-bit PNG: PIL's convert("L") clips
        # at 255 instead of scaling, so scale 0..65535 -> 0..255 ourselves.
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        # Transparent areas become white, as most viewers show them.
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_rgb(data: bytes, name: str, *, min_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode ``data`` fully; refuse bombs, non-images, truncation and sides under ``min_size``."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in SUPPORTED_FORMATS:
                raise ImageError(f"{name}: unsupported format: {im.format}")
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: decompression bomb: {w}x{h} exceeds the {max_pixels}-pixel limit")
            im.load()  # full decode now: truncated or corrupt data fails here, not later
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        # PIL names the in-memory file by its repr ("<_io.BytesIO object at 0x7f...>"): an address
        # that differs every run would make the builder's manifest differ between rebuilds.
        detail = _OBJECT_REPR.sub("", str(e))
        raise ImageError(f"{name}: cannot decode: {type(e).__name__}: {detail}") from None
    if min(w, h) < min_size:
        raise ImageError(f"{name}: too small: {w}x{h}, shorter side under {min_size} px")
    fmt = im.format or ""
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    reusable = (
        fmt == "JPEG"
        and im.mode == "RGB"
        and orientation == 1
        and not im.info.get("progressive")
        and not im.info.get("progression")
    )
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return Decoded(image=_to_rgb(im), format=fmt, reusable_jpeg=reusable)


def load_rgb(path: str | Path, *, min_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file (JPEG/PNG/WebP, by content) as an 8-bit RGB PIL image."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None
    return decode_rgb(data, str(path), min_size=min_size, max_pixels=max_pixels).image
