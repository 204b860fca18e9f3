"""Awkward and broken inputs: read by content, converted to 8-bit RGB, or skipped with a reason."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deblur.images import ImageError, decode_rgb, load_rgb
from deblur.shard.build import build_shards, main
from deblur.shard.check import check_jpeg
from deblur.shard.settings import BuildSettings
from tests.conftest import photo_crops
from tests.shard_damage import flip_entropy_bits


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees
    return exif


def flat(mode: str, color, size=(96, 80)) -> Image.Image:
    return Image.new(mode, size, color)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    """Good images in every awkward form, and every kind of broken file, with expectations."""
    root = tmp_path_factory.mktemp("messy")
    photos = photo_crops(6)
    jpeg = encode(photos[0], "JPEG", quality=90)
    palette = photos[4].convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = flat("RGBA", (255, 0, 0, 0))  # fully transparent red: must come out white
    rgba.paste((0, 0, 255, 255), (0, 0, 48, 80))  # left half opaque blue
    gray16 = Image.fromarray(np.full((80, 96), 32896, np.uint16))  # 32896 / 257 = 128
    files = {
        "plain.jpg": jpeg,
        "UPPER.JPG": encode(photos[1], "JPEG"),
        "png_named.jpg": encode(photos[2], "PNG"),
        "photo.webp": encode(photos[3], "WEBP", quality=90),
        "sub/dir/deep.jpeg": encode(photos[5], "JPEG"),
        "palette.png": encode(palette, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "gray16.png": encode(gray16, "PNG"),
        "rgb16.png": png16_rgb(np.dstack([np.full((80, 96), v, np.uint16) for v in (65535, 32896, 2570)])),
        "cmyk.jpg": encode(flat("CMYK", (0, 255, 255, 0)), "JPEG", quality=95),
        "gray.jpg": encode(photos[0].convert("L"), "JPEG"),
        "progressive.jpg": encode(photos[1], "JPEG", progressive=True),
        "rotated.jpg": encode(flat("RGB", (0, 200, 0), (120, 80)), "JPEG", exif=rotated_exif()),
        # broken or unusable
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        # decodes in PIL (to garbage), with only a libjpeg warning: the readers refuse it
        "corrupt.jpg": flip_entropy_bits(jpeg),
        "text.jpg": b"this is not an image\n",
        "notes.txt": b"hello\n",
        "small.jpg": encode(flat("RGB", (1, 2, 3), (40, 50)), "JPEG"),
        "bomb.png": encode(flat("RGB", (9, 9, 9), (400, 400)), "PNG"),
        "anim.gif": encode(flat("P", 3, (100, 100)), "GIF"),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".hidden.jpg").write_bytes(b"hidden files are not inputs")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    return root


SKIPPED = {
    "zero.jpg": "empty file",
    "truncated.jpg": "cannot decode",
    "corrupt.jpg": "corrupt JPEG data: Corrupt JPEG data",
    "text.jpg": "cannot decode",
    "notes.txt": "cannot decode",
    "small.jpg": "too small: 40x50",
    "bomb.png": "decompression bomb: 400x400",
    "anim.gif": "unsupported format: GIF",
    "dangling.jpg": "cannot read: No such file",
}


@pytest.fixture(scope="module")
def messy_build(messy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_out")
    # 150 000 px: the 400x400 "bomb" is over it, the photo crops (178x218) are under.
    manifest = build_shards(
        BuildSettings(
            src=messy_folder,
            out=out,
            val_fraction=0,
            test_fraction=0,
            shard_size=5,
            workers=2,
            progress=False,
            max_pixels=150_000,
        )
    )
    samples = {}
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return manifest, samples


def test_broken_files_are_skipped_with_reasons(messy_build):
    manifest, _ = messy_build
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(SKIPPED)
    for path, expected in SKIPPED.items():
        assert expected in reasons[path], (path, reasons[path])
    assert manifest["splits"]["val"]["shards"] == [] and manifest["splits"]["test"]["shards"] == []


def test_every_stored_member_passes_the_readers_check(messy_build):
    _, samples = messy_build
    for key, members in samples.items():
        for ext in ("sharp.jpg", "blur.jpg"):
            check_jpeg(members[ext], f"{key}.{ext}")  # raises on a libjpeg warning


def test_awkward_images_become_8bit_rgb(messy_build):
    _, samples = messy_build
    assert set(samples) == {
        "plain",
        "UPPER",
        "png_named",
        "photo",
        "sub_dir_deep",
        "palette",
        "rgba",
        "gray16",
        "rgb16",
        "cmyk",
        "gray",
        "progressive",
        "rotated",
    }

    def sharp(key):
        im = Image.open(io.BytesIO(samples[key]["sharp.jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB", key
        return np.asarray(im).astype(int)

    for key in samples:
        sharp(key)
    assert np.abs(sharp("gray16") - 128).max() <= 2  # scaled, not clipped to 255
    assert np.abs(sharp("rgb16")[40, 50] - [255, 128, 10]).max() <= 4
    assert np.abs(sharp("cmyk")[40, 50] - [255, 0, 0]).max() <= 8
    assert np.abs(sharp("rgba")[40, 20] - [0, 0, 255]).max() <= 8  # opaque blue kept
    assert np.abs(sharp("rgba")[40, 80] - [255, 255, 255]).max() <= 8  # transparent -> white
    assert sharp("rotated").shape == (120, 80, 3)  # EXIF orientation applied: now portrait
    for key, meta in ((k, json.loads(s["json"])) for k, s in samples.items()):
        assert meta["key"] == key
        assert meta["sharp_reencoded"] == (key not in ("plain", "UPPER", "sub_dir_deep")), key


def test_baseline_rgb_jpeg_is_stored_byte_for_byte(messy_folder, messy_build):
    _, samples = messy_build
    assert samples["plain"]["sharp.jpg"] == (messy_folder / "plain.jpg").read_bytes()
    assert samples["sub_dir_deep"]["sharp.jpg"] == (messy_folder / "sub/dir/deep.jpeg").read_bytes()


def test_load_rgb_names_the_file(messy_folder):
    assert load_rgb(messy_folder / "png_named.jpg").mode == "RGB"
    with pytest.raises(ImageError, match="truncated.jpg: cannot decode"):
        load_rgb(messy_folder / "truncated.jpg")
    with pytest.raises(ImageError, match="missing.jpg: cannot read"):
        load_rgb(messy_folder / "missing.jpg")
    with pytest.raises(ImageError, match="x.png: decompression bomb: 400x400 exceeds the 1000-p"):
        decode_rgb((messy_folder / "bomb.png").read_bytes(), "x.png", max_pixels=1000)


def test_no_usable_image_is_an_error_with_nonzero_exit(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.jpg").write_bytes(b"nope")
    assert main(["--src", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no usable images" in capsys.readouterr().err
    assert main(["--src", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "absent" in capsys.readouterr().err


def test_key_collisions_stay_unique(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    im = photo_crops(1)[0]
    for rel in ("a/b.jpg", "a_b.jpg", "a/b.png", "c.d.jpg"):
        (src / rel).write_bytes(encode(im, "PNG" if rel.endswith("png") else "JPEG"))
    manifest = build_shards(
        BuildSettings(src=src, out=tmp_path / "out", val_fraction=0, test_fraction=0, workers=1, progress=False)
    )
    with tarfile.open(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["name"]) as t:
        metas = [json.loads(t.extractfile(m).read()) for m in t if m.name.endswith(".json")]
    keys = {m["source"]: m["key"] for m in metas}
    assert len(set(keys.values())) == 4 and keys["c.d.jpg"] == "c_d"
    assert all("." not in k for k in keys.values())
