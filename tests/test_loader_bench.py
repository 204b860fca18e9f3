"""The loader benchmark runs end to end on tiny shards and reports every rate in its JSON line."""

from __future__ import annotations

import json

import pytest

from deblur.bench import loader as bench


@pytest.mark.timeout(300)
def test_bench_reports_all_methods(tiny_shards, tmp_path, capsys):
    bench.main(["--shards", str(tiny_shards), "--batch-size", "4", "--seconds", "0.3",
                "--workers", "2", "--workdir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for method in ("dali", "torch", "original", "raw_decode", "raw_decode_pil", "raw_decode_dali"):
        assert result[method] > 0, method
        assert any(line.startswith(method) for line in lines[:-1]), f"{method} missing from the table"
    assert result["raw_decode"] == max(result["raw_decode_pil"], result["raw_decode_dali"])
    assert result["dali_x_original"] == pytest.approx(result["dali"] / result["original"], rel=0.02)
    assert list(tmp_path.iterdir()) == []  # the exported PNG folders are removed
