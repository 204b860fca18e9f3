"""Training throughput: ``python -m deblur.bench train [--steps N] [--batch-size B] [--shards DIR]``.

Runs the trainer's GAN step (deblur.gan.GanStep: 1 D update + 3 G updates, each on its own
batch) on one process for fp32 and bf16, fed twice: by the real loader over ``--shards`` and by
synthetic tensors already on the device. If "loader" is much slower than "synthetic", input is
the bottleneck. Each precision runs in a fresh subprocess (Accelerate keeps one mixed-precision
setting per process). Prints a table, then one JSON line with every figure.

images/s counts training pairs consumed: (1 + 3) x batch size per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m deblur.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50 if gpu else 2, help="timed GAN steps per trial")
    parser.add_argument("--warmup", type=int, default=5 if gpu else 1, help="untimed GAN steps first")
    parser.add_argument("--batch-size", type=int, default=256 if gpu else 4, help="pairs per update")
    parser.add_argument("--shards", type=Path, default=None,
                        help="shard dataset (default: shards/demo, built into a temporary folder if missing)")
    parser.add_argument("--loader", choices=["dali", "torch"], default="dali")
    parser.add_argument("--precisions", default="fp32,bf16", help=f"comma-separated, from {','.join(PRECISIONS)}")
    parser.add_argument("--one", choices=list(PRECISIONS), help=argparse.SUPPRESS)  # internal: one subprocess trial
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive, --warmup not negative")
    unknown = set(args.precisions.split(",")) - set(PRECISIONS)
    if unknown:
        parser.error(f"unknown precision(s) {sorted(unknown)}; choose from {list(PRECISIONS)}")
    return args


def trial(args: argparse.Namespace, precision: str, workdir: Path) -> list[dict]:
    """In this process: time the GAN step fed by the loader, then by synthetic tensors."""
    from deblur.config import build_config
    from deblur.train import build_accelerator, build_loader, build_models, endless

    cfg = build_config(
        {
            "output_dir": str(workdir / "run"),
            "data": {"shards": str(args.shards), "loader": args.loader, "batch_size": args.batch_size},
            "train": {"max_steps": args.steps, "checkpoint_every": args.steps, "mixed_precision": PRECISIONS[precision]},
            "wandb": {"mode": "disabled"},
        },
        "bench config",
    )
    accelerator = build_accelerator(cfg)
    gan = build_models(cfg, accelerator)
    loader = build_loader(cfg, accelerator, "train", train=True)
    if loader is None:
        raise SystemExit(f"{args.shards}: the train split is empty")
    updates = 1 + cfg.loss.g_updates_per_step
    blurred, sharp = next(iter(loader))
    feeds = {"loader": endless(loader), "synthetic": itertools.repeat((blurred.clone(), sharp.clone()))}
    results = []
    for source, batches in feeds.items():
        for i in tqdm(range(args.warmup + args.steps), desc=f"{precision} {source}", file=sys.stderr):
            if i == args.warmup:
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            for update in range(updates):
                pair = next(batches)
                (gan.d_update if update == 0 else gan.g_update)(*pair)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        images = args.steps * updates * args.batch_size
        results.append({"precision": precision, "input": source, "images_per_s": round(images / elapsed, 2),
                        "step_ms": round(1000 * elapsed / args.steps, 1)})
    return results


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(trial(args, args.one, Path(tmp))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            args.shards = Path("shards/demo")
            if not (args.shards / "manifest.json").exists():
                from deblur.shard import build_shards

                args.shards = Path(tmp) / "demo"
                print(f"building demo shards in {args.shards} (pass --shards to use your own)", file=sys.stderr)
                build_shards(None, args.shards, demo=True)
        results = []
        for precision in args.precisions.split(","):
            cmd = [sys.executable, "-m", "deblur.bench", "train", "--one", precision, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--shards", str(args.shards),
                   "--loader", args.loader]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{precision} trial failed (exit {proc.returncode}): {' '.join(cmd)}")
            results += json.loads(proc.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"training throughput on {device}: batch {args.batch_size}, {args.steps} steps "
          f"(+{args.warmup} warmup), 1 D + 3 G updates per step, {args.loader} loader")
    print(f"{'precision':<10}{'input':<11}{'images/s':>10}{'ms/step':>10}")
    for r in results:
        print(f"{r['precision']:<10}{r['input']:<11}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}")
    print(json.dumps({"benchmark": "train", "device": device, "batch_size": args.batch_size, "steps": args.steps,
                      "loader": args.loader, "shards": str(args.shards), "results": results}))
