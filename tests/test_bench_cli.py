"""``python -m deblur.bench``: bad benchmarks, shard folders, splits and option values are one
line naming what is wrong (exit status 2), before any measuring, and touch no file."""

from __future__ import annotations

import pytest
from cli_checks import command, error_line, files, in_small_filesystem, run_cli

from deblur.bench.__main__ import USAGE

BENCH = "deblur.bench"


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], f"error: no benchmark named; {USAGE}"),
        (["nope"], "error: unknown benchmark 'nope'; usage: python -m deblur.bench"),
        (["checkpoint", "--repeat", "0"], "error: --repeat: must be at least 1, got 0"),
        (["checkpoint", "--dir", "/nonexistent/runs"], "error: --dir /nonexistent/runs: not a folder"),
    ],
)
def test_the_dispatcher_and_option_values(args, expected):
    assert error_line(run_cli(BENCH, *args), 2).startswith(expected)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--split", "training"], "error: python -m deblur.bench loader: argument --split: invalid choice: 'training'"),
        (["--batch-size", "0"], "error: --batch-size: must be at least 1, got 0"),
        (["--batch-size", "4096"], "error: --batch-size 4096: more than the 22 train pairs of --shards {shards}"),
        (["--seconds", "0"], "error: --seconds: must be a positive finite number, got 0.0"),
        (["--workers", "0"], "error: --workers: must be at least 1, got 0"),
        (["--workdir", "{shards}/nowhere"], "error: --workdir {shards}/nowhere: not a folder"),
        (["--crop", "--frames", "8"], "error: --frames: builds the pairs of --crop, instead of --shards"),
        (["--crop", "--small-shards", "{shards}"], "error: --small-shards: compares resize-mode loaders"),
        (
            ["--batch-size", "4", "--small-shards", "{shards}/nowhere"],
            "error: {shards}/nowhere: shard folder not found",
        ),
    ],
)
def test_loader_bench_options(tiny_shards, args, expected):
    before = files(tiny_shards)
    args = [a.format(shards=tiny_shards) for a in args]
    line = error_line(run_cli(BENCH, "loader", "--shards", tiny_shards, *args), 2)
    assert line.startswith(expected.format(shards=tiny_shards)), line
    assert files(tiny_shards) == before


def test_loader_bench_shard_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(run_cli(BENCH, "loader", "--shards", tmp_path / "nowhere"), 2)
    assert line.startswith(f"error: {tmp_path / 'nowhere'}: shard folder not found")
    line = error_line(run_cli(BENCH, "loader", "--shards", tmp_path / "empty"), 2)
    assert line == f"error: {tmp_path / 'empty' / 'manifest.json'}: not found; build shards with python -m deblur.shard"


def test_checkpoint_bench_refuses_a_dir_it_cannot_write_before_any_work(tmp_path):
    result, names = in_small_filesystem(
        tmp_path / "ro", "64k", command(BENCH, "checkpoint", "--dir", tmp_path / "ro"), read_only=True
    )
    assert error_line(result, 2) == f"error: --dir {tmp_path / 'ro'}: cannot write there (Read-only file system)"
    assert names == []
