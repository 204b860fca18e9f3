"""GoPro-sized pairs made from the demo photographs, for ``python -m deblur.bench loader --crop``.

``write_gopro_frames(root, 256)`` writes GoPro's layout (``train/<scene>/sharp|blur/NNNNNN.jpg``):
1280x720 frames sliding across a few demo photographs (upscaled to cover them), each blurred
with a defocus disk. Only the members' size and JPEG coding matter to the loader's speed, not
what the blur is.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from deblur.images import load_rgb
from deblur.shard.blur import apply_kernel

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png")
JPEG_QUALITY = 95  # the builder's own: the frames are stored byte for byte


def disk_kernel(radius: float) -> np.ndarray:
    """A defocus blur: a uniform disk of ``radius`` px, normalized to sum 1."""
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = (x**2 + y**2 <= radius**2).astype(np.float64)
    return kernel / kernel.sum()


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return buffer.getvalue()


def write_gopro_frames(root: Path, frames: int, size: tuple[int, int] = (1280, 720), radius: float = 4.0) -> Path:
    """``frames`` (sharp, blurred) pairs of ``size`` = (w, h) px in GoPro's layout under ``root``,
    spread over the demo photographs as scenes; returns ``root``."""
    w, h = size
    kernel = disk_kernel(radius)
    per_scene = -(-frames // len(PHOTOS))
    written = 0
    for photo_name in PHOTOS:
        photo = load_rgb(Path(skimage.data.data_dir) / photo_name)
        scale = max(1.25 * w / photo.width, 1.25 * h / photo.height)
        photo = np.asarray(photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC))
        scene = root / "train" / f"GOPR_{Path(photo_name).stem}"
        for n in range(min(per_scene, frames - written)):
            # a camera panning across the photograph, one frame after the other
            x = round((photo.shape[1] - w) * n / max(per_scene - 1, 1))
            y = round((photo.shape[0] - h) * ((n * 7) % per_scene) / max(per_scene - 1, 1))
            sharp = np.ascontiguousarray(photo[y : y + h, x : x + w])
            for kind, image in (("sharp", sharp), ("blur", apply_kernel(sharp, kernel))):
                (scene / kind).mkdir(parents=True, exist_ok=True)
                (scene / kind / f"{n:06d}.jpg").write_bytes(_jpeg(image))
            written += 1
    return root
