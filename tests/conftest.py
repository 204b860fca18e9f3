"""Shared fixtures: small folders of real photographs and a tiny built shard dataset.

``tiny_shards`` (session-scoped) is the one other modules' tests should use: a Path to a
dataset built with ``build_shards`` from 48 demo-photo crops, shard_size 8, so train has
several shards and val and test are non-empty.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from deblur.shard import demo
from deblur.shard.build import build_shards
from deblur.shard.settings import BuildSettings

TINY_IMAGES = 48
TINY_SHARD_SIZE = 8
SMALL_STORE_SIZE = 64
TINY_OPTIONS = dict(seed=0, val_fraction=0.2, test_fraction=0.2, shard_size=TINY_SHARD_SIZE, workers=1, progress=False)


def photo_crops(n: int) -> list[Image.Image]:
    """``n`` CelebA-sized (178x218) RGB crops of real photographs, spread over all demo photos."""
    crops = demo.crops()
    step = len(crops) / n
    return [crops[int(i * step)][2] for i in range(n)]


def write_photo_folder(folder: Path, n: int, *, quality: int = 95) -> list[Path]:
    """Write ``n`` photo crops as ``img_NNN.jpg`` into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(photo_crops(n)):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        path = folder / f"img_{i:03d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every published file of a dataset (tars, idx, manifest), by name."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_photos")
    write_photo_folder(folder, TINY_IMAGES)
    return folder


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_photo_folder) -> Path:
    """A built dataset: ~48 samples, several train shards of <= 8, non-empty val and test."""
    out = tmp_path_factory.mktemp("tiny_shards")
    manifest = build_shards(BuildSettings(src=tiny_photo_folder, out=out, **TINY_OPTIONS))
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    assert manifest["splits"]["val"]["samples"] > 0 and manifest["splits"]["test"]["samples"] > 0
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, tiny_photo_folder) -> Path:
    """``tiny_shards``' build with both members stored downscaled (``--store-size 64``)."""
    out = tmp_path_factory.mktemp("small_shards")
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, store_size=SMALL_STORE_SIZE, **TINY_OPTIONS))
    return out


@pytest.fixture(scope="session")
def paired_shards(tmp_path_factory) -> Path:
    """A GoPro-layout dataset of real pairs (tests/pairs_data.py: 128x96 frames of the demo
    photographs, defocus-blurred): 4 training scenes (one becomes val) and 2 test scenes of 4
    frames, shards of 4, built at full size as patch training reads them."""
    import pairs_data

    root = pairs_data.gopro(tmp_path_factory.mktemp("gopro_src"))
    out = tmp_path_factory.mktemp("paired_shards")
    manifest = build_shards(
        BuildSettings(gopro=root, out=out, seed=0, val_fraction=0.25, shard_size=4, workers=1, progress=False)
    )
    assert manifest["scenes"] == {"train": 3, "val": 1, "test": 2}
    return out
