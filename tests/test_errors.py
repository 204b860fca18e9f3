"""deblur.errors: every failure becomes one line and an exit status; tracebacks only on request."""

from __future__ import annotations

import errno

import pytest

from deblur.errors import DEBUG_ENV, Fault, InputError, classify, from_os_error, run_main
from deblur.images import ImageError
from deblur.shard.format import ShardError
from deblur.training.checkpoint import CheckpointError
from deblur.training.config import ConfigError


@pytest.mark.parametrize("kind", [ConfigError, ShardError, ImageError, CheckpointError])
def test_the_projects_input_errors_exit_with_status_2(kind):
    assert classify(kind("shards/x.tar: truncated")) == ("error: shards/x.tar: truncated", 2)


def test_disk_full_is_a_fault_that_says_how_much_space_is_left(tmp_path):
    error = from_os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.tar")), "writing")
    assert isinstance(error, Fault) and error.exit_code == 1
    assert str(error).startswith(f"disk full while writing {tmp_path / 'a.tar'}: ") and "MiB free on" in str(error)


def test_a_path_the_user_cannot_use_is_bad_input(tmp_path):
    line, status = classify(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out")))
    assert (line, status) == (f"error: {tmp_path / 'out'}: Permission denied", 2)


def test_run_main_prints_one_line_and_no_traceback(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def body():
        raise InputError("configs/x.yaml: train.max_steps: must be positive\n  (got -1)")

    assert run_main(body) == 2
    err = capsys.readouterr().err
    assert err == "error: configs/x.yaml: train.max_steps: must be positive (got -1)\n"


def test_a_bug_is_one_internal_error_line_unless_debugging(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def body():
        return {}["missing"]

    assert run_main(body) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internal error: KeyError: 'missing' at test_errors.py:")
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_main(body) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_report_decides_which_process_prints(capsys):
    assert run_main(lambda: (_ for _ in ()).throw(Fault("lost rank 1")), report=lambda error: False) == 1
    assert capsys.readouterr().err == ""
    assert run_main(lambda: 0) == 0 and run_main(lambda: 3) == 3
