"""Ways to damage a copy of a built shard folder, for the tests of what readers do about it."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from deblur.shard.format import MANIFEST, index_path, index_rows


def member(shards: Path, shard_name: str, sample: int, ext: str) -> tuple[int, int, str]:
    """(offset, size, name) of one member, from the shard's index."""
    return index_rows(index_path(shards / shard_name))[sample][ext]


def read_member(shards: Path, shard_name: str, sample: int, ext: str) -> bytes:
    offset, size, _ = member(shards, shard_name, sample, ext)
    with open(shards / shard_name, "rb") as tar:
        tar.seek(offset)
        return tar.read(size)


def replace_member(shards: Path, shard_name: str, sample: int, ext: str, data: bytes) -> str:
    """Overwrite one member's bytes in place (same size, so the index still matches); its name."""
    offset, size, name = member(shards, shard_name, sample, ext)
    assert len(data) == size
    with open(shards / shard_name, "r+b") as tar:
        tar.seek(offset)
        tar.write(data)
    return name


def flip_entropy_bits(jpeg: bytes) -> bytes:
    """The JPEG with a few bits flipped inside its entropy-coded data: libjpeg decodes it to
    garbage with only a "Corrupt JPEG data" warning, which PIL ignores and simplejpeg's strict
    mode raises (both are checked, so the damage is always of that kind)."""
    sos = jpeg.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    for seed in range(100):
        damaged = bytearray(jpeg)
        for position in np.random.default_rng(seed).integers(start + 64, len(jpeg) - 8, 5):
            if damaged[position] != 0xFF and damaged[position - 1] != 0xFF:  # keep markers intact
                damaged[position] ^= 0x10
        try:
            simplejpeg.decode_jpeg(bytes(damaged))
        except ValueError as error:
            if "Corrupt JPEG data" in str(error):
                with Image.open(io.BytesIO(bytes(damaged))) as image:
                    image.load()  # PIL (and DALI) decode it without complaint
                return bytes(damaged)
    raise AssertionError("no bit flips found that libjpeg only warns about")


def corrupt_member(shards: Path, shard_name: str, sample: int, ext: str) -> str:
    """Flip entropy-coded bits of one JPEG member (see flip_entropy_bits); return its name."""
    return replace_member(
        shards, shard_name, sample, ext, flip_entropy_bits(read_member(shards, shard_name, sample, ext))
    )


def edit_manifest(shards: Path, edit) -> None:
    path = shards / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def reseal(shards: Path) -> None:
    """Make the manifest's sha256s match the (damaged) files again: what someone who edited the
    shards and then the manifest would leave behind."""

    def rehash(manifest):
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                entry["sha256"] = hashlib.sha256((shards / entry["name"]).read_bytes()).hexdigest()
                if "index_sha256" in entry:
                    idx = index_path(shards / entry["name"])
                    entry["index_sha256"] = hashlib.sha256(idx.read_bytes()).hexdigest()

    edit_manifest(shards, rehash)
