"""The loader benchmark runs end to end on tiny shards and reports every rate in its JSON line."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest

from deblur.bench import loader as bench


@pytest.mark.timeout(300)
def test_bench_reports_medians_of_alternating_rounds(tiny_shards, tmp_path, capsys):
    bench.main(["--shards", str(tiny_shards), "--batch-size", "4", "--seconds", "0.3", "--repeat", "3",
                "--warmup", "0.2", "--workers", "2", "--workdir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    methods = ("dali", "torch", "original", "raw_decode_pil", "raw_decode_dali")
    assert set(result["rounds"]) == set(methods)
    for method in methods:
        rounds = result["rounds"][method]
        assert len(rounds) == 3 and all(r > 0 for r in rounds), method
        assert result[method] == pytest.approx(statistics.median(rounds), abs=0.1), method
        assert any(line.startswith(method) for line in lines[:-1]), f"{method} missing from the table"
    assert result["raw_decode"] == max(result["raw_decode_pil"], result["raw_decode_dali"])
    assert result["dali_x_original"] == pytest.approx(result["dali"] / result["original"], rel=0.02)
    assert list(tmp_path.iterdir()) == []  # the exported PNG folders are removed


def test_stream_rate_is_pairs_per_second_of_whole_batches():
    drawn = []

    def counts():
        while True:
            drawn.append(8)
            yield 8

    rate = bench.stream_method(counts())
    first = rate(0.05)
    assert 0 < first <= sum(drawn) / 0.05  # at least 0.05 s elapsed for the batches drawn
    before = len(drawn)
    rate(0.05)
    assert len(drawn) > before  # the second measurement goes on drawing from the same stream


def test_rounds_alternate_methods_after_one_warm_up_each():
    calls = []
    methods = {name: (lambda seconds, name=name: calls.append((name, seconds)) or 1.0) for name in ("a", "b")}
    rounds = bench.run_rounds(methods, repeat=2, seconds=3.0, warmup=1.0)
    assert calls == [("a", 1.0), ("b", 1.0), ("a", 3.0), ("b", 3.0), ("a", 3.0), ("b", 3.0)]
    assert rounds == {"a": [1.0, 1.0], "b": [1.0, 1.0]}
