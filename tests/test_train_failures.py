"""The trainer's failures through its real entry point: one line naming the file or key, printed
once for the whole run, exit status 2 (bad input) or 1 (fault), no traceback from our processes;
one trainer per output_dir; disk full while saving a checkpoint. Under ``python``, ``accelerate
launch`` and ``torchrun`` (tests/runner.py starts them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from runner import (
    ROOT,
    RUN_TIMEOUT,
    TORCHRUN,
    TRAIN,
    accelerate_launch,
    clean_env,
    error_lines,
    finish,
    free_port,
    kill_all,
    launch,
    tiny_run,
    trainers,
)

from deblur.training.lock import LOCK_NAME, claim


def python_run(shards: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *tiny_run(shards, out, *overrides)],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def accelerate(shards: Path, out: Path, *overrides: str) -> list[str]:
    return [*accelerate_launch(2), *tiny_run(shards, out, *overrides)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, but the lock file: reading it here would release
    this process's lock on it (POSIX record locks end when the process closes any descriptor)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def in_user_namespace(script: str) -> subprocess.CompletedProcess:
    """Run a bash script as root of a new user and mount namespace (where it may mount a tmpfs),
    or skip the test where this kernel does not allow that."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here (unshare: {probe.stderr.decode().strip()})")
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def test_a_second_trainer_on_the_same_output_dir_is_refused_before_it_touches_anything(tiny_shards, tmp_path):
    out = tmp_path / "busy"
    first = claim(out)  # the trainer already running there, in the middle of a save
    (out / "checkpoints" / ".tmp-step-0000008").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-0000008" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (out / "config.yaml").write_text("the first run's config\n")
    before = snapshot(out)

    proc = python_run(tiny_shards, out)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(
        f"error: output_dir {out} is in use by another trainer (pid {os.getpid()} on {socket.gethostname()}, started "
    ), proc.stderr[-3000:]
    assert f"lock {out / LOCK_NAME}): wait for it to finish, or give this run another output_dir" in proc.stderr
    assert error_lines(proc.stderr) == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert snapshot(out) == before  # its in-progress save and config are as they were
    first.release()


def test_a_killed_trainer_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "killed"
    hold = f"from deblur.training.lock import claim; from pathlib import Path; held = claim(Path({str(out)!r}))"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "; print('locked', flush=True); import time; time.sleep(60)"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match=f"pid {holder.pid} on"):
        claim(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    claim(out).release()  # the kernel released it with the process


def test_output_dir_that_is_a_file_is_one_line_and_left_alone(tiny_shards, tmp_path):
    out = tmp_path / "a-file"
    out.write_bytes(b"not a folder")
    proc = python_run(tiny_shards, out)
    assert proc.returncode == 2
    assert proc.stderr == f"error: output_dir {out}: exists and is not a folder\n"
    assert out.read_bytes() == b"not a folder"


def test_output_dir_on_a_read_only_filesystem_is_one_line(tiny_shards, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    out = folder / "run"
    cmd = " ".join(f"'{arg}'" for arg in [sys.executable, str(TRAIN), *tiny_run(tiny_shards, out)])
    proc = in_user_namespace(f"mount -t tmpfs -o ro,size=1m tmpfs {folder} && {cmd}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == f"error: creating output_dir {out}: Read-only file system\n"


def test_an_error_every_rank_meets_is_printed_once_under_accelerate_launch(tiny_shards, tmp_path):
    # Before the process group (a config key) and during setup (data.shards that is not a
    # dataset): one line from the main process; the launcher's summary quotes it, not <N/A>.
    for overrides, expected in (
        (["train.max_stepz=3"], "train.max_stepz: Extra inputs are not permitted"),
        ([f"data.shards={tmp_path / 'no-shards'}"], str(tmp_path / "no-shards")),
    ):
        out = tmp_path / f"once-{len(expected)}"
        proc = launch(accelerate(tiny_shards, out, *overrides), out)
        text = finish(proc, out)
        assert proc.returncode != 0
        [line] = error_lines(text)
        assert expected in line, text[-3000:]
        assert text.count(f"traceback : {line}") == 2 and "<N/A>" not in text  # both ranks' error files
        assert text.count("Traceback (most recent call last)") == 1  # the launcher's own, not ours


def test_resuming_with_another_batch_size_names_the_key_once_under_torchrun(tiny_shards, tmp_path):
    out = tmp_path / "resized"
    first = python_run(tiny_shards, out, "train.max_steps=1", "train.checkpoint_every=1", "train.record_batches=false")
    assert first.returncode == 0, first.stderr[-3000:]
    cmd = [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", str(TRAIN)]
    proc = launch([*cmd, *tiny_run(tiny_shards, out, "data.batch_size=4", "train.max_steps=2")], out)
    text = finish(proc, out)
    assert proc.returncode == 1  # torchrun's status for any failed worker
    [line] = error_lines(text)
    assert line == (
        f"error: {out / 'checkpoints' / 'step-0000001'} was trained with other settings: data.batch_size: 4 here, "
        "2 in the checkpoint; resume with the checkpoint's values, or train in another output_dir"
    )
    assert text.count(f"traceback : {line}") == 2


def test_disk_full_while_saving_says_so_removes_its_partial_save_and_keeps_the_others(tiny_shards, tmp_path):
    # A real full disk: a 280 MiB tmpfs holds two ~112 MiB checkpoints (models, Adam states, the
    # EMA of G), not a third. The namespace (and its tmpfs) ends with the script, so the checks
    # run inside it.
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    cmd = " ".join(f"'{arg}'" for arg in accelerate(tiny_shards, out, "train.record_batches=false"))
    script = (
        f"mount -t tmpfs -o size=280m tmpfs {disk} && {{ {cmd} > {tmp_path}/run.log 2>&1; echo status=$?; "
        f"'{sys.executable}' -m deblur.checkpoint {out}; ls -a {out}/checkpoints; }}"
    )
    proc = in_user_namespace(script)
    text = (tmp_path / "run.log").read_text()
    assert "status=1" in proc.stdout, text[-3000:]
    [line] = error_lines(text)
    assert line.startswith("error: checkpoint step-0000012 not saved: rank 0: disk full (") and "MiB free on" in line
    assert line.endswith(
        "its partial folder .tmp-step-0000012 was removed, the checkpoints saved before are untouched "
        "(the newest is step-0000008)"
    )
    listing = proc.stdout.split("status=1")[1].splitlines()
    assert [row.split()[0] for row in listing[2:4]] == ["step-0000004", "step-0000008"]
    assert all(row.endswith("ok") for row in listing[2:4])  # both verify against their manifests
    assert ".tmp-step-0000012" not in proc.stdout


def rank_of(process: psutil.Process) -> str | None:
    """The RANK in a process's environment (None: not set, or the process is gone)."""
    try:
        return process.environ().get("RANK")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def test_a_rank_that_cannot_write_its_part_of_a_checkpoint_stops_every_rank(tiny_shards, tmp_path):
    # Rank 1 may write files of at most 4 KiB (RLIMIT_FSIZE: writes beyond fail with EFBIG, as
    # the kernel reports them): its RNG states in the first checkpoint fail. The main process
    # must not wait for it forever, and the partial save must go.
    out = tmp_path / "rank1"
    proc = launch(accelerate(tiny_shards, out, "train.record_batches=false"), out)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        # A worker caught between fork and exec still shows the launcher's command line (which
        # names launch/train.py) and environment (no RANK): wait until rank 1 has exec'd.
        while not (rank1 := [w for w in trainers(proc) if rank_of(w) == "1"]):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        rank1[0].rlimit(psutil.RLIMIT_FSIZE, (4096, 4096))
    except BaseException:
        kill_all(proc)
        raise
    text = finish(proc, out)
    assert proc.returncode != 0
    [line] = error_lines(text)
    assert line.startswith("error: checkpoint step-0000004 not saved: rank 1: "), text[-3000:]
    assert line.endswith(
        "its partial folder .tmp-step-0000004 was removed, the checkpoints saved before are untouched "
        "(there is none yet)"
    )
    assert list((out / "checkpoints").iterdir()) == []
