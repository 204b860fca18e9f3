"""The shard builder's command line when the work fails: a full disk, a file-size limit, Ctrl-C,
SIGTERM, kill -9 of the builder, a worker that dies. Each ends with one line and its exit status,
leaves no half-written file and every finished shard usable, and the same command then finishes
the dataset byte for byte as an undisturbed build. ``--verify`` names what such faults leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deblur.shard.build import main
from tests.conftest import dataset_files, write_photo_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "DEBLUR_DEBUG"} | {"PYTHONPATH": str(ROOT)}
OPTS = ["--seed", "3", "--val-fraction", "0.2", "--test-fraction", "0.2", "--shard-size", "6", "--no-progress"]
RESUME = "finished shards are kept: rerun the same command to resume"


def builder(*args: str, module: str = "deblur.shard") -> list[str]:
    return [sys.executable, "-m", module, *args]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300, **kwargs)


def partials(root: Path) -> list[Path]:
    return sorted(root.rglob("*.partial"))


@pytest.fixture(scope="module")
def reference(tiny_photo_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "shards"
    run(builder("--src", str(tiny_photo_folder), "--out", str(out), "--workers", "1", *OPTS), check=True)
    return out


@pytest.mark.parametrize(
    "target", ["train-000002.tar", "train-000002.idx", ".build/train-000002.tar.json", "manifest.json"]
)
def test_a_full_disk_is_one_line_and_the_rerun_finishes(target, tiny_photo_folder, reference, tmp_path):
    out = tmp_path / "out"
    args = ("--src", str(tiny_photo_folder), "--out", str(out), "--workers", "1", *OPTS)
    done = run(builder(Path(target).name, *args, module="tests.faulty_disk"))
    lines = done.stderr.splitlines()  # the manifest is written after the "built ..." line
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(lines) <= 2, done.stderr
    line = lines[-1]
    assert line.startswith(f"error: disk full while writing {out / target}: ") and "MiB free on " in line
    assert line.endswith(RESUME)
    assert partials(out) == [] and not (out / "manifest.json").exists()
    finished = [p for p in out.glob("*.tar") if p.name < "train-000002.tar" or target == "manifest.json"]
    assert finished
    for tar in finished:  # every shard finished before the fault is the undisturbed build's
        assert tar.read_bytes() == (reference / tar.name).read_bytes(), tar.name
    assert run(builder(*args)).returncode == 0
    assert dataset_files(out) == dataset_files(reference)


def test_a_file_size_limit_fails_the_write_the_same_way(tiny_photo_folder, reference, tmp_path):
    """A real failing write: RLIMIT_FSIZE makes the kernel refuse the first tar (EFBIG)."""
    out = tmp_path / "out"
    args = ("--src", str(tiny_photo_folder), "--out", str(out), "--workers", "1", *OPTS)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    done = run(builder(*args), preexec_fn=small_files)
    assert done.stderr == f"error: writing {out / 'train-000000.tar'}: File too large; {RESUME}\n"
    assert done.returncode == 1 and partials(out) == [] and not list(out.glob("*.tar"))
    assert run(builder(*args)).returncode == 0
    assert dataset_files(out) == dataset_files(reference)


# ----------------------------------------------------------------------------- signals and kills


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Enough photographs that a build is still running when the test interrupts it."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), 150)[0].parent


@pytest.fixture(scope="module")
def photos_reference(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos_reference") / "shards"
    run(builder("--src", str(photos), "--out", str(out), "--workers", "1", *OPTS), check=True)
    return out


def interrupted(photos: Path, out: Path, stop) -> subprocess.CompletedProcess:
    """A 2-worker build, ``stop(process)`` once its first shard is published; returns when the
    builder and every process it started have exited (they all hold its stderr)."""
    cmd = builder("--src", str(photos), "--out", str(out), "--workers", "2", *OPTS)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.005)
    stop(proc)
    stdout, stderr = proc.communicate(timeout=60)
    assert not (out / "manifest.json").exists(), "the build finished before it was interrupted"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def resumes_to(photos: Path, out: Path, reference: Path) -> None:
    done = run(builder("--src", str(photos), "--out", str(out), "--workers", "2", *OPTS))
    assert done.returncode == 0 and "resuming: " in done.stderr, done.stderr
    assert dataset_files(out) == dataset_files(reference)


@pytest.mark.parametrize(
    ("how", "status"),
    [("ctrl-c", 130), ("sigterm", 143)],
)
def test_ctrl_c_and_sigterm_end_with_one_line(how, status, photos, photos_reference, tmp_path):
    def stop(proc):
        if how == "ctrl-c":  # the terminal signals the whole process group: builder and workers
            os.killpg(proc.pid, signal.SIGINT)
        else:  # a scheduler or `kill PID`: the builder alone
            os.kill(proc.pid, signal.SIGTERM)

    done = interrupted(photos, tmp_path / "out", stop)
    assert (done.returncode, done.stderr) == (status, "interrupted; rerun the same command to resume\n")
    assert partials(tmp_path / "out") == []
    resumes_to(photos, tmp_path / "out", photos_reference)


def test_after_kill_9_of_the_builder_its_workers_exit_quietly(photos, photos_reference, tmp_path):
    done = interrupted(photos, tmp_path / "out", lambda proc: os.kill(proc.pid, signal.SIGKILL))
    assert done.returncode == -signal.SIGKILL and done.stderr == ""  # no worker's BrokenPipe traceback
    resumes_to(photos, tmp_path / "out", photos_reference)  # and what a kill -9 leaves is cleaned up


def test_a_worker_that_dies_ends_the_build_with_one_line(photos, photos_reference, tmp_path):
    def kill_a_worker(proc):
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.ppid() != proc.pid]
        workers[0].kill()  # as the out-of-memory killer would

    done = interrupted(photos, tmp_path / "out", kill_a_worker)
    assert done.returncode == 1 and done.stderr == (
        "error: a worker process died (killed by SIGKILL; SIGKILL is often the out-of-memory killer); "
        f"{RESUME}, with fewer --workers if memory ran out\n"
    )
    assert partials(tmp_path / "out") == []
    resumes_to(photos, tmp_path / "out", photos_reference)


# ----------------------------------------------------------------------------- the manifest and --verify


def test_the_manifest_records_each_index_sha256(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    entries = [e for split in manifest["splits"].values() for e in split["shards"]]
    assert entries
    for entry in entries:
        idx = (reference / entry["name"]).with_suffix(".idx")
        assert entry["index_sha256"] == hashlib.sha256(idx.read_bytes()).hexdigest()


def damaged_copy(reference: Path, folder: Path, edit) -> Path:
    shutil.copytree(reference, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_manifest_without_index_hashes_still_verifies(reference, tmp_path, capsys):
    def drop_index_hashes(folder, manifest):
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                del entry["index_sha256"]

    old = damaged_copy(reference, tmp_path / "old", drop_index_hashes)
    assert main(["--verify", str(old), "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{old}: OK\n"


def test_verify_names_each_damaged_file(reference, tmp_path, capsys):
    def damage(folder, manifest):
        train, val = manifest["splits"]["train"]["shards"], manifest["splits"]["val"]["shards"]
        train[0]["index_sha256"] = "0" * 64  # the index no longer what the build recorded
        train[1]["sha256"] = "0" * 64
        train[2]["name"] = "../outside.tar"
        train[3]["samples"] += 1
        (folder / val[0]["name"]).with_suffix(".idx").unlink()
        (folder / "test-000000.tar").unlink()
        os.mkfifo(folder / "test-000000.tar")  # would block a reader forever
        (folder / "train-000001.tar.partial").write_bytes(b"half")  # what a kill -9 mid-write leaves

    bad = damaged_copy(reference, tmp_path / "bad", damage)
    assert main(["--verify", str(bad), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "train-000000.idx: index_sha256 differs from the manifest" in err
    assert "train-000001.tar: sha256 differs from the manifest" in err
    assert "manifest.json: train shard 2: '../outside.tar' is not a shard file name of split train" in err
    assert "manifest: train samples" in err and "train-000003.tar: 6 samples, manifest says 7" in err
    assert "val-000000.idx: missing" in err
    assert "test-000000.tar: not a regular file" in err
    assert "train-000001.tar.partial: an unfinished write (an interrupted build)" in err
