"""The shard builder end to end: contract, read-back with webdataset and DALI, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deblur.errors import InputError
from deblur.shard.blur import apply_blur
from deblur.shard.build import build_shards
from deblur.shard.format import SPLITS
from deblur.shard.settings import BuildSettings
from tests.conftest import TINY_IMAGES, TINY_SHARD_SIZE


def all_shards(root: Path) -> list[Path]:
    return sorted(root.glob("*-??????.tar"))


def test_tiny_shards_follow_the_contract(tiny_shards: Path):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["samples"] == TINY_IMAGES and manifest["skipped"] == []
    names = set()
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"])
        for n, shard in enumerate(entry["shards"]):
            assert shard["name"] == f"{split}-{n:06d}.tar"
            assert 0 < shard["samples"] <= TINY_SHARD_SIZE
            assert (tiny_shards / shard["name"]).with_suffix(".idx").is_file()
            names.add(shard["name"])
    assert names == {p.name for p in all_shards(tiny_shards)}


def test_read_back_with_webdataset(tiny_shards: Path):
    import webdataset as wds

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    seen, errors, changes = {}, [], []
    for split in SPLITS:
        urls = [str(tiny_shards / s["name"]) for s in manifest["splits"][split]["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            assert meta["split"] == split and meta["key"] == sample["__key__"]
            assert "." not in meta["key"]
            sharp = np.asarray(Image.open(io.BytesIO(sample["sharp.jpg"])))
            blurred = np.asarray(Image.open(io.BytesIO(sample["blur.jpg"])))
            assert sharp.shape == blurred.shape == (meta["size"][1], meta["size"][0], 3)
            # The stored blur params rebuild the blur that was applied (up to JPEG loss).
            rebuilt = apply_blur(sharp, meta["blur"]).astype(float)
            errors.append(np.abs(rebuilt - blurred).mean())
            changes.append(np.abs(sharp.astype(float) - blurred).mean())
            seen[meta["key"]] = meta
    assert len(seen) == TINY_IMAGES
    assert max(errors) < 3.0 and np.mean(errors) < 0.3 * np.mean(changes)
    kinds = {m["blur"]["type"] for m in seen.values()}
    assert kinds == {"gaussian", "motion"}


def test_read_back_with_dali_cpu(tiny_shards: Path):
    from nvidia.dali import fn, pipeline_def

    train = sorted(str(p) for p in tiny_shards.glob("train-*.tar"))
    n = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["train"]["samples"]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        sharp, blurred, meta = fn.readers.webdataset(
            paths=train,
            index_paths=[p[:-4] + ".idx" for p in train],
            ext=["sharp.jpg", "blur.jpg", "json"],
            name="reader",
        )
        return (fn.decoders.image(sharp, device="cpu"), fn.decoders.image(blurred, device="cpu"), meta)

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == n
    keys = set()
    for _ in range((n + 3) // 4):
        sharp, blurred, meta = p.run()
        for i in range(len(sharp)):
            s, b = np.asarray(sharp[i]), np.asarray(blurred[i])
            m = json.loads(bytes(np.asarray(meta[i])))
            assert s.shape == b.shape == (m["size"][1], m["size"][0], 3)
            keys.add(m["key"])
    assert len(keys) == n


def test_same_build_twice_is_byte_identical_and_worker_count_free(tiny_photo_folder, tmp_path):
    a = build_shards(BuildSettings(src=tiny_photo_folder, out=tmp_path / "a", shard_size=16, workers=1, progress=False))
    b = build_shards(BuildSettings(src=tiny_photo_folder, out=tmp_path / "b", shard_size=16, workers=2, progress=False))
    assert a == b
    names = [p.name for p in all_shards(tmp_path / "a")]
    assert names == [p.name for p in all_shards(tmp_path / "b")]
    for name in names + ["manifest.json"] + [n[:-4] + ".idx" for n in names]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_missing_src_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="nope: not found"):
        build_shards(BuildSettings(src=tmp_path / "nope", out=tmp_path / "out", progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        build_shards(BuildSettings(src=tmp_path / "empty", out=tmp_path / "out", progress=False))
