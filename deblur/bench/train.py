"""Training throughput: ``python -m deblur.bench train [options]``.

Times the trainer's own GAN step (``GanStep.step``: 1 D update + 3 G updates, each on its own
batch) for every precision x variant, side by side in one run:

- ``eager``: contiguous (NCHW) models and batches, no compilation: the plain baseline;
- ``channels_last``: models and batches in channels_last memory format;
- ``compiled``: channels_last + ``torch.compile`` of both models (``train.compile_scope: models``);
- ``compiled_update``: channels_last + each update's forward passes and losses compiled as one
  graph (``train.compile_scope: update``);
- ``update_autotune`` / ``update_cudagraphs`` / ``models_cudagraphs``: the same with
  ``train.compile_mode`` ``max-autotune-no-cudagraphs`` / ``reduce-overhead`` (CUDA graphs; on a
  CPU inductor runs it as the default mode);
- ``hostsync``: channels_last, but the step's statistics are read on the host after every step
  (what a loop that looks at each loss does), to show what the trainer's deferred reading saves.

Each precision runs in a fresh subprocess (Accelerate keeps one mixed-precision setting per
process). Inside it every variant is warmed up first (compilation happens there), then the
variants take turns for ``--repeat`` rounds of ``--steps`` steps on synthetic input already on
the device (one loader batch, repeated), and each reports its median. The shipped setting
(``configs/ddp.yaml``'s ``auto`` choices on this machine), when it is among them, also runs fed
by the real loader (through the trainer's Feed), in the same rounds, right after its synthetic
turn, so that a shared machine's slow spells hit both alike; ``wait`` is the share of that time
spent waiting for batches. Ratios are to fp32 eager. Model FLOPs per image are counted once
(torch's FlopCounterMode over one fp32 step), so achieved TFLOP/s = FLOPs/image x images/s.

Per variant (and for the loader-fed run, the loader's work included), after its warm-up, one
step is also run under ``deblur.bench.transfers``' HostTransfers (``host ops``: operations that
move data between host and device, counted by what they are so that a CPU run shows them too;
compiled variants are counted as their eager equivalent, ``+1`` is the trainer's deliberate
read) and, on a GPU, under ``torch.cuda.set_sync_debug_mode("warn")`` (``syncs``: CUDA calls
that made the host wait), and its peak GPU memory is taken over one step. images/s counts
training pairs consumed: (1 + 3) x batch size per step.
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
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from deblur.cli import Parser

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# variant -> (channels_last, compile scope (None: no compilation), compile mode, read stats every step)
VARIANTS = {
    "eager": (False, None, "default", False),
    "channels_last": (True, None, "default", False),
    "compiled": (True, "models", "default", False),
    "compiled_update": (True, "update", "default", False),
    "update_autotune": (True, "update", "max-autotune-no-cudagraphs", False),
    "update_cudagraphs": (True, "update", "reduce-overhead", False),
    "models_cudagraphs": (True, "models", "reduce-overhead", False),
    "hostsync": (True, None, "default", True),
}
GPU_VARIANTS = "eager,channels_last,compiled,compiled_update,update_cudagraphs,hostsync"
CPU_VARIANTS = "eager,channels_last"


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = Parser(
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
        default=GPU_VARIANTS if gpu else CPU_VARIANTS,
        help=f"comma-separated, from {','.join(VARIANTS)} (each compiled one costs 30-80 s per precision on a CPU)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results (the last line) to this file")
    parser.add_argument("--one", choices=list(PRECISIONS), help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.repeat < 1:
        parser.error("--steps, --repeat and --batch-size must be positive, --warmup not negative")
    for option, allowed in (("precisions", PRECISIONS), ("variants", VARIANTS)):
        unknown = set(getattr(args, option).split(",")) - set(allowed)
        if unknown:
            parser.error(f"unknown --{option} {sorted(unknown)}; choose from {list(allowed)}")
    if args.shards is not None:
        from deblur.shard.format import MANIFEST

        if not (args.shards / MANIFEST).is_file():
            parser.error(f"--shards {args.shards}: no {MANIFEST} there (build shards with python -m deblur.shard)")
    return args


def bench_config(args: argparse.Namespace, workdir: Path, precision: str, variant: str):
    from deblur.training.config import build_config

    channels_last, scope, mode, _ = VARIANTS[variant]
    return build_config(
        {
            "output_dir": str(workdir / "run"),
            "data": {"shards": str(args.shards), "loader": args.loader, "batch_size": args.batch_size},
            "train": {
                "max_steps": 1,
                "checkpoint_every": 1,
                "mixed_precision": precision,
                "channels_last": channels_last,
                "compile": scope is not None,
                "compile_scope": scope or "models",
                "compile_mode": mode,
            },
            "wandb": {"mode": "disabled"},
        },
        "bench config",
    )


def shipped_variant(device: torch.device) -> str:
    """The variant configs/ddp.yaml runs on this device (auto compile, models scope, default mode)."""
    from deblur.training.hardware import resolve_compile

    return "compiled" if resolve_compile("auto", device)[0] else "channels_last"


def flops_per_image(gan, batch, updates: int, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        gan.step(itertools.repeat(batch))
    return counter.get_total_flops() / (updates * batch_size)


def step_probes(gan, batches, device: torch.device) -> dict:
    """One step each under HostTransfers and (GPU) the CUDA sync debug mode, one for peak memory."""
    from deblur.bench.transfers import HostTransfers

    with HostTransfers() as transfers:
        gan.step(batches)
    probes = {"host_ops": transfers.unexpected(), "deliberate": transfers.counts["deliberate"], "syncs": None}
    if transfers.unexpected():
        probes["host_op_sites"] = {kind: dict(sites) for kind, sites in transfers.sites.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                gan.step(batches)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        probes["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gan.step(batches)
        torch.cuda.synchronize()
        probes["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return probes


def trial(args: argparse.Namespace, precision: str, workdir: Path) -> dict:
    """In this process: every variant side by side on synthetic input, and the shipped setting
    fed by the loader in the same rounds."""
    from deblur.training.feed import Feed
    from deblur.training.hardware import resolve_precision
    from deblur.training.meter import Meter
    from deblur.training.setup import build_accelerator, build_loader, build_models

    variants = args.variants.split(",")
    base = bench_config(args, workdir, PRECISIONS[precision], variants[0])
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
        meter = Meter(accelerator, max_consecutive_skips=10**9)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            meter.add(gan.step(batches))
            if read_each_step:
                meter.read(0)
        meter.read(0)  # what the trainer does once per interval; waits for the device
        sync()
        return time.perf_counter() - start

    setups, probes, failed = {}, {}, []
    for name in variants:
        try:
            gan = build_models(bench_config(args, workdir, PRECISIONS[precision], name), accelerator)
            fmt = torch.channels_last if VARIANTS[name][0] else torch.contiguous_format
            batch = (blurred.contiguous(memory_format=fmt), sharp.contiguous(memory_format=fmt))
            start = time.perf_counter()
            run(gan, itertools.repeat(batch), args.warmup, False)
            warmup_s = time.perf_counter() - start
            probes[name] = {"warmup_s": round(warmup_s, 1), **step_probes(gan, itertools.repeat(batch), device)}
        except Exception as error:  # one variant's compile error or OOM must not cost the others
            print(f"{precision} {name}: failed: {error!r}", file=sys.stderr)
            failed.append({"precision": precision, "variant": name, "error": f"{type(error).__name__}: {error}"[:500]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(f"{precision} {name}: warmup {warmup_s:.1f} s", file=sys.stderr)
        setups[name] = (gan, batch, VARIANTS[name][3])

    # The shipped setting, fed by the loader, takes its turn right after its synthetic one.
    shipped_precision = resolve_precision("auto", device)[0]
    shipped = shipped_variant(device)
    feed = None
    if PRECISIONS[precision] == shipped_precision and shipped in setups:
        feed = Feed(loader, updates, None)
        run(setups[shipped][0], feed, args.warmup, False)
        fed_probes = step_probes(setups[shipped][0], feed, device)  # the loader's own transfers included
    seconds = {name: [] for name in setups}
    fed, waits = [], []
    for _ in tqdm(range(args.repeat), desc=f"{precision} rounds", file=sys.stderr):
        for name, (gan, batch, read_each_step) in setups.items():
            seconds[name].append(run(gan, itertools.repeat(batch), args.steps, read_each_step))
            if feed is not None and name == shipped:
                feed.wait = 0.0
                fed.append(run(gan, feed, args.steps, False))
                waits.append(feed.wait / fed[-1])

    def result(name: str, input_: str, times: list[float], **extra) -> dict:  # extra overrides probes
        elapsed = statistics.median(times)
        return {
            "precision": precision,
            "variant": name,
            "input": input_,
            "images_per_s": round(images / elapsed, 2),
            "step_ms": round(1000 * elapsed / args.steps, 2),
            "rounds_images_per_s": [round(images / t, 2) for t in times],
            **probes[name],
            **extra,
        }

    results = [result(name, "synthetic", times) for name, times in seconds.items()]
    if fed:
        wait = round(statistics.median(waits), 3)
        results.append(result(shipped, "loader", fed, **fed_probes, wait_fraction=wait))
    flops = None
    if precision == "fp32" and "eager" in setups:
        gan, batch, _ = setups["eager"]
        flops = flops_per_image(gan, batch, updates, args.batch_size)
    return {
        "results": results,
        "failed": failed,
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
        results, failed, flops, shipped = [], [], None, None
        for precision in args.precisions.split(","):
            out = run_trial(args, precision)
            results += out["results"]
            failed += out["failed"]
            flops = flops or out["flops_per_image"]
            shipped = out["shipped"]
    summary = report(args, results, flops, shipped, failed)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


def run_trial(args: argparse.Namespace, precision: str, timeout: float | None = None) -> dict:
    """One precision's :func:`trial` in a fresh process (its JSON line)."""
    cmd = [sys.executable, "-m", "deblur.bench", "train", "--one", precision]
    for option in ("steps", "warmup", "repeat", "batch_size", "shards", "loader", "variants"):
        cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{precision} trial failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(
    args: argparse.Namespace, results: list[dict], flops: float | None, shipped: dict, failed: list[dict]
) -> dict:
    """Print the table (and the variants that failed) and the JSON line; return the JSON object."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    annotate(results, flops)
    print(
        f"training throughput on {device}: batch {args.batch_size}, {args.steps} steps x {args.repeat} rounds "
        f"(+{args.warmup} warmup), 1 D + 3 G updates per step, medians"
    )
    if flops:
        print(f"model FLOPs per training image: {flops / 1e9:.2f} GFLOP (one fp32 step, torch FlopCounterMode)")
    print(f"shipped config on this machine: {shipped['precision']} + {shipped['variant']}")
    print(table(results))
    for failure in failed:
        print(f"{failure['precision']} {failure['variant']} failed: {failure['error']}")
    summary = {
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
        "failed": failed,
    }
    print(json.dumps(summary))
    return summary


def annotate(results: list[dict], flops: float | None) -> None:
    """Add each result's ratio to fp32 eager (synthetic) and its achieved TFLOP/s."""
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


def _cell(r: dict, key: str, fmt: str = "{}", width: int = 9) -> str:
    value = r.get(key)
    return f"{'-' if value is None else fmt.format(value):>{width}}"


def table(results: list[dict]) -> str:
    """The readable table of :func:`trial` results."""
    lines = [
        f"{'precision':<10}{'variant':<19}{'input':<10}{'images/s':>10}{'ms/step':>10}{'x fp32 eager':>13}"
        f"{'TFLOP/s':>9}{'host ops':>9}{'syncs':>6}{'peak GiB':>9}{'wait':>6}{'warmup s':>9}"
    ]
    for r in results:
        ratio = f"{r['vs_fp32_eager']:.2f}x" if r.get("vs_fp32_eager") else "-"
        host_ops = f"{r['host_ops']}+{r['deliberate']}"
        lines.append(
            f"{r['precision']:<10}{r['variant']:<19}{r['input']:<10}{r['images_per_s']:>10.1f}{r['step_ms']:>10.1f}"
            f"{ratio:>13}{_cell(r, 'tflops', '{:.2f}')}{host_ops:>9}{_cell(r, 'syncs', width=6)}"
            f"{_cell(r, 'peak_gib', '{:.2f}')}{_cell(r, 'wait_fraction', '{:.2f}', 6)}{_cell(r, 'warmup_s', '{:.1f}')}"
        )
    return "\n".join(lines)
