"""Broken shard folders give a ShardError naming the file at fault, fast: never a hang or a skip."""

from __future__ import annotations

import json
import shutil

import pytest

from deblur.loading.loader import make_loader
from deblur.shard.format import ShardError, index_path, index_rows

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
    return index_rows(index_path(shards / shard_name))[sample][ext]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_split(shards, backend):
    """The manifest says which shards a split has: a listed shard that is gone, a split it lists
    none for, and a folder without a manifest are all errors naming what is missing."""
    for path in shards.glob("val-*"):
        path.unlink()
    with pytest.raises(ShardError, match=r"val-000000\.tar: listed in .*manifest\.json but missing"):
        read_all(shards, backend, "val")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"] = {"shards": [], "samples": 0}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=rf"no shards for split 'val' in {shards} \(manifest\.json lists none\)"):
        read_all(shards, backend, "val")
    (shards / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"manifest\.json: not found"):
        read_all(shards, backend)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_all(shards / "nowhere", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_shards_the_manifest_lists_are_read(shards, backend):
    """A stray tar that follows the naming pattern but is not in the manifest is not read."""
    stray = shards / "train-000099.tar"
    shutil.copy(shards / "train-000000.tar", stray)
    shutil.copy(shards / "train-000000.idx", shards / "train-000099.idx")
    loader = make_loader(shards, "train", batch_size=2, backend=backend, num_workers=1)
    assert stray.name not in loader.state_dict()["settings"]["shards"]


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
    data[offset - 512 + 148 : offset - 512 + 156] = b"garbage!"  # the header's checksum field
    tar.write_bytes(bytes(data))
    read_all(shards, backend)
