"""``python -m deblur.bench launch``: the trainer as accelerate launch starts it, beside a plain
fp32 eager step (a tiny smoke run; the figures are taken on a quiet machine, BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runner import ROOT, RUN_TIMEOUT, clean_env


def bench(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deblur.bench", "launch", *options],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def test_runs_the_shipped_trainer_and_the_plain_step_side_by_side(tiny_shards):
    proc = bench("--shards", str(tiny_shards), "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeat", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "launch" and len(result["rounds"]) == 1
    trainer, plain = result["trainer_images_per_s"], result["plain_images_per_s"]
    assert trainer > 0 and plain > 0 and result["ratio"] == pytest.approx(trainer / plain, rel=0.01)
    # The trainer's own choices, as it logged them, are part of the report.
    assert "  trainer precision: " in proc.stdout and "  trainer threads: " in proc.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--warmup", "-1"], "--warmup must not be negative, got -1"),
        (["--shards", "/nonexistent"], "--shards /nonexistent: no manifest.json there"),
    ],
)
def test_refuses_nonsense_options_naming_them(options, message):
    proc = bench(*options)
    assert proc.returncode == 2 and message in proc.stderr
