"""``python -m deblur.bench gpu --dry-run``: the one-shot GPU measurement runs end to end on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_the_gpu_benchmark_dry_run_writes_every_stage_and_the_table(tmp_path):
    out = tmp_path / "bench-gpu.json"
    cmd = [sys.executable, "-m", "deblur.bench", "gpu", "--dry-run", "--images", "32", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status["bf16"] == status["loader"] == status["fp32"] == "done", status
    for compiled_only in ("bf16_update", "cudagraphs", "autotune"):
        assert status[compiled_only].startswith("skipped: dry run"), status
    assert status["fp16"].startswith("skipped")  # no GPU here
    results = summary["train"]["results"]
    assert {(r["precision"], r["variant"], r["input"]) for r in results if r["input"] == "synthetic"} == {
        ("bf16", "channels_last", "synthetic"),
        ("bf16", "hostsync", "synthetic"),
        ("fp32", "eager", "synthetic"),
        ("fp32", "channels_last", "synthetic"),
    }
    assert [r["input"] for r in results].count("loader") == 1  # the shipped setting, fed by the DALI loader
    # The step moves nothing between host and device, in every variant (counted, not timed).
    assert all(r["host_ops"] == 0 and r["images_per_s"] > 0 for r in results), results
    assert summary["train"]["failed"] == []
    assert summary["loader"]["dali"] > 0 and summary["loader"]["dali_small"] > 0
    assert summary["targets"]["images_per_s_met"] is None  # a dry run gives no verdict
    text = out.with_suffix(".txt").read_text()
    assert "DRY RUN" in text and "channels_last" in text and text in proc.stdout
