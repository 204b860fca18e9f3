"""The shard benchmark runs end to end and ends with one JSON line."""

from __future__ import annotations

import json

from deblur.bench.__main__ import main


def test_bench_shard_reports_both_worker_counts(capsys):
    main(["shard", "--demo", "--images", "30", "--workers", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["bench"] == "shard" and result["images"] == 30 and result["workers"] == 2
    assert result["images_per_s_1_worker"] > 0 and result["images_per_s_all_workers"] > 0
    assert result["speedup"] > 0
