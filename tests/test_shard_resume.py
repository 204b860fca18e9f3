"""Killed builds, resuming, --part, --verify, and the idx files against DALI's own wds2idx."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deblur import files
from deblur.shard import build as shard_module
from deblur.shard.build import build_shards, main
from deblur.shard.settings import BuildSettings
from deblur.shard.verify import verify
from tests.conftest import dataset_files
from tests.shard_damage import corrupt_member

ENV = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
OPTS = dict(seed=3, val_fraction=0.2, test_fraction=0.2, shard_size=6, workers=1, progress=False)


@pytest.fixture(scope="module")
def reference(tiny_photo_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, **OPTS))
    return out


def test_idx_matches_dalis_wds2idx(tiny_shards: Path, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # ships with the DALI wheel
    for tar in sorted(tiny_shards.glob("*.tar")):
        ours = tar.with_suffix(".idx").read_text()
        with wds2idx.IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert ours == (tmp_path / "ref.idx").read_text(), tar.name


def test_resume_after_kill_finishes_identically(tiny_photo_folder, reference, tmp_path, capsys):
    out = tmp_path / "out"
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, **OPTS))
    # A kill mid-build: one shard never published, one caught while writing, no manifest.
    (out / "train-000001.tar").unlink()
    (out / "train-000002.tar").rename(out / "train-000002.tar.partial")
    (out / "manifest.json").unlink()
    untouched = (out / "train-000000.tar").stat().st_mtime_ns
    capsys.readouterr()
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, **OPTS))
    assert "resuming:" in capsys.readouterr().err
    assert (out / "train-000000.tar").stat().st_mtime_ns == untouched  # not rebuilt
    assert dataset_files(out) == dataset_files(reference)


def test_kill_while_publishing_leaves_no_complete_looking_tar(tiny_photo_folder, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_replace, published = files.os.replace, []

    def dying_replace(src, dst):
        if str(dst).endswith(".tar"):
            if len(published) == 2:
                raise KeyboardInterrupt("killed")  # the process dies between write and rename
            published.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        build_shards(BuildSettings(src=tiny_photo_folder, out=out, **OPTS))
    monkeypatch.setattr(files.os, "replace", real_replace)
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert len(tars) == 2 and not (out / "manifest.json").exists()
    assert not list(out.glob("*.partial"))  # the interrupted write cleaned up after itself
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, **OPTS))
    assert dataset_files(out) == dataset_files(reference)


def test_changed_settings_rebuild_everything(tiny_photo_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, **OPTS))
    fresh = tmp_path / "fresh"
    build_shards(BuildSettings(src=tiny_photo_folder, out=fresh, **(OPTS | {"seed": 4})))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:  # killed before the first new shard is published
        m.setattr(shard_module, "write_shard", killed)
        with pytest.raises(KeyboardInterrupt):
            build_shards(BuildSettings(src=tiny_photo_folder, out=out, **(OPTS | {"seed": 4})))
    assert not (out / "manifest.json").exists()  # the old manifest no longer vouches for it
    build_shards(BuildSettings(src=tiny_photo_folder, out=out, **(OPTS | {"seed": 4})))
    assert dataset_files(out) == dataset_files(fresh)


def test_parts_combine_into_the_same_dataset(tiny_photo_folder, reference, tmp_path):
    same = tmp_path / "same"  # all parts into one (shared) folder
    for i in range(3):
        result = build_shards(BuildSettings(src=tiny_photo_folder, out=same, part=f"{i}/3", **OPTS))
        assert ("complete" not in result) == (i == 2)
    assert dataset_files(same) == dataset_files(reference)

    merged = tmp_path / "merged"  # parts on separate machines, folders copied together
    for i in range(2):
        build_shards(BuildSettings(src=tiny_photo_folder, out=tmp_path / f"p{i}", part=(i, 2), **OPTS))
        shutil.copytree(tmp_path / f"p{i}", merged, dirs_exist_ok=True)
    assert not (merged / "manifest.json").exists()
    build_shards(BuildSettings(src=tiny_photo_folder, out=merged, **OPTS))  # builds nothing, writes the manifest
    assert dataset_files(merged) == dataset_files(reference)
    with pytest.raises(ValueError, match="0 <= I < N"):
        build_shards(BuildSettings(src=tiny_photo_folder, out=merged, part="3/3", **OPTS))


def test_verify_accepts_a_good_dataset(reference, capsys):
    assert verify(reference, progress=False) == []
    assert main(["--verify", str(reference), "--no-progress"]) == 0


def test_verify_catches_flipped_byte_truncation_and_bad_idx(reference, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    flipped, truncated, idx_broken = (s["name"] for s in manifest["splits"]["train"]["shards"][:3])
    data = bytearray((bad / flipped).read_bytes())
    data[3000] ^= 0x01
    (bad / flipped).write_bytes(bytes(data))
    data = (bad / truncated).read_bytes()
    (bad / truncated).write_bytes(data[: len(data) // 3])
    idx = (bad / idx_broken).with_suffix(".idx")
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    (bad / "val-000009.tar").write_bytes(b"")

    assert main(["--verify", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{flipped}: sha256 differs" in err
    assert f"{truncated}: sha256 differs" in err and f"{truncated}: unreadable tar" in err
    assert f"{idx_broken[:-4]}.idx: does not match" in err
    assert "val-000009.tar: not listed in the manifest" in err


def test_verify_catches_an_undecodable_member(reference, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    name = manifest["splits"]["train"]["shards"][0]["name"]
    data = bytearray((bad / name).read_bytes())
    # Overwrite the first sharp member's JPEG header (its data starts after one 512-byte header).
    data[512:520] = b"garbage!"
    (bad / name).write_bytes(bytes(data))
    problems = verify(bad, progress=False)
    assert any(name in p and "sharp.jpg does not decode" in p for p in problems), problems


def test_verify_catches_a_member_libjpeg_only_warns_about(reference, tmp_path):
    # Bit flips in the entropy-coded data: PIL decodes them to garbage; the readers refuse them.
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    name = json.loads((bad / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    key = corrupt_member(bad, name, 0, "blur.jpg").split(".")[0]
    problems = verify(bad, progress=False)
    assert any(p.startswith(f"{name}: sample {key}: cannot decode blur.jpg: Corrupt JPEG data") for p in problems), (
        problems
    )


def test_sigkilled_cli_build_leaves_only_complete_tars(tiny_photo_folder, tmp_path):
    """A real kill -9 of the CLI (and its workers) mid-build, then the same command again."""
    reference = tmp_path / "reference"
    opts = ["--seed", "3", "--val-fraction", "0.2", "--test-fraction", "0.2", "--shard-size", "2", "--no-progress"]
    cmd = [sys.executable, "-m", "deblur.shard", "--src", str(tiny_photo_folder), *opts]
    subprocess.run(cmd + ["--out", str(reference), "--workers", "1"], check=True, capture_output=True, env=ENV)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cmd + ["--out", str(out), "--workers", "2"],
        env=ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    published = sorted(out.glob("*.tar"))
    assert published and not (out / "manifest.json").exists()
    for tar in published:  # whatever carries a final name is complete and correct
        assert tar.read_bytes() == (reference / tar.name).read_bytes(), tar.name
    subprocess.run(cmd + ["--out", str(out), "--workers", "2"], check=True, capture_output=True, env=ENV)
    assert dataset_files(out) == dataset_files(reference)
