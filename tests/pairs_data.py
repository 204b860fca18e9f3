"""Paired datasets made in the tests: frames of the demo photographs and a blur the builder does
not know (a defocus disk), in each layout the builder reads.

A *scene* is one photograph; its frames are windows sliding across it (consecutive frames
overlap, as a video's do), so a frame of one scene in the training split and its neighbour in
the test split would be a leak the split tests can see.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from deblur.bench.frames import disk_kernel  # a defocus disk: neither of the builder's blurs
from deblur.images import load_rgb
from deblur.shard.blur import apply_kernel

FRAME = (128, 96)  # (w, h): small, so builds and loaders stay fast; wider than tall, like GoPro's
SCENES = ("astronaut", "camera", "chelsea", "coffee", "motorcycle_left", "rocket")
FILES = {"rocket": "rocket.jpg"}  # the others are .png in skimage's data folder


def scene_frames(scene: str, n: int) -> list[np.ndarray]:
    """``n`` overlapping FRAME-sized RGB windows sliding across one demo photograph."""
    photo = load_rgb(Path(skimage.data.data_dir) / FILES.get(scene, f"{scene}.png"))
    w, h = FRAME
    # a frame covers about half the photograph: detail in every frame, overlap between neighbours
    scale = max(w * 2 / photo.width, h * 1.3 / photo.height)
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
    full = np.asarray(photo)
    xs = np.linspace(0, full.shape[1] - w, n).round().astype(int)
    ys = np.linspace(0, full.shape[0] - h, n).round().astype(int)
    return [full[y : y + h, x : x + w] for x, y in zip(xs, ys)]


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def frames(scenes: tuple[str, ...], per_scene: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{scene: [(sharp, blurred), ...]}: every frame blurred with a defocus disk of radius 2.5."""
    kernel = disk_kernel(2.5)
    return {s: [(f, apply_kernel(f, kernel)) for f in scene_frames(s, per_scene)] for s in scenes}


def two_trees(root: Path, scenes=SCENES[:4], per_scene: int = 4) -> tuple[Path, Path]:
    """``root/sharp/<scene>/<n>.png`` and ``root/blurred/<scene>/<n>.jpg`` (another extension),
    and two flat pairs in the top folders (each a scene of its own)."""
    sharp, blurred = root / "sharp", root / "blurred"
    for scene, pairs in frames(scenes, per_scene).items():
        for n, (s, b) in enumerate(pairs):
            write(sharp / scene / f"{n:04d}.png", encode(s, "PNG"))
            write(blurred / scene / f"{n:04d}.jpg", encode(b, "JPEG"))
    for n, (s, b) in enumerate(frames(("rocket",), 2)["rocket"]):
        write(sharp / f"flat{n}.png", encode(s, "PNG"))
        write(blurred / f"flat{n}.png", encode(b, "PNG"))
    return sharp, blurred


def gopro(root: Path, train=SCENES[:4], test=SCENES[4:], per_scene: int = 4) -> Path:
    """GoPro's layout: ``root/{train,test}/<scene>/{sharp,blur}/NNNNNN.png``, plus a
    ``blur_gamma/`` folder (GoPro_Large has one) that the builder must not read."""
    for split, scenes in (("train", train), ("test", test)):
        for scene, pairs in frames(scenes, per_scene).items():
            folder = root / split / f"GOPR_{scene}"
            for n, (s, b) in enumerate(pairs):
                write(folder / "sharp" / f"{n:06d}.png", encode(s, "PNG"))
                write(folder / "blur" / f"{n:06d}.png", encode(b, "PNG"))
                write(folder / "blur_gamma" / f"{n:06d}.png", encode(b, "PNG"))
    return root


def realblur(root: Path, train=SCENES[:4], test=SCENES[4:], per_scene: int = 3) -> tuple[Path, Path]:
    """RealBlur's layout: ``root/set/<scene>/{gt,blur}/*.png`` and a train and a test list of
    ``gt path blur path`` lines relative to ``root``."""
    lists = {}
    for name, scenes in (("train", train), ("test", test)):
        lines = []
        for scene, pairs in frames(scenes, per_scene).items():
            for n, (s, b) in enumerate(pairs):
                gt, blur = f"set/{scene}/gt/gt_{n}.png", f"set/{scene}/blur/blur_{n}.png"
                write(root / gt, encode(s, "PNG"))
                write(root / blur, encode(b, "PNG"))
                lines.append(f"{gt} {blur}\n")
        lists[name] = write(root / f"RealBlur_J_{name}_list.txt", "".join(lines).encode())
    return lists["train"], lists["test"]
