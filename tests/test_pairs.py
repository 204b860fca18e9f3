"""The builder on paired sources (real blur): each layout, pairing problems, splits by scene, and
every guarantee of the sharp-only build (byte-identical rebuilds, --part, resume, --verify,
--store-size, odd image modes, the json of a real pair).

The pairs are made here (tests/pairs_data.py): frames sliding across the demo photographs,
blurred with a defocus disk, a blur the builder does not know.
"""

from __future__ import annotations

import io
import json
import posixpath
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pairs_data
from PIL import Image

from deblur.images import load_rgb
from deblur.shard.build import build_shards, main
from deblur.shard.format import BLURRED, META, SHARP, SPLITS, read_samples
from deblur.shard.settings import BuildSettings
from deblur.shard.verify import verify
from tests.conftest import dataset_files

OPTS = dict(seed=1, val_fraction=0.2, test_fraction=0.2, shard_size=4, workers=1, progress=False)


def samples(out: Path) -> list[tuple[str, dict, np.ndarray, np.ndarray]]:
    """(split, json, sharp pixels, blurred pixels) of every sample of a built dataset."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = []
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            for _, members in read_samples(out / shard["name"]):
                pixels = [np.asarray(Image.open(io.BytesIO(members[ext])), dtype=float) for ext in (SHARP, BLURRED)]
                found.append((split, json.loads(members[META]), *pixels))
    return found


def stored_error(pixels: np.ndarray, source: Path, size: tuple[int, int]) -> float:
    """Mean difference of a member from its source file as the builder stores it: the source
    itself (its bytes kept) or its quality-95 JPEG, at the stored size."""
    image = load_rgb(source)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=95, subsampling="4:2:0")
    return min(np.abs(pixels - np.asarray(im, dtype=float)).mean() for im in (image, Image.open(encoded)))


def check_pairs(out: Path, sharp_root: Path, blurred_root: Path, scene_of) -> dict[str, set[str]]:
    """Every sample is a real pair whose members are its two sources; returns {scene: splits}."""
    scenes, detail = defaultdict(set), np.zeros(2)
    for split, meta, sharp, blurred in samples(out):
        assert meta["blur"] == {"type": "real"} and meta["split"] == split
        assert sharp.shape == blurred.shape == (meta["size"][1], meta["size"][0], 3)
        for pixels, path in ((sharp, sharp_root / meta["source"]), (blurred, blurred_root / meta["blurred_source"])):
            assert stored_error(pixels, path, tuple(meta["size"])) < 0.5, path
        detail += [np.abs(np.diff(image, axis=1)).mean() for image in (sharp, blurred)]
        scenes[scene_of(meta)].add(split)
    assert detail[1] < 0.7 * detail[0]  # the blurred members are the blurred ones: the disk took out detail
    assert verify(out, progress=False) == []
    return scenes


def test_each_layout_pairs_by_name_and_keeps_scenes_whole(tmp_path, capsys):
    # Two trees, the extension differing, with every pairing problem the builder must name.
    sharp, blurred = pairs_data.two_trees(tmp_path / "trees")
    shutil.copy(sharp / "astronaut" / "0000.png", sharp / "astronaut" / "extra.png")  # no blurred partner
    shutil.copy(blurred / "camera" / "0000.jpg", blurred / "camera" / "lonely.jpg")  # no sharp partner
    Image.open(blurred / "camera" / "0001.jpg").crop((0, 0, 120, 96)).save(blurred / "camera" / "0001.jpg")
    (blurred / "chelsea" / "0002.jpg").write_bytes(b"not an image")
    shutil.copy(blurred / "coffee" / "0000.jpg", blurred / "coffee" / "0000.webp")  # two candidates
    # odd modes are converted as for --src: an RGBA sharp image, a greyscale blurred one
    Image.open(sharp / "astronaut" / "0001.png").convert("RGBA").save(sharp / "astronaut" / "0001.png")
    Image.open(blurred / "astronaut" / "0002.jpg").convert("L").save(blurred / "astronaut" / "0002.jpg")
    trees = tmp_path / "out_trees"
    assert main(["--sharp", str(sharp), "--blurred", str(blurred), "--out", str(trees), "--workers", "1"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    manifest = json.loads((trees / "manifest.json").read_text())
    assert {s["path"]: s["reason"].split(":")[0] for s in manifest["skipped"]} == {
        "astronaut/extra.png": "no blurred partner",
        "camera/lonely.jpg": "no sharp partner",
        "camera/0001.png": "sizes differ",
        "chelsea/0002.png": "cannot decode",
        "coffee/0000.png": "ambiguous partner",
        "coffee/0000.jpg": "ambiguous partner",
        "coffee/0000.webp": "ambiguous partner",
    }
    assert "(the blurred image chelsea/0002.jpg)" in str(manifest["skipped"])
    counted = summary.split("7 files skipped (")[1].split(")")[0].split(", ")
    assert sorted(counted) == sorted(
        ["ambiguous partner 3", "no blurred partner 1", "no sharp partner 1", "sizes differ 1", "cannot decode 1"]
    ), summary
    assert manifest["samples"] == 4 * 4 + 2 - 3 and manifest["blur"]["type"] == "real"  # 3 pairs lost
    scenes = check_pairs(trees, sharp, blurred, lambda meta: posixpath.dirname(meta["source"]) or meta["source"])
    assert all(len(splits) == 1 for splits in scenes.values()), scenes  # no scene in two splits
    assert {s for splits in scenes.values() for s in splits} == set(SPLITS)

    # GoPro: test/ is the test split, val comes from whole train/ scenes, blur_gamma/ is not read.
    gopro = pairs_data.gopro(tmp_path / "gopro", train=pairs_data.SCENES[:5], test=pairs_data.SCENES[5:])
    out = tmp_path / "out_gopro"
    manifest = build_shards(BuildSettings(gopro=gopro, out=out, **OPTS))
    scenes = check_pairs(out, gopro, gopro, lambda meta: meta["source"].split("/sharp/")[0])
    assert scenes == {
        "test/GOPR_rocket": {"test"},
        **{f"train/GOPR_{s}": scenes[f"train/GOPR_{s}"] for s in pairs_data.SCENES[:5]},
    }
    assert manifest["scenes"] == {"train": 4, "val": 1, "test": 1}
    assert {split for s in pairs_data.SCENES[:5] for split in scenes[f"train/GOPR_{s}"]} == {"train", "val"}
    assert all("/blur/" in meta["blurred_source"] for _, meta, _, _ in samples(out))

    # RealBlur's lists: the test list is the test split, scenes are the folder both paths share.
    train_list, test_list = pairs_data.realblur(tmp_path / "realblur")
    out = tmp_path / "out_realblur"
    build_shards(BuildSettings(pairs=train_list, test_pairs=test_list, out=out, **OPTS))
    scenes = check_pairs(out, train_list.parent, train_list.parent, lambda meta: meta["source"].split("/gt/")[0])
    assert {scene: splits for scene, splits in scenes.items() if "test" in splits} == {
        f"set/{s}": {"test"} for s in pairs_data.SCENES[4:]
    }
    assert all(len(splits) == 1 for splits in scenes.values())


def test_paired_builds_keep_the_builders_guarantees(tmp_path, capsys):
    sharp, blurred = pairs_data.two_trees(tmp_path / "trees")
    options = dict(sharp=sharp, blurred=blurred, **OPTS)
    reference = tmp_path / "reference"
    build_shards(BuildSettings(out=reference, **options))
    files = dataset_files(reference)

    # byte-identical whatever the worker count, and from parts
    build_shards(BuildSettings(out=tmp_path / "two", **options | {"workers": 2}))
    assert dataset_files(tmp_path / "two") == files
    for part in ((0, 2), (1, 2)):
        build_shards(BuildSettings(out=tmp_path / "parts", part=part, **options))
    assert dataset_files(tmp_path / "parts") == files

    # resume: only what is missing is built, and the result is the same
    (reference / "train-000001.tar").unlink()
    capsys.readouterr()
    build_shards(BuildSettings(out=reference, **options))
    assert "resuming:" in capsys.readouterr().err and dataset_files(reference) == files

    # a changed blurred partner is a changed input: its shard is rebuilt, the others are kept
    changed = blurred / "camera" / "0000.jpg"
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=90)
    build_shards(BuildSettings(out=reference, **options))
    rebuilt = [name for name, data in dataset_files(reference).items() if files.get(name) != data]
    assert "manifest.json" in rebuilt and 1 <= len([n for n in rebuilt if n.endswith(".tar")]) <= 2

    # --store-size: both members stored smaller, the sizes recorded; --verify agrees
    small = tmp_path / "small"
    build_shards(BuildSettings(out=small, store_size=80, **options))
    metas = [meta for _, meta, _, _ in samples(small)]
    assert {tuple(m["size"]) for m in metas} == {(107, 80)} and {tuple(m["source_size"]) for m in metas} == {(128, 96)}
    assert verify(small, progress=False) == []
