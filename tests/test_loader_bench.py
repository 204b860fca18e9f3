"""The loader benchmark runs end to end on tiny shards and reports every rate in its JSON line."""

from __future__ import annotations

import json
import statistics

import pytest

from deblur.bench import loader as bench


@pytest.mark.timeout(300)
def test_bench_reports_medians_of_alternating_rounds(tiny_shards, small_shards, tmp_path, capsys):
    bench.main(
        [
            "--shards",
            str(tiny_shards),
            "--small-shards",
            str(small_shards),
            "--batch-size",
            "4",
            "--seconds",
            "0.3",
            "--repeat",
            "3",
            "--warmup",
            "0.2",
            "--workers",
            "2",
            "--workdir",
            str(tmp_path),
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    methods = (
        "dali",
        "torch",
        "original",
        "raw_decode_pil",
        "raw_decode_dali",
        "dali_small",
        "torch_small",
        "raw_decode_dali_small",
    )
    assert set(result["rounds"]) == set(methods)
    for method in methods:
        rounds = result["rounds"][method]
        assert len(rounds) == 3 and all(r > 0 for r in rounds), method
        assert result[method] == pytest.approx(statistics.median(rounds), abs=0.1), method
        assert any(line.startswith(method) for line in lines[:-1]), f"{method} missing from the table"
    assert result["raw_decode"] == max(result["raw_decode_pil"], result["raw_decode_dali"])
    assert result["dali_x_original"] == pytest.approx(result["dali"] / result["original"], rel=0.02)
    cpu = result["cpu_us_per_pair"]
    # Every method does real work on the CPU: decoding two JPEGs costs well over a microsecond.
    assert all(cpu[method] > 1 for method in methods), cpu
    assert cpu["raw_decode"] == min(cpu["raw_decode_pil"], cpu["raw_decode_dali"])
    assert result["dali_cpu_fraction_of_raw_decode"] == pytest.approx(cpu["raw_decode"] / cpu["dali"], rel=0.02)
    # no GPU here: each set's ceiling is its CPU decode-only rate
    assert result["ceiling_small"] == result["raw_decode_dali_small"]
    assert result["dali_small_x_dali"] == pytest.approx(result["dali_small"] / result["dali"], rel=0.02)
    assert result["dali_small_fraction_of_ceiling"] == pytest.approx(
        result["dali_small"] / result["raw_decode_dali_small"], rel=0.02
    )
    assert result["torch_cpu_x_raw_decode"] == pytest.approx(cpu["torch"] / cpu["raw_decode"], rel=0.02)
    # fewer pixels per pair: the small set's decode is cheaper than the full-size one's
    assert cpu["raw_decode_dali_small"] < cpu["raw_decode_dali"]
    assert list(tmp_path.iterdir()) == []  # the exported PNG folders are removed


def test_stream_rate_is_pairs_per_second_of_whole_batches():
    drawn = []

    def counts():
        while True:
            drawn.append(8)
            yield 8

    rate = bench.stream_method(counts())
    pairs, elapsed = rate(0.05)
    assert pairs == sum(drawn) and elapsed >= 0.05
    before = len(drawn)
    rate(0.05)
    assert len(drawn) > before  # the second measurement goes on drawing from the same stream


def test_rounds_alternate_methods_after_one_warm_up_each():
    calls = []
    methods = {name: (lambda seconds, name=name: calls.append((name, seconds)) or (10, seconds)) for name in ("a", "b")}
    rounds = bench.run_rounds(methods, repeat=2, seconds=3.0, warmup=1.0)
    assert calls == [("a", 1.0), ("b", 1.0), ("a", 3.0), ("b", 3.0), ("a", 3.0), ("b", 3.0)]
    assert {name: [r.rate for r in readings] for name, readings in rounds.items()} == {
        "a": [10 / 3] * 2,
        "b": [10 / 3] * 2,
    }


def test_cpu_time_counts_worker_processes():
    """A method whose work runs in a child process is charged for it."""
    import multiprocessing

    before = bench.tree_cpu_seconds()
    child = multiprocessing.get_context("fork").Process(target=_spin, args=(0.3,))
    child.start()
    child.join()
    assert bench.tree_cpu_seconds() - before >= 0.2


def _spin(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_settle_waits_for_busy_workers_then_returns():
    import multiprocessing
    import time

    child = multiprocessing.get_context("fork").Process(target=_spin, args=(0.8,))
    child.start()
    time.sleep(0.1)  # the child is spinning
    start = time.perf_counter()
    bench.settle(poll=0.1)
    waited = time.perf_counter() - start
    child.join()
    assert waited >= 0.4  # it did not start the next measurement while the child was busy
    start = time.perf_counter()
    bench.settle(poll=0.1)
    assert time.perf_counter() - start < 1.0  # idle: returns after a poll or two


@pytest.mark.timeout(300)
def test_crop_mode_measures_roi_against_full_decode_side_by_side(tmp_path, capsys):
    """``--crop --frames N``: builds GoPro-layout pairs from the demo photographs, then the DALI
    crop loader with and without region decoding and the torch backend's crop, in one run."""
    bench.main(
        ["--crop", "--frames", "8", "--frame-size", "320", "180", "--batch-size", "4", "--seconds", "0.3"]
        + ["--repeat", "2", "--warmup", "0.2", "--workers", "2", "--workdir", str(tmp_path)]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    methods = ("dali_roi", "dali_full_decode", "torch_full_decode")
    assert set(result["rounds"]) == set(methods) and result["member_size"] == [320, 180] and result["pairs"] == 8
    for method in methods:
        assert len(result["rounds"][method]) == 2 and all(r > 0 for r in result["rounds"][method]), method
        assert any(line.startswith(method) for line in lines[:-1]), f"{method} missing from the table"
    assert result["roi_x_full_decode"] == pytest.approx(result["dali_roi"] / result["dali_full_decode"], rel=0.02)
    assert list(tmp_path.iterdir()) == []  # the frames and their shards were temporary
