"""Broken shard folders give a ShardError naming the file at fault, fast: never a hang or a skip."""

from __future__ import annotations

import json
import shutil

import pytest
from shard_damage import corrupt_member, edit_manifest, member, reseal

from deblur.loading.contract import RankPart, find_shards
from deblur.loading.loader import make_loader
from deblur.shard.format import ShardError

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.timeout(120)  # a hang fails instead of blocking CI


@pytest.fixture
def shards(tiny_shards, tmp_path):
    """A private copy of the tiny dataset that a test may damage."""
    return shutil.copytree(tiny_shards, tmp_path / "shards")


def read_all(shards, backend, split="train"):
    for _ in make_loader(shards, split, batch_size=2, backend=backend, num_workers=2):
        pass


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
    with pytest.raises(ShardError, match=r"nowhere: shard folder not found"):
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_member_libjpeg_only_warns_about_is_refused_up_front(shards, backend):
    """Bits flipped in a member's entropy-coded data: libjpeg decodes garbage and only warns.
    Both backends refuse the member when the loader is made, naming shard and member, also
    after the manifest's sha256s were edited to match (make_loader never trusts the hashes)."""
    name = corrupt_member(shards, "train-000001.tar", 2, "blur.jpg")
    reseal(shards)
    expected = rf"^cannot decode shard {shards / 'train-000001.tar'} member {name}: Corrupt JPEG data"
    with pytest.raises(ShardError, match=expected):
        make_loader(shards, "train", batch_size=2, backend=backend, num_workers=2)
    # one rank's part does not hold that shard: its loader is made and reads its whole part
    world = 3
    owners = [r for r in range(world) if any(s.tar.name == "train-000001.tar" for s in owned(shards, r, world))]
    others = [r for r in range(world) if r not in owners]
    assert others, "every rank's part holds train-000001.tar; pick another shard"
    read_all_part = make_loader(shards, "train", batch_size=1, backend=backend, rank=others[0], world_size=world)
    assert len(list(read_all_part)) == len(read_all_part) > 0


def owned(shards, rank, world):
    """The shards whose samples rank ``rank`` of ``world`` reads."""
    part = RankPart(find_shards(shards, "train"), rank, world, 1)
    return {shard for shard, _ in part.rows()}


def test_dali_itself_decodes_such_a_member_without_an_error(shards):
    """Why the loader checks members itself: DALI's decoder returns the garbage pixels (on the
    GPU as on the CPU it has no option to fail on libjpeg's warnings)."""
    from deblur.loading.contract import PairOptions
    from deblur.loading.dali_graph import pair_pipeline

    corrupt_member(shards, "train-000000.tar", 0, "sharp.jpg")
    part = RankPart(find_shards(shards, "train"), 0, 1, 2)
    pipe = pair_pipeline(part, PairOptions(64, 0, False, False), gpu=False, batch_size=2, num_threads=1, device_id=None)
    pipe.build()
    blurred, sharp = pipe.run()
    assert sharp.as_tensor().shape()[0] == 2  # decoded, no exception


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m["splits"]["train"]["shards"][1].update(samples=9),
            r"splits\.train\.samples: 22, but its shards hold 23",
        ),
        (
            lambda m: (m["splits"]["train"]["shards"][1].update(samples=9), m["splits"]["train"].update(samples=23)),
            r"splits\.train\.shards\[1\]\.samples is 9 but .*train-000001\.idx lists 8 samples",
        ),
        (
            lambda m: m["splits"]["train"]["shards"][0].update(name="../train-000000.tar"),
            r"splits\.train\.shards\[0\]\.name: '\.\./train-000000\.tar' is not a shard of this folder",
        ),
        (lambda m: m["splits"].pop("val"), r"splits\.val: expected an object, got NoneType"),
    ],
)
def test_a_manifest_that_disagrees_with_its_files_is_named(shards, edit, message):
    edit_manifest(shards, edit)
    with pytest.raises(ShardError, match=message):
        make_loader(shards, "train", batch_size=2, backend="torch", num_workers=1)
