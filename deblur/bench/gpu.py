"""Every figure the GPU targets need, in one run: ``python -m deblur.bench gpu [--dry-run]``.

Meant for a person with one GPU and 15 minutes (about 10 on an H200, ``--budget`` seconds at
most): it builds its own shards from the built-in demo photographs (no download), then runs the
stages below in this order, the targets' figures first, each in its own process with a time
limit; a stage that no longer fits in the budget is skipped and listed as such:

1. ``bf16``: the step at batch 256 (``--batch-size``) in bf16: ``channels_last``, ``compiled``
   (``configs/ddp.yaml`` on a GPU) and ``hostsync`` on synthetic input, and the shipped one fed by
   the DALI loader over the 64-px shards (the CelebA recipe's), in alternating rounds; host ops,
   CUDA syncs and peak memory per variant (``python -m deblur.bench train``);
2. ``loader``: the DALI and torch loaders alone over the full-size (178x218) and the 64-px shards,
   with the GPU decode ceiling (``python -m deblur.bench loader --small-shards``);
3. ``bf16_update``: bf16 ``compiled_update`` (the whole update as one graph);
4. ``cudagraphs``: bf16 ``update_cudagraphs`` and ``models_cudagraphs`` (``reduce-overhead``);
5. ``fp32`` (``eager``: every ratio's baseline, ``channels_last``, ``compiled``) and ``fp16``
   (``channels_last``, ``compiled``; only on a GPU: Accelerate does not apply fp16 on a CPU);
6. ``autotune``: bf16 ``update_autotune`` (``max-autotune-no-cudagraphs``, the longest compile).

A variant that fails (a compile error, out of memory) is reported with its error and the stage
goes on with the others.

Writes ``--out`` (default ``bench-gpu.json``: every stage's results and status, the versions,
and the targets: >= 16k images/s bf16 synthetic with the shipped config, loader-fed within 10 %)
and the same as a readable table next to it (``.txt``), and prints the table.

``--dry-run``: the same stages at tiny sizes on whatever device there is (the CPU in CI), without
the compiled variants (each costs a minute of compilation on a CPU): proof that the script runs
end to end, not a measurement. The GPU-only parts (CUDA sync debug mode, peak memory, the GPU
decode ceiling) are switched on by ``torch.cuda.is_available()`` in the benchmarks it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deblur.bench import train as train_bench
from deblur.cli import Parser

TARGET_IMAGES_PER_S = 16_000  # bf16, batch 256, synthetic input, shipped config (issue 17)
TARGET_LOADER_FRACTION = 0.9  # loader-fed within 10 % of synthetic
# the loader benchmark's rates shown in the table (decode_ceiling only with a GPU)
LOADER_METHODS = ("dali", "torch", "raw_decode_dali", "decode_ceiling")


@dataclass(frozen=True)
class Stage:
    name: str
    precision: str | None  # None: the loader benchmark
    variants: tuple[str, ...] = ()
    limit_s: float = 240.0  # most this stage may take (a compile that hangs must not eat the budget)


STAGES = (
    Stage("bf16", "bf16", ("channels_last", "compiled", "hostsync"), 300),
    Stage("loader", None, limit_s=180),
    Stage("bf16_update", "bf16", ("compiled_update",), 240),
    Stage("cudagraphs", "bf16", ("update_cudagraphs", "models_cudagraphs"), 300),
    Stage("fp32", "fp32", ("eager", "channels_last", "compiled"), 240),
    Stage("fp16", "fp16", ("channels_last", "compiled"), 240),
    Stage("autotune", "bf16", ("update_autotune",), 300),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(
        prog="python -m deblur.bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, no compiled variants: does it run?")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for all stages (default 600)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per update (default 256; dry run 2)")
    parser.add_argument("--images", type=int, default=None, help="demo crops per shard set (default 4096; dry run 48)")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"), help="results file (and .txt beside it)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the shards (default: a temp folder)")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.dry_run else 256)
    args.images = args.images or (48 if args.dry_run else 4096)
    if args.batch_size < 1 or args.images < 16 or args.budget <= 0:
        parser.error("--batch-size must be positive, --images at least 16, --budget positive")
    return args


def build_demo_shards(root: Path, images: int, dry_run: bool) -> tuple[Path, Path]:
    """Full-size and 64-px shards of the same ``images`` demo crops."""
    from deblur.bench.shard import demo_folder
    from deblur.shard.build import build_shards
    from deblur.shard.settings import BuildSettings

    src = demo_folder(root, images)
    shard_size = 16 if dry_run else 512  # several shards per split either way
    full, small = root / "full", root / "small64"
    for out, store_size in ((full, None), (small, 64)):
        build_shards(BuildSettings(src=src, out=out, shard_size=shard_size, store_size=store_size, progress=False))
    return full, small


def train_args(args: argparse.Namespace, shards: Path, variants: tuple[str, ...]) -> argparse.Namespace:
    """``python -m deblur.bench train`` options for one stage."""
    steps, warmup, repeat = (1, 1, 1) if args.dry_run else (20, 5, 3)
    return argparse.Namespace(
        steps=steps,
        warmup=warmup,
        repeat=repeat,
        batch_size=args.batch_size,
        shards=shards,
        loader="dali",
        variants=",".join(variants),
    )


def loader_stage(args: argparse.Namespace, full: Path, small: Path, timeout: float) -> dict:
    seconds, repeat, warmup = ("0.3", "1", "0.2") if args.dry_run else ("3", "2", "2")
    cmd = [sys.executable, "-m", "deblur.bench", "loader", "--shards", str(full), "--small-shards", str(small)]
    cmd += ["--batch-size", str(args.batch_size), "--seconds", seconds, "--repeat", repeat, "--warmup", warmup]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_stages(args: argparse.Namespace, full: Path, small: Path, start: float) -> tuple[list[dict], dict, dict]:
    """(each stage's status, the train benchmark's merged results, the loader benchmark's)."""
    statuses, train = [], {"results": [], "failed": [], "flops_per_image": None, "shipped": None}
    loader: dict = {}
    for stage in STAGES:
        variants = tuple(v for v in stage.variants if not (args.dry_run and train_bench.VARIANTS[v][1]))
        left = args.budget - (time.perf_counter() - start)
        status = {"stage": stage.name, "variants": list(variants)}
        if stage.precision is not None and not variants:
            statuses.append({**status, "status": "skipped: dry run leaves compiled variants out"})
            continue
        if stage.precision == "fp16" and not torch.cuda.is_available():
            statuses.append({**status, "status": "skipped: Accelerate applies fp16 on a GPU only"})
            continue
        if left < 30:
            statuses.append({**status, "status": f"skipped: {left:.0f} s of the budget left"})
            continue
        began = time.perf_counter()
        print(f"stage {stage.name} ({', '.join(variants) or 'loaders'}), at most {min(left, stage.limit_s):.0f} s")
        try:
            if stage.precision is None:
                loader = loader_stage(args, full, small, min(left, stage.limit_s))
            else:
                out = train_bench.run_trial(
                    train_args(args, small, variants), stage.precision, timeout=min(left, stage.limit_s)
                )
                train["results"] += out["results"]
                train["failed"] += out["failed"]
                train["flops_per_image"] = train["flops_per_image"] or out["flops_per_image"]
                train["shipped"] = out["shipped"]
            failures = [f"{f['variant']}: {f['error']}" for f in out["failed"]] if stage.precision else []
            status["status"] = "done" + (f", failed {'; '.join(failures)}" if failures else "")
        except subprocess.TimeoutExpired as timeout:
            status["status"] = f"timed out after {timeout.timeout:.0f} s"
        except (RuntimeError, SystemExit) as error:  # a failed stage must not lose the others
            status["status"] = f"failed: {error}"
        status["seconds"] = round(time.perf_counter() - began, 1)
        statuses.append(status)
    return statuses, train, loader


def targets(train: dict, dry_run: bool) -> dict:
    """The GPU targets against this run's figures (None where a figure is missing or the run
    measured nothing)."""
    shipped = train.get("shipped") or {}

    def rate(input_: str) -> float | None:
        return next(
            (
                r["images_per_s"]
                for r in train["results"]
                if r["precision"] == "bf16" and r["variant"] == shipped.get("variant") and r["input"] == input_
            ),
            None,
        )

    synthetic, fed = rate("synthetic"), rate("loader")
    fraction = round(fed / synthetic, 3) if synthetic and fed else None
    if dry_run:  # tiny sizes on any device: no verdict
        synthetic, fraction = None, None
    return {
        "shipped_bf16_synthetic_images_per_s": synthetic,
        "target_images_per_s": TARGET_IMAGES_PER_S,
        "images_per_s_met": None if synthetic is None else synthetic >= TARGET_IMAGES_PER_S,
        "loader_fed_fraction": fraction,
        "target_loader_fed_fraction": TARGET_LOADER_FRACTION,
        "loader_fed_met": None if fraction is None else fraction >= TARGET_LOADER_FRACTION,
    }


def readable(summary: dict) -> str:
    lines = [
        f"deblur.bench gpu on {summary['device']} ({'DRY RUN, no measurement' if summary['dry_run'] else 'measured'})"
        f": batch {summary['batch_size']}, {summary['images']} demo crops per shard set, "
        f"{summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget; torch {summary['torch']}, "
        f"DALI {summary['dali']}",
        "",
        "stages:",
        *(f"  {s['stage']:<11}{s['status']}{took(s)}" for s in summary["stages"]),
    ]
    if summary["train"]["results"]:
        lines += ["", "training step (python -m deblur.bench train):", train_bench.table(summary["train"]["results"])]
    lines += [f"{f['precision']} {f['variant']} failed: {f['error']}" for f in summary["train"]["failed"]]
    loader = summary["loader"]
    if loader:
        lines += ["", "loaders alone, pairs/s, full-size | 64-px shards (python -m deblur.bench loader):"]
        for method in LOADER_METHODS:
            rates = (loader.get(method), loader.get(f"{method}_small"))
            lines.append(f"  {method:<16}" + "".join(f"{'-' if r is None else f'{r:.0f}':>10}" for r in rates))
        lines.append(
            f"  DALI loader / its decode ceiling: {loader.get('dali_fraction_of_ceiling')} | "
            f"{loader.get('dali_small_fraction_of_ceiling')}"
        )
    t = summary["targets"]
    lines += [
        "",
        "targets:",
        f"  bf16 synthetic, shipped config: {t['shipped_bf16_synthetic_images_per_s']} images/s "
        f"(target >= {t['target_images_per_s']}): {verdict(t['images_per_s_met'])}",
        f"  loader-fed / synthetic: {t['loader_fed_fraction']} (target >= {t['target_loader_fed_fraction']}): "
        f"{verdict(t['loader_fed_met'])}",
    ]
    return "\n".join(lines)


def took(status: dict) -> str:
    return f" ({status['seconds']} s)" if "seconds" in status else ""


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    import nvidia.dali

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print(f"building {args.images} demo crops into full-size and 64-px shards in {tmp}")
        full, small = build_demo_shards(Path(tmp), args.images, args.dry_run)
        statuses, train, loader = run_stages(args, full, small, start)
    if train["results"]:
        train_bench.annotate(train["results"], train["flops_per_image"])
    summary = {
        "benchmark": "gpu",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size,
        "images": args.images,
        "budget_s": args.budget,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "command": " ".join(["python -m deblur.bench gpu", *argv]),
        "stages": statuses,
        "train": train,
        "loader": loader,
        "targets": targets(train, args.dry_run),
    }
    text = readable(summary)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.txt')}")
