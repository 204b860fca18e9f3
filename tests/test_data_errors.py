"""Broken shard folders give a ShardError naming the file at fault, fast: never a hang or a skip."""

from __future__ import annotations

import shutil

import pytest

from deblur.loading.contract import ShardError, index_rows
from deblur.loading.loader import make_loader

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.timeout(120)  # a hang fails instead of blocking CI


@pytest.fixture
def shards(tiny_shards, tmp_path):
    """A private copy of the tiny dataset that a test may damage."""
    return shutil.copytree(tiny_shards, tmp_path / "shards")


def read_all(shards, backend, split="train"):
    for _ in make_loader(shards, split, batch_size=2, backend=backend, num_workers=2):
        pass


def member(shards, shard_name, sample, ext):
    """(offset, size, name) of one member, from the shard's index."""
    return index_rows((shards / shard_name).with_suffix(".idx"))[sample][ext]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_split(shards, backend):
    for path in shards.glob("val-*"):
        path.unlink()
    with pytest.raises(ShardError, match=rf"no shards for split 'val' in {shards}"):
        read_all(shards, backend, "val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_all(shards / "nowhere", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_index(shards, backend):
    (shards / "train-000001.idx").unlink()
    with pytest.raises(ShardError, match=r"missing index .*train-000001\.idx .*train-000001\.tar"):
        read_all(shards, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_tar(shards, backend):
    tar = shards / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard .*train-000001\.tar is truncated"):
        read_all(shards, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_member(shards, backend):
    """Bytes of one JPEG overwritten in place (same size, so the index still matches)."""
    offset, size, name = member(shards, "train-000002.tar", 1, "sharp.jpg")
    with open(shards / "train-000002.tar", "r+b") as tar:
        tar.seek(offset)
        tar.write(bytes(size))
    with pytest.raises(ShardError, match=rf"shard .*train-000002\.tar member {name}"):
        read_all(shards, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tar_headers_are_not_needed(shards, backend):
    """Both backends read members at their index offsets, which find_shards checked against the
    tar: a damaged header in front of a member's data changes nothing."""
    offset, _, _ = member(shards, "train-000000.tar", 0, "blur.jpg")
    tar = shards / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[offset - 512 + 148: offset - 512 + 156] = b"garbage!"  # the header's checksum field
    tar.write_bytes(bytes(data))
    read_all(shards, backend)
