"""Built-in demo data: real photographs bundled with scikit-image, cut into CelebA-sized crops.

``materialize(folder)`` writes a CelebA-shaped folder (178x218 JPEG crops plus a
``list_eval_partition.txt``) so the demo goes through exactly the code path real CelebA takes.
The split is by photograph: validation and test crops come from photographs that no training
crop was cut from. Only files shipped inside the scikit-image wheel are used (no download).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import skimage.data
from PIL import Image

from deblur.files import write_atomic
from deblur.images import load_rgb
from deblur.shard.sources import PARTITION_FILE

CROP_W, CROP_H = 178, 218  # CelebA's img_align_celeba size
SCALES = (1.0, 0.85, 0.7, 0.55)
# Training photographs are cut more densely: more scales, crops a quarter crop apart. Each crop
# gets its own blur draw, so the few training photographs yield ~4x more (image, kernel) pairs,
# which is what a blind deblurrer generalizes from (measured on the demo's validation split, see
# BENCHMARKS.md, "The demo"); validation and test crops (and so their scores) stay as they were.
TRAIN_SCALES = (1.0, 0.92, 0.85, 0.77, 0.7, 0.62, 0.55)
TRAIN_SPACING, HELD_OUT_SPACING = 1 / 4, 1 / 2  # of a crop
JPEG_QUALITY = 95
# photograph file in skimage.data's folder -> CelebA partition code (0 train, 1 val, 2 test)
PHOTOS = {
    "astronaut.png": 0,
    "camera.png": 0,
    "ihc.png": 0,
    "moon.png": 0,
    "motorcycle_left.png": 0,
    "coins.png": 0,
    "chelsea.png": 1,
    "coffee.png": 2,
    "rocket.jpg": 2,
}


def _positions(length: int, crop: int, spacing: float) -> list[int]:
    """Crop offsets about ``spacing`` crops apart, the last one flush with the far edge."""
    if length < crop:
        return []
    n = math.ceil((length - crop) / (crop * spacing)) + 1
    return sorted({round(i * (length - crop) / max(n - 1, 1)) for i in range(n)})


def crops() -> list[tuple[str, int, Image.Image]]:
    """(file name, partition code, RGB crop) for every demo crop, in a fixed order."""
    out = []
    data_dir = Path(skimage.data.data_dir)
    for photo, code in PHOTOS.items():
        full = load_rgb(data_dir / photo)
        train = code == 0
        spacing = TRAIN_SPACING if train else HELD_OUT_SPACING
        for scale in TRAIN_SCALES if train else SCALES:
            size = (round(full.width * scale), round(full.height * scale))
            im = full if scale == 1.0 else full.resize(size, Image.Resampling.LANCZOS)
            for y in _positions(im.height, CROP_H, spacing):
                for x in _positions(im.width, CROP_W, spacing):
                    name = f"{Path(photo).stem}_s{round(scale * 100):03d}_x{x:04d}_y{y:04d}.jpg"
                    out.append((name, code, im.crop((x, y, x + CROP_W, y + CROP_H))))
    return out


def _write_if_changed(path: Path, data: bytes) -> None:
    # Unchanged files are left alone, so concurrent --part runs never rewrite each other's.
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)


def materialize(folder: Path) -> Path:
    """Write the demo crops and their partition file into ``folder`` (idempotent); return it."""
    folder.mkdir(parents=True, exist_ok=True)
    # A killed or failed earlier run's half-written crop would be listed as a source image.
    for leftover in folder.glob("*.partial"):
        leftover.unlink()
    lines = []
    for name, code, im in crops():
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=JPEG_QUALITY)
        _write_if_changed(folder / name, buf.getvalue())
        lines.append(f"{name} {code}\n")
    # Crops an earlier version of this list wrote (the folder is the builder's own): they would
    # be reported as skipped source files, unlisted in the partition file.
    listed = {line.split()[0] for line in lines}
    for stale in folder.glob("*.jpg"):
        if stale.name not in listed:
            stale.unlink()
    _write_if_changed(folder / PARTITION_FILE, "".join(lines).encode())
    return folder
