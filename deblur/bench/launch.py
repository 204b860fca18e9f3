"""The trainer as a launcher starts it, against a plain fp32 eager step: ``python -m deblur.bench launch``.

Issue 16's target: ``accelerate launch --num_processes 1`` with ``configs/ddp.yaml`` against a
plain fp32 eager step of the same models and losses at the same batch. Each round runs both,
one after the other (``--repeat`` rounds, alternating), and reports medians and their ratio:

- ``trainer``: ``accelerate launch --num_processes 1 launch/train.py --config configs/ddp.yaml``
  with only the data, the batch size, the number of steps and the output folder overridden (so
  its auto precision, channels_last, compile setting and threads, whatever accelerate launch put
  in OMP_NUM_THREADS), fed by its real loader. Its images/s is the trainer's own
  ``perf/images_per_s`` in ``log.jsonl`` (validation and checkpoints excluded), median over the
  steps after ``--warmup``.
- ``plain``: a fresh ``python`` process with torch's default threads stepping the trainer's GAN
  step (deblur.training.gan: the same models and losses) in fp32, eager, NCHW, on one synthetic
  batch already in memory; median over its steps after ``--warmup``.

images/s counts training pairs consumed: (1 + 3) x batch size per step. Each process pays its
start-up (imports, the DALI pipeline, the first step) outside the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"
CONFIG = ROOT / "configs" / "ddp.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deblur.bench launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shards", type=Path, help="dataset (default: shards/demo, built into a temporary folder if missing)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="pairs per update (configs/ddp.yaml's: 128)")
    parser.add_argument("--steps", type=int, default=3, help="timed GAN steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed GAN steps first")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of trainer then plain; medians over rounds")
    parser.add_argument(
        "--trainer-override",
        action="append",
        default=[],
        metavar="key.sub=value",
        help="a further config override for the trainer runs (e.g. train.threads=1), repeatable",
    )
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # internal: one plain run
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must not be negative, got {args.warmup}")
    if args.shards is not None and not (args.shards / "manifest.json").is_file():
        parser.error(f"--shards {args.shards}: no manifest.json there; build shards with python -m deblur.shard")
    return args


def plain_run(args: argparse.Namespace) -> dict:
    """In this process: the GAN step in fp32, eager, NCHW, with torch's default threads."""
    import torch
    from accelerate import Accelerator

    from deblur.training.config import build_config
    from deblur.training.setup import build_models

    cfg = build_config(
        {
            "output_dir": "unused",
            "data": {"shards": str(args.shards), "batch_size": args.batch_size},
            "train": {"max_steps": 1, "checkpoint_every": 1, "compile": False, "channels_last": False},
        },
        "bench plain config",
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    gan = build_models(cfg, accelerator)
    generator = torch.Generator().manual_seed(0)
    batch = tuple(torch.randn(args.batch_size, 3, 64, 64, generator=generator).to(accelerator.device) for _ in "ab")
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    seconds = []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        gan.step(iter([batch] * (1 + cfg.loss.g_updates_per_step)))
        sync()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    images = (1 + cfg.loss.g_updates_per_step) * args.batch_size
    return {"images_per_s": images / statistics.median(seconds), "threads": torch.get_num_threads()}


def trainer_run(args: argparse.Namespace, out: Path) -> dict:
    """``accelerate launch --num_processes 1`` of the shipped config; the trainer's own figure."""
    steps = args.warmup + args.steps
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--num_processes",
        "1",
        str(TRAIN),
        "--config",
        str(CONFIG),
        f"data.shards={args.shards}",
        f"data.batch_size={args.batch_size}",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.eval_every={10**9}",
        f"train.checkpoint_every={10**9}",
        "wandb.mode=disabled",
        *args.trainer_override,
    ]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if status != 0:
        raise SystemExit(f"the trainer run failed (exit {status}); its output: {log}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["perf/images_per_s"] for r in rows if "perf/images_per_s" in r and r["step"] > args.warmup]
    chosen = [line for line in log.read_text().splitlines() if line.startswith(("precision:", "threads:"))]
    return {"images_per_s": statistics.median(rates), "settings": chosen}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.plain:
        print(json.dumps(plain_run(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards is None:
            args.shards = ROOT / "shards" / "demo"
            if not (args.shards / "manifest.json").is_file():
                args.shards = Path(tmp) / "demo"
                print(f"building demo shards in {args.shards} (pass --shards to use your own)", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "deblur.shard", "--demo", "--out", str(args.shards)], check=True)
        rounds = []
        for round_ in range(args.repeat):
            trainer = trainer_run(args, Path(tmp) / f"trainer-{round_}")
            plain_cmd = [sys.executable, "-m", "deblur.bench", "launch", "--plain", *plain_argv(args)]
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default threads
            proc = subprocess.run(plain_cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"the plain run failed (exit {proc.returncode}): {' '.join(plain_cmd)}")
            plain = json.loads(proc.stdout.strip().splitlines()[-1])
            rounds.append({"trainer": trainer["images_per_s"], "plain": plain["images_per_s"]})
            print(
                f"round {round_ + 1}/{args.repeat}: trainer {trainer['images_per_s']:.1f} img/s, "
                f"plain fp32 eager {plain['images_per_s']:.1f} img/s ({plain['threads']} threads)",
                file=sys.stderr,
            )
    report(args, rounds, trainer["settings"])


def plain_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--shards",
        str(args.shards),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]


def report(args: argparse.Namespace, rounds: list[dict], settings: list[str]) -> None:
    trainer = statistics.median(r["trainer"] for r in rounds)
    plain = statistics.median(r["plain"] for r in rounds)
    print(
        f"accelerate launch --num_processes 1 with configs/ddp.yaml vs a plain fp32 eager step, batch "
        f"{args.batch_size}, {args.steps} steps (+{args.warmup} warmup) x {args.repeat} rounds, medians"
    )
    for line in settings:
        print(f"  trainer {line}")
    print(f"trainer {trainer:.1f} img/s, plain {plain:.1f} img/s: {trainer / plain:.2f}x")
    result = {
        "benchmark": "launch",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "shards": str(args.shards),
        "trainer_overrides": args.trainer_override,
        "rounds": rounds,
        "trainer_images_per_s": round(trainer, 2),
        "plain_images_per_s": round(plain, 2),
        "ratio": round(trainer / plain, 3),
    }
    print(json.dumps(result))
