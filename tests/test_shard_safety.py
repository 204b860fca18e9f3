"""The shard builder's command line against bad input: one line naming the option or file, exit
status 2, no traceback, and every file that was there before is byte-identical afterwards.

Also: what it may write into (docs/shards.md, "What the builder touches"), inputs that are not
regular files, and one consistent count of skipped files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deblur.shard.build import fingerprint, main
from deblur.shard.settings import BuildSettings
from deblur.shard.sources import Item, Shard, list_files
from deblur.shard.work import read_input
from tests.conftest import TINY_IMAGES, write_photo_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "DEBLUR_DEBUG"} | {"PYTHONPATH": str(ROOT)}
OPTS = ["--seed", "3", "--val-fraction", "0.2", "--test-fraction", "0.2", "--shard-size", "6", "--no-progress"]


def cli(*args: str, module: str = "deblur.shard", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout
    )


def one_line(done: subprocess.CompletedProcess, status: int) -> str:
    """The single stderr line of a failed run (no traceback), after checking its exit status."""
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


def snapshot(*roots: Path) -> dict[str, bytes | str]:
    """Every entry under ``roots`` (hidden ones too): file bytes, or the kind of anything else."""
    found: dict[str, bytes | str] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            key = str(path)
            if path.is_symlink():
                found[key] = "symlink -> " + os.readlink(path)
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = "folder" if path.is_dir() else "special"
    return found


@pytest.fixture(scope="module")
def built(tiny_photo_folder, tmp_path_factory) -> Path:
    """A dataset the CLI built with OPTS."""
    out = tmp_path_factory.mktemp("built") / "shards"
    assert cli("--src", str(tiny_photo_folder), "--out", str(out), "--workers", "1", *OPTS).returncode == 0
    return out


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--val-fraction", "1.5"], "error: --val-fraction: must be <= 1, got 1.5"),
        (["--seed", "-1"], "error: --seed: must be >= 0, got -1"),
        (["--limit", "-3"], "error: --limit: must be >= 1, got -3"),
        (["--shard-size", "abc"], "error: --shard-size: must be a whole number, got 'abc'"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "error: --val-fraction + --test-fraction must be <= 1"),
        (["--bogus"], "error: unrecognized arguments: --bogus (see python -m deblur.shard --help)"),
    ],
)
def test_the_cli_names_the_bad_option(args, line, tiny_photo_folder, tmp_path):
    before = snapshot(tiny_photo_folder)
    done = cli("--src", str(tiny_photo_folder), "--out", str(tmp_path / "out"), *args)
    assert one_line(done, 2).startswith(line)
    assert snapshot(tiny_photo_folder) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--limit", "0"], "--limit: must be >= 1, got 0"),
        (["--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--workers", "two"], "--workers: must be a whole number, got 'two'"),
        (["--shard-size", "0"], "--shard-size: must be >= 1, got 0"),
        (["--test-fraction", "-0.1"], "--test-fraction: must be >= 0, got -0.1"),
        (["--motion-fraction", "nan"], "--motion-fraction: must be a finite number, got 'nan'"),
        (["--sigma-range", "3", "1"], "--sigma-range: must satisfy 0 < LO <= HI <= 64 (px at 64-px scale), got 3 1"),
        (["--motion-length-range", "0", "5"], "--motion-length-range: must satisfy 0 < LO <= HI <= 64"),
        (["--sigma-range", "1", "1e6"], "--sigma-range: must satisfy 0 < LO <= HI <= 64"),
        (["--sigma-range", "x", "2"], "--sigma-range: must be a number, got 'x'"),
        (["--part", "3/3"], "--part: must be I/N with 0 <= I < N, got 3/3"),
        (["--part", "1"], "--part: must look like I/N (e.g. 0/4), got '1'"),
        (["--min-size", "0"], "--min-size: must be >= 1, got 0"),
        (["--max-pixels", "-5"], "--max-pixels: must be >= 1, got -5"),
        (["--min-size", "2000", "--max-pixels", "1000"], "--min-size 2000 and --max-pixels 1000 exclude every image"),
        (["--store-size", "-64"], "--store-size: must be >= 1, got -64"),
        (["--seed", "1", "--seed", "-2", "--limit", "0"], "--seed: must be >= 0, got -2; --limit: must be >= 1, got 0"),
    ],
)
def test_every_nonsense_value_is_refused(args, line, tmp_path, capsys):
    assert main(["--src", str(tmp_path), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {line}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--out", "{tmp}/out"], "error: --src, --demo, --sharp, --gopro or --pairs is required"),
        (["--src", "{tmp}"], "error: --out: is required"),
        (["--src", "{tmp}", "--out", ""], "error: --out: must not be empty"),
        (
            ["--demo", "--src", "{tmp}", "--out", "{tmp}/out"],
            "error: give one of --src, --demo, --sharp, --gopro or --pairs, not several (got --src and --demo)",
        ),
        (["--sharp", "{tmp}", "--out", "{tmp}/out"], "error: --sharp needs --blurred"),
        (["--gopro", "{tmp}", "--sigma-range", "1", "2", "--out", "{tmp}/out"], "error: --gopro brings real blurred"),
        (["--verify", "{tmp}", "--seed", "3"], "error: --verify checks a built dataset and takes no build options"),
        (["--src", "{tmp}/absent", "--out", "{tmp}/out"], "error: --src {tmp}/absent: not found"),
        (["--verify", "{tmp}/absent"], "error: --verify {tmp}/absent: not found"),
    ],
)
def test_missing_and_contradictory_options(args, line, tmp_path, capsys):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line.format(tmp=tmp_path)) and err.count("\n") == 1, err


def test_help_shows_the_defaults_of_the_settings_model(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--val-fraction VAL_FRACTION share of images (of scenes, for pairs) for validation (default: 0.05)" in text
    assert "--out OUT dataset folder to write: new, empty, or one this builder made --workers" in text
    assert "--sigma-range LO HI Gaussian sigma range in px at 64-px scale (default: 1.6 2.6)" in text
    assert "--no-progress do not show a progress bar" in text and "--reference-size" not in text


def test_the_resume_fingerprint_of_earlier_builds_is_kept():
    """Earlier versions hashed ShardSettings.model_dump(exclude_none=True): the same dict, so a
    folder they built resumes without rebuilding a shard."""
    earlier = {
        "seed": 3,
        "val_fraction": 0.2,
        "test_fraction": 0.05,
        "shard_size": 6,
        "min_size": 64,
        "max_pixels": 89478485,
        "jpeg_quality": 95,
        "blur": {"motion_fraction": 0.5, "sigma_range": [1.6, 2.6], "motion_length_range": [7.0, 12.0]}
        | {"reference_size": 64},
    }
    settings = BuildSettings(src="x", out="y", seed=3, val_fraction=0.2, shard_size=6)
    assert settings.content() == earlier
    assert BuildSettings(src="x", out="y", store_size=64).content()["store_size"] == 64
    shard = Shard("train-000000.tar", "train", (Item("a", "a.jpg", "/x/a.jpg", "train", 10),))
    payload = {"settings": earlier, "name": shard.name, "items": [["a", "a.jpg", "train", 10]]}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert fingerprint(shard, settings.content()) == expected


# ----------------------------------------------------------------------------- what the builder touches


def foreign_dataset(folder: Path, built: Path) -> Path:
    """The issue's case: shard-like files and a manifest that this builder did not write here."""
    folder.mkdir(parents=True)
    shutil.copyfile(built / "train-000000.tar", folder / "train-000099.tar")
    shutil.copyfile(built / "train-000000.idx", folder / "train-000099.idx")
    shutil.copyfile(built / "manifest.json", folder / "manifest.json")
    return folder


def test_a_folder_it_did_not_build_is_refused_untouched(tiny_photo_folder, built, tmp_path):
    out = foreign_dataset(tmp_path / "theirs", built)
    before = snapshot(out, tiny_photo_folder)
    line = one_line(cli("--src", str(tiny_photo_folder), "--out", str(out), *OPTS), 2)
    assert line.startswith(f"error: --out {out}: not a folder this builder made (it holds manifest.json, ")
    assert line.endswith("give a new or empty folder (nothing was changed)")
    assert snapshot(out, tiny_photo_folder) == before


def test_out_that_is_a_file_is_refused(tiny_photo_folder, tmp_path, capsys):
    (tmp_path / "out").write_bytes(b"mine")
    assert main(["--src", str(tiny_photo_folder), "--out", str(tmp_path / "out"), *OPTS]) == 2
    line = f"error: --out {tmp_path / 'out'}: is a file, not a folder; give a new or empty folder (nothing was changed)"
    assert capsys.readouterr().err == line + "\n"
    assert (tmp_path / "out").read_bytes() == b"mine"


def test_its_output_never_becomes_its_input(tiny_photo_folder, tmp_path):
    src = tmp_path / "photos"
    shutil.copytree(tiny_photo_folder, src)
    before = snapshot(src)
    assert one_line(cli("--src", str(src), "--out", str(src), *OPTS), 2) == (
        f"error: --out {src} is --src: the build would read its own shards as images; give another --out"
    )
    assert one_line(cli("--src", str(src), "--out", str(tmp_path), *OPTS), 2).startswith(
        f"error: --src {src} lies inside --out {tmp_path}: "
    )
    assert snapshot(src) == before
    # --out inside --src: built, and never searched for inputs, so a rerun changes nothing
    inner = src / "shards"
    for _ in range(2):
        assert cli("--src", str(src), "--out", str(inner), "--workers", "1", *OPTS).returncode == 0
        manifest = json.loads((inner / "manifest.json").read_text())
        assert manifest["samples"] == TINY_IMAGES and manifest["skipped"] == []


def test_files_at_its_shard_names_without_its_records_are_refused(tiny_photo_folder, built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    (out / ".build" / "train-000001.tar.json").unlink()  # e.g. tars copied without their records
    before = snapshot(out)
    line = one_line(cli("--src", str(tiny_photo_folder), "--out", str(out), *OPTS), 2)
    assert line.startswith(f"error: --out {out}: train-000001.tar, train-000001.idx not written by this builder")
    assert snapshot(out) == before


def test_in_its_own_folder_it_removes_only_what_its_records_vouch_for(tiny_photo_folder, built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    old = [s["name"] for s in json.loads((built / "manifest.json").read_text())["splits"]["train"]["shards"]]
    # Someone's files in the dataset folder, and an old shard that someone modified since.
    (out / "notes.txt").write_text("keep me")
    shutil.copyfile(built / old[0], out / "train-000099.tar")
    with open(out / old[-1], "ab") as f:
        f.write(b"\0" * 512)
    kept = snapshot(out / "notes.txt", out / "train-000099.tar", out / old[-1])
    # A smaller build into the same folder: its plan has fewer train shards.
    done = cli("--src", str(tiny_photo_folder), "--out", str(out), "--limit", "12", "--workers", "1", *OPTS)
    assert done.returncode == 0, done.stderr
    new = {s["name"] for s in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]}
    stale = [name for name in old[:-1] if name not in new]
    assert stale and old[-1] not in new
    for name in stale:
        assert f"removed stale shard {name}" in done.stderr
        assert not (out / name).exists() and not (out / name).with_suffix(".idx").exists()
    assert f"left {old[-1]}: not part of this build, and not the bytes this builder wrote there" in done.stderr
    assert snapshot(out / "notes.txt", out / "train-000099.tar", out / old[-1]) == kept


def test_a_folder_built_by_the_earlier_version_is_its_own(tiny_photo_folder, built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built, out)
    (out / ".build" / "owner.json").unlink()  # earlier versions wrote no marker
    for record in (out / ".build").glob("*.tar.json"):  # nor the index hash
        data = json.loads(record.read_text())
        record.write_text(json.dumps({k: v for k, v in data.items() if k not in ("index_sha256", "settings")}))
    tars = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    done = cli("--src", str(tiny_photo_folder), "--out", str(out), "--workers", "1", *OPTS)
    assert done.returncode == 0 and f"resuming: {len(tars)} of {len(tars)} shards already built" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == tars  # nothing rebuilt
    assert (out / ".build" / "owner.json").is_file()
    assert (out / "manifest.json").read_bytes() == (built / "manifest.json").read_bytes()


# ----------------------------------------------------------------------------- inputs that are not files


def test_pipes_sockets_and_devices_are_skipped_not_read(tiny_photo_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_photo_folder, src)
    os.mkfifo(src / "pipe.jpg")  # reading it would block forever
    (src / "zero.jpg").symlink_to("/dev/zero")  # and this one would never end
    (src / "elsewhere").symlink_to(tmp_path)  # a folder behind a symlink: not followed
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "sock.jpg"))
    try:
        done = cli("--src", str(src), "--out", str(tmp_path / "out"), "--workers", "2", *OPTS, timeout=60)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    reasons = {s["path"]: s["reason"] for s in json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]}
    assert reasons == {
        "pipe.jpg": "not a regular file: a named pipe (FIFO)",
        "zero.jpg": "not a regular file: a character device",
        "sock.jpg": "not a regular file: a socket",
        "elsewhere": "not a regular file: a folder behind a symlink (not followed)",
    }
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("; 4 files skipped (not a regular file 4), reasons in manifest.json")
    )


def test_a_pipe_put_in_place_after_the_listing_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "late.jpg")
    assert read_input(str(tmp_path / "late.jpg")) == "not a regular file: a named pipe (FIFO)"
    (tmp_path / "ok.jpg").write_bytes(b"bytes")
    assert read_input(str(tmp_path / "ok.jpg")) == b"bytes"
    assert read_input(str(tmp_path / "gone.jpg")) == "cannot read: No such file or directory"


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root, and tests may run as root
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list_files(tmp_path) == (["a.jpg"], [{"path": "locked/", "reason": "cannot read folder: Permission denied"}])


# ----------------------------------------------------------------------------- one count of skipped files


def test_skipped_files_are_counted_once_and_alike(tmp_path):
    src = tmp_path / "src"
    write_photo_folder(src, 10)
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("not an image")
    (src / "img_003.jpg").write_bytes((src / "img_003.jpg").read_bytes()[:500])
    os.mkfifo(src / "pipe.jpg")
    done = cli(
        "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "2", "--shard-size", "3", "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"]
    counted = [line for line in done.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 4 and counted == [done.stderr.splitlines()[-1]]
    assert counted[0].endswith(
        "4 files skipped (cannot decode 2, empty file 1, not a regular file 1), reasons in manifest.json"
    )


def test_parts_built_with_other_settings_are_named(tiny_photo_folder, tmp_path):
    out = tmp_path / "out"
    first = cli("--src", str(tiny_photo_folder), "--out", str(out), "--part", "0/2", "--workers", "1", *OPTS)
    assert first.stderr.strip().splitlines()[-1].startswith("part 0/2 done; manifest not written yet: ")
    other = [*OPTS[:2], "--val-fraction", "0.25", *OPTS[4:]]  # part 1 run with another --val-fraction
    done = cli("--src", str(tiny_photo_folder), "--out", str(out), "--part", "1/2", "--workers", "1", *other)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 0 and last.startswith("part 1/2 done; manifest not written yet: ")
    assert (
        "built with other settings (--val-fraction 0.2 instead of 0.25): run their parts with the same options" in last
    )
    assert not (out / "manifest.json").exists()


def test_the_demo_claims_its_folder_before_writing_its_photographs(built, tmp_path, capsys):
    out = foreign_dataset(tmp_path / "theirs", built)
    before = snapshot(out)
    assert main(["--demo", "--out", str(out), "--no-progress"]) == 2
    assert "not a folder this builder made" in capsys.readouterr().err
    assert snapshot(out) == before and not (out / ".demo-src").exists()


def test_a_half_written_demo_photograph_is_not_an_input(tmp_path):
    from deblur.shard import demo

    folder = tmp_path / ".demo-src"
    folder.mkdir()
    (folder / "coffee_s100_x0000_y0000.jpg.partial").write_bytes(b"half a jpeg")  # a killed run's
    demo.materialize(folder)
    assert not list(folder.glob("*.partial"))


def test_a_crop_an_earlier_demo_list_wrote_is_removed_not_reported_as_skipped(tmp_path):
    from deblur.shard import demo

    folder = tmp_path / ".demo-src"
    folder.mkdir()
    stale = folder / "camera_s100_x0001_y0001.jpg"  # a position the current list does not cut
    stale.write_bytes(b"an older crop")
    demo.materialize(folder)
    assert not stale.exists()
    listed = {line.split()[0] for line in (folder / "list_eval_partition.txt").read_text().splitlines()}
    assert {p.name for p in folder.glob("*.jpg")} == listed == {name for name, _, _ in demo.crops()}


@pytest.mark.parametrize("option", ["--images", "--workers", "--repeat"])
def test_bench_shard_refuses_nonsense_counts(option, capsys):
    from deblur.bench.__main__ import main as bench

    with pytest.raises(SystemExit) as done:
        bench(["shard", "--demo", option, "0"])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"error: {option}: must be >= 1, got 0\n"


def test_parts_claiming_a_new_folder_at_the_same_moment_both_go_on(tmp_path, monkeypatch):
    from deblur.errors import InputError
    from deblur.shard import folder

    real_publish = folder.publish

    def other_part_won(path, data):  # its marker was renamed in first, and our .partial with it
        real_publish(path, data)
        raise InputError(f"writing {path}: No such file or directory")

    def failed(path, data):  # a write that failed with no other part around
        raise InputError(f"writing {path}: Permission denied")

    monkeypatch.setattr(folder, "publish", other_part_won)
    folder.claim_folder(tmp_path / "shared")
    assert folder.why_not_ours(tmp_path / "shared") is None
    monkeypatch.setattr(folder, "publish", failed)
    with pytest.raises(InputError, match="Permission denied"):
        folder.claim_folder(tmp_path / "alone")
