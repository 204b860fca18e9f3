"""Shard-builder throughput, 1 worker vs all workers on the same input.

    python -m deblur.bench shard --demo --images 2000
    python -m deblur.bench shard --src ~/data/celeba/img_align_celeba --images 5000

Each run is a fresh build into a temporary folder (decode + blur + encode + tar writing, pool
start-up included, as a user sees it). Both builds must give the same manifest, which doubles
as a determinism check. Besides wall-clock rates it reports the CPU seconds the parent process
spent in each run: with 1 worker that is all the work, with N workers only the parent's share
(listing, tar writing), which bounds the possible speedup even on a busy machine where the
wall-clock speedup is noise (the load average is reported too). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from deblur.shard import demo
from deblur.shard.build import build_shards


def demo_folder(folder: Path, images: int) -> Path:
    """``images`` demo crops (repeated under new names when more are asked than exist)."""
    crops = sorted(demo.materialize(folder / "once").glob("*.jpg"))
    src = folder / "src"
    src.mkdir()
    for n in range(images):
        round_, crop = divmod(n, len(crops))
        shutil.copyfile(crops[crop], src / f"r{round_}_{crops[crop].name}")
    return src


def timed_build(src: Path, out: Path, images: int, workers: int) -> tuple[float, float, dict]:
    """(wall seconds, this process's CPU seconds, manifest) of one fresh build."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    manifest = build_shards(src, out, limit=images, workers=workers, progress=False)
    return time.perf_counter() - t0, time.process_time() - cpu0, manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m deblur.bench shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", type=Path, help="folder of images to build from")
    source.add_argument("--demo", action="store_true", help="use the built-in demo photographs")
    p.add_argument("--images", type=int, default=2000, help="images per build")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="the 'all workers' count (default: all cores)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate 1-worker and N-worker builds this many times, keep the "
        "fastest of each (use 3+ on a shared machine)",
    )
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        src = demo_folder(tmp, args.images) if args.demo else args.src
        runs_one, runs_many = [], []
        for r in range(args.repeat):
            runs_one.append(timed_build(src, tmp / f"w1-{r}", args.images, 1))
            runs_many.append(timed_build(src, tmp / f"wn-{r}", args.images, args.workers))
        one, cpu_one, m1 = min(runs_one, key=lambda run: run[0])
        many, cpu_parent, _ = min(runs_many, key=lambda run: run[0])
    if any(run[2] != m1 for run in runs_one + runs_many):
        raise SystemExit("1-worker and N-worker builds differ: the builder is not deterministic")
    n = m1["samples"] + len(m1["skipped"])  # images processed, usable or not
    result = {
        "bench": "shard",
        "images": n,
        "samples": m1["samples"],
        "workers": args.workers,
        "images_per_s_1_worker": round(n / one, 1),
        "images_per_s_all_workers": round(n / many, 1),
        "speedup": round(one / many, 2),
        "repeat": args.repeat,
        "cpu_s_1_worker": round(cpu_one, 2),
        "parent_cpu_s_all_workers": round(cpu_parent, 2),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(
        f"1 worker: {n / one:.1f} images/s ({one:.1f} s); {args.workers} workers: "
        f"{n / many:.1f} images/s ({many:.1f} s); speedup {one / many:.2f}x; parent CPU "
        f"{cpu_parent:.1f} s of {cpu_one:.1f} s total work; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(json.dumps(result))
