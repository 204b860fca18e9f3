"""Training throughput: ``python -m deblur.bench train [options]``.

Times the trainer's own GAN step (``GanStep.step``: 1 D update + 3 G updates, each on its own
batch) for every precision x variant, side by side in one run:

- ``eager``: contiguous (NCHW) models and batches, no compilation: the plain baseline;
- ``channels_last``: models and batches in channels_last memory format;
- ``compiled``: channels_last + ``torch.compile`` of both models;
- ``hostsync``: channels_last, but the step's statistics are read on the host after every step
  (what a loop that looks at each loss does), to show what the trainer's deferred reading saves.

Each precision runs in a fresh subprocess (Accelerate keeps one mixed-precision setting per
process). Inside it every variant is warmed up first (compilation happens there), then the
variants take turns for ``--repeat`` rounds of ``--steps`` steps on synthetic input already on
the device, and each reports its median. Then the shipped setting (``configs/ddp.yaml``'s
``auto`` choices on this machine) is also timed fed by the real loader, to show whether input
keeps up. Ratios are to fp32 eager. Model FLOPs per image are counted once (torch's
FlopCounterMode over one fp32 step), so achieved TFLOP/s = FLOPs/image x images/s.

images/s counts training pairs consumed: (1 + 3) x batch size per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# variant -> (channels_last, compile, read stats every step)
VARIANTS = {
    "eager": (False, False, False),
    "channels_last": (True, False, False),
    "compiled": (True, True, False),
    "hostsync": (True, False, True),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m deblur.bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20 if gpu else 2, help="timed GAN steps per variant and round")
    parser.add_argument("--warmup", type=int, default=5 if gpu else 1, help="untimed GAN steps per variant first")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each variant reports its median")
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 16, help="pairs per update")
    parser.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="shard dataset for the loader-fed run (default: shards/demo, built into a temporary folder if missing)",
    )
    parser.add_argument("--loader", choices=["dali", "torch"], default="dali")
    parser.add_argument("--precisions", default="fp32,bf16", help=f"comma-separated, from {','.join(PRECISIONS)}")
    parser.add_argument(
        "--variants",
        default="eager,channels_last,compiled,hostsync" if gpu else "eager,channels_last",
        help=f"comma-separated, from {','.join(VARIANTS)} (compiled costs 30-50 s per precision on a CPU)",
    )
    parser.add_argument("--one", choices=list(PRECISIONS), help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.repeat < 1:
        parser.error("--steps, --repeat and --batch-size must be positive, --warmup not negative")
    for option, allowed in (("precisions", PRECISIONS), ("variants", VARIANTS)):
        unknown = set(getattr(args, option).split(",")) - set(allowed)
        if unknown:
            parser.error(f"unknown {option} {sorted(unknown)}; choose from {list(allowed)}")
    return args


def bench_config(args: argparse.Namespace, workdir: Path, precision: str, channels_last: bool, compiled: bool):
    from deblur.training.config import build_config

    return build_config(
        {
            "output_dir": str(workdir / "run"),
            "data": {"shards": str(args.shards), "loader": args.loader, "batch_size": args.batch_size},
            "train": {
                "max_steps": 1,
                "checkpoint_every": 1,
                "mixed_precision": precision,
                "channels_last": channels_last,
                "compile": compiled,
            },
            "wandb": {"mode": "disabled"},
        },
        "bench config",
    )


def flops_per_image(gan, batch, updates: int, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        gan.step(itertools.repeat(batch))
    return counter.get_total_flops() / (updates * batch_size)


def trial(args: argparse.Namespace, precision: str, workdir: Path) -> dict:
    """In this process: every variant side by side on synthetic input, then the shipped
    setting fed by the loader."""
    from deblur.training.feed import endless
    from deblur.training.hardware import resolve_compile, resolve_precision
    from deblur.training.setup import build_accelerator, build_loader, build_models

    base = bench_config(args, workdir, PRECISIONS[precision], True, False)
    accelerator = build_accelerator(base)
    device = accelerator.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loader = build_loader(base, accelerator, "train", train=True)
    if loader is None:
        raise SystemExit(f"{args.shards}: the train split is empty")
    updates = 1 + base.loss.g_updates_per_step
    blurred, sharp = (t.clone() for t in next(iter(loader)))
    images = args.steps * updates * args.batch_size

    def run(gan, batches, steps: int, read_each_step: bool) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            stats = gan.step(batches)
            if read_each_step:
                stats.read()
        stats.read()  # the last step's statistics: waits for the device to finish
        sync()
        return time.perf_counter() - start

    setups = {}
    for name in args.variants.split(","):
        channels_last, compiled, read_each_step = VARIANTS[name]
        gan = build_models(bench_config(args, workdir, PRECISIONS[precision], channels_last, compiled), accelerator)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        batch = (blurred.contiguous(memory_format=fmt), sharp.contiguous(memory_format=fmt))
        start = time.perf_counter()
        run(gan, itertools.repeat(batch), args.warmup, read_each_step)
        print(f"{precision} {name}: warmup {time.perf_counter() - start:.1f} s", file=sys.stderr)
        setups[name] = (gan, batch, read_each_step)
    seconds = {name: [] for name in setups}
    for _ in tqdm(range(args.repeat), desc=f"{precision} rounds", file=sys.stderr):
        for name, (gan, batch, read_each_step) in setups.items():
            seconds[name].append(run(gan, itertools.repeat(batch), args.steps, read_each_step))
    results = [
        {
            "precision": precision,
            "variant": name,
            "input": "synthetic",
            "images_per_s": round(images / statistics.median(s), 2),
            "step_ms": round(1000 * statistics.median(s) / args.steps, 2),
        }
        for name, s in seconds.items()
    ]

    # The shipped setting (auto precision, auto compile, channels_last), fed by the loader.
    shipped_precision = resolve_precision("auto", device)[0]
    shipped_compile = resolve_compile("auto", device)[0]
    shipped = "compiled" if shipped_compile else "channels_last"
    if PRECISIONS[precision] == shipped_precision and shipped in setups:
        gan = setups[shipped][0]
        feed = endless(loader)
        run(gan, feed, args.warmup, False)
        elapsed = statistics.median(run(gan, feed, args.steps, False) for _ in range(args.repeat))
        results.append(
            {
                "precision": precision,
                "variant": shipped,
                "input": "loader",
                "images_per_s": round(images / elapsed, 2),
                "step_ms": round(1000 * elapsed / args.steps, 2),
            }
        )
    flops = None
    if precision == "fp32" and "eager" in setups:
        gan, batch, _ = setups["eager"]
        flops = flops_per_image(gan, batch, updates, args.batch_size)
    return {
        "results": results,
        "flops_per_image": flops,
        "shipped": {"precision": shipped_precision, "variant": shipped},
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(trial(args, args.one, Path(tmp))))
        return
    from deblur.shard.format import MANIFEST

    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            args.shards = Path("shards/demo")
            if not (args.shards / MANIFEST).exists():
                from deblur.shard.build import build_shards
                from deblur.shard.settings import BuildSettings

                args.shards = Path(tmp) / "demo"
                print(f"building demo shards in {args.shards} (pass --shards to use your own)", file=sys.stderr)
                build_shards(BuildSettings(out=args.shards, demo=True))
        results, flops, shipped = [], None, None
        for precision in args.precisions.split(","):
            cmd = [
                sys.executable,
                "-m",
                "deblur.bench",
                "train",
                "--one",
                precision,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--repeat",
                str(args.repeat),
                "--batch-size",
                str(args.batch_size),
                "--shards",
                str(args.shards),
                "--loader",
                args.loader,
                "--variants",
                args.variants,
            ]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{precision} trial failed (exit {proc.returncode}): {' '.join(cmd)}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            results += out["results"]
            flops = flops or out["flops_per_image"]
            shipped = out["shipped"]
    report(args, results, flops, shipped)


def report(args: argparse.Namespace, results: list[dict], flops: float | None, shipped: dict) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    baseline = next(
        (
            r["images_per_s"]
            for r in results
            if r["precision"] == "fp32" and r["variant"] == "eager" and r["input"] == "synthetic"
        ),
        None,
    )
    for r in results:
        r["vs_fp32_eager"] = round(r["images_per_s"] / baseline, 3) if baseline else None
        r["tflops"] = round(flops * r["images_per_s"] / 1e12, 3) if flops else None
    print(
        f"training throughput on {device}: batch {args.batch_size}, {args.steps} steps x {args.repeat} rounds "
        f"(+{args.warmup} warmup), 1 D + 3 G updates per step, medians"
    )
    if flops:
        print(f"model FLOPs per training image: {flops / 1e9:.2f} GFLOP (one fp32 step, torch FlopCounterMode)")
    print(f"shipped config on this machine: {shipped['precision']} + {shipped['variant']}")
    print(
        f"{'precision':<10}{'variant':<15}{'input':<11}{'images/s':>10}{'ms/step':>10}"
        f"{'x fp32 eager':>14}{'TFLOP/s':>9}"
    )
    for r in results:
        ratio = f"{r['vs_fp32_eager']:.2f}x" if r["vs_fp32_eager"] else "-"
        tflops = f"{r['tflops']:.2f}" if r["tflops"] is not None else "-"
        print(
            f"{r['precision']:<10}{r['variant']:<15}{r['input']:<11}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}"
            f"{ratio:>14}{tflops:>9}"
        )
    print(
        json.dumps(
            {
                "benchmark": "train",
                "device": device,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "repeat": args.repeat,
                "loader": args.loader,
                "shards": str(args.shards),
                "flops_per_image": flops,
                "shipped": shipped,
                "results": results,
            }
        )
    )
