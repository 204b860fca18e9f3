"""deblur.shard.check: the dataset check the trainer runs before step 1, and what it names.

Every damage is done to a private copy of the tiny dataset; each check must leave every file
as it was (it only reads)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from cli_checks import error_line, files, run
from shard_damage import corrupt_member, edit_manifest, reseal

from deblur.shard.check import check_dataset
from deblur.shard.format import MANIFEST, ShardError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def shards(tiny_shards, tmp_path):
    return shutil.copytree(tiny_shards, tmp_path / "shards")


def manifest_of(shards):
    return json.loads((shards / MANIFEST).read_text())


def test_a_sound_dataset_passes_and_processes_share_the_work(shards, capsys):
    manifest = manifest_of(shards)
    listed = sum(len(split["shards"]) for split in manifest["splits"].values())
    images = 2 * (manifest["splits"]["val"]["samples"] + manifest["splits"]["test"]["samples"])
    summary = check_dataset(shards)
    assert summary.startswith(f"checked {shards}: {listed} shards, ")
    assert f"{images} val/test members decoded" in summary
    assert capsys.readouterr().out.strip() == summary  # printed once, with progress on
    shares = [check_dataset(shards, rank=r, world_size=3, progress=False) for r in range(3)]
    assert capsys.readouterr().out == ""
    counts = [int(s.split(": ")[1].split(" shards")[0]) for s in shares]
    assert sum(counts) == listed and all(counts)
    assert all(f"(process {r} of 3: {counts[r]} of {listed} shards)" in s for r, s in enumerate(shares))


def truncate(shards):
    text = (shards / MANIFEST).read_text()
    (shards / MANIFEST).write_text(text[: len(text) // 2])


def set_entry(split, i, **values):
    return lambda m: m["splits"][split]["shards"][i].update(values)


@pytest.mark.parametrize(
    "damage, key_and_problem",
    [
        (truncate, "not valid JSON ("),
        (lambda s: (s / MANIFEST).write_text("[1, 2]"), "top level: expected an object, got list"),
        (
            lambda s: edit_manifest(s, set_entry("train", 0, name="../train-000000.tar")),
            "splits.train.shards[0].name: '../train-000000.tar' is not a shard of this folder",
        ),
        (
            lambda s: edit_manifest(s, set_entry("val", 0, name="/etc/val-000000.tar")),
            "splits.val.shards[0].name: '/etc/val-000000.tar' is not a shard of this folder",
        ),
        (
            lambda s: edit_manifest(s, set_entry("test", 1, sha256="0" * 64)),
            "splits.test.shards[1].sha256: is zeroed, not the digest of a file",
        ),
        (
            lambda s: edit_manifest(s, set_entry("test", 0, sha256="abc")),
            "splits.test.shards[0].sha256: not a sha256 hex digest: 'abc'",
        ),
        (
            lambda s: edit_manifest(
                s,
                lambda m: (
                    m["splits"]["train"]["shards"][0].update(samples=7),
                    m["splits"]["train"].update(samples=21),
                ),
            ),
            "splits.train.shards[0].samples is 7 but",
        ),
    ],
)
def test_a_damaged_manifest_is_one_error_naming_the_file_and_key(shards, damage, key_and_problem):
    damage(shards)
    before = files(shards)
    with pytest.raises(ShardError) as raised:
        check_dataset(shards, progress=False)
    assert str(raised.value).startswith(f"{shards / MANIFEST}: {key_and_problem}"), str(raised.value)
    assert files(shards) == before


def test_changed_shards_and_indexes_fail_their_sha256(shards):
    """A tar or index that differs from the build (same size, so the index check passes) is
    caught by hashing; the index's hash only where the manifest records one."""
    corrupt_member(shards, "train-000002.tar", 0, "sharp.jpg")
    with pytest.raises(
        ShardError,
        match=r"train-000002\.tar: sha256 [0-9a-f]{16}\.\.\. differs from .*manifest\.json "
        r"splits\.train\.shards\[2\]\.sha256",
    ):
        check_dataset(shards, progress=False)
    reseal(shards)
    check_dataset(shards, progress=False, decode=())  # hashes match again; train members are the loaders' to decode
    edit_manifest(shards, set_entry("val", 0, index_sha256="1" * 64))
    with pytest.raises(ShardError, match=r"val-000000\.idx: sha256 .* splits\.val\.shards\[0\]\.index_sha256"):
        check_dataset(shards, progress=False)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "val-000000.tar").unlink(), r"val-000000\.tar: listed in .*manifest\.json but missing"),
        (lambda s: (s / "test-000001.idx").unlink(), r"missing index .*test-000001\.idx for shard"),
        (
            lambda s: (s / "test-000001.idx").write_bytes(b"\x89PNG\x00\xff"),
            r"test-000001\.idx: not a wds2idx v1\.2 index",
        ),
        (lambda s: (s / "train-000000.idx").write_text("v1.2 8\njpg 0 10\n"), r"train-000000\.idx: header says 8"),
    ],
)
def test_missing_or_garbage_files_are_named(shards, damage, message):
    damage(shards)
    with pytest.raises(ShardError, match=message):
        check_dataset(shards, progress=False)


def test_a_corrupt_val_member_is_named_even_when_the_manifest_was_edited_to_match(shards):
    name = corrupt_member(shards, "val-000001.tar", 1, "blur.jpg")
    reseal(shards)
    with pytest.raises(ShardError, match=rf"^cannot decode shard {shards / 'val-000001.tar'} member {name}: Corrupt"):
        check_dataset(shards, progress=False)


TRAIN = """
import sys
from deblur.errors import run_main
from deblur.training.config import load_config
from deblur.training.loop import train
sys.exit(run_main(lambda: train(load_config(sys.argv[1], sys.argv[2:])) and 0))
"""


def test_the_trainer_stops_before_step_one_on_a_corrupt_val_member(shards, tmp_path):
    """Found at start, not at the first validation: nothing is written, no step is lost."""
    name = corrupt_member(shards, "val-000000.tar", 0, "sharp.jpg")
    reseal(shards)
    before = files(shards)
    out = tmp_path / "run"
    overrides = [f"data.shards={shards}", f"output_dir={out}", "wandb.mode=disabled", "data.workers=1"]
    result = run([sys.executable, "-c", TRAIN, "configs/demo.yaml", *overrides], timeout=120)
    line = error_line(result, 2, alone=False)
    assert line.startswith(f"error: cannot decode shard {shards / 'val-000000.tar'} member {name}: Corrupt JPEG data")
    # The run claimed output_dir (its lock comes first) and wrote nothing else.
    assert [p.name for p in out.iterdir()] == ["trainer.lock"] and files(shards) == before
