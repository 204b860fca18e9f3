"""What a durable checkpoint costs: ``python -m deblur.bench checkpoint [--repeat 5] [--dir DIR]``.

Saves the full-size models (generator, discriminator, both Adam states and the generator's
EMA, as the trainer does, one process) with deblur.training.checkpoint.save_checkpoint,
alternating two ways: as shipped (every file, the manifest, the folder and its parent
fsynced) and with ``os.fsync`` made a no-op, so the difference is the price of durability.
Both write the sha256 manifest; verifying one checkpoint (what resuming does before loading
it) is timed on its own. ``os.sync()`` runs, untimed, before every save so that neither way
pays for the other's dirty pages. ``--dir`` should be on the filesystem the runs write to
(default: a temporary folder under the current one). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from accelerate import Accelerator

from deblur.cli import Parser, at_least
from deblur.errors import Fault, InputError
from deblur.models import Discriminator, Generator
from deblur.training.checkpoint import save_checkpoint, verify_checkpoint


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(
        prog="python -m deblur.bench checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=5, help="saves per way; each way's figure is its median")
    parser.add_argument("--dir", type=Path, default=Path("."), help="where the temporary checkpoints go")
    args = parser.parse_args(argv)
    at_least("--repeat", args.repeat, 1)
    if not args.dir.is_dir():
        raise InputError(f"--dir {args.dir}: not a folder")
    return args


class BenchState:
    """The run state a checkpoint holds besides Accelerate's objects (TrainState's interface):
    a step, the EMA of G (as large as G), an empty loader position and trainer.json."""

    def __init__(self, generator: Generator) -> None:
        self.step = 0
        self.loader = SimpleNamespace(state_dict=dict)  # a position of {} (no loader here)
        self.ema = {k: v.detach().clone() for k, v in generator.state_dict().items()}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ema.safetensors": self.ema}


def prepared_models(accelerator: Accelerator) -> BenchState:
    """The trainer's models and optimizers, prepared, after one update so Adam's moments exist;
    the rest of the run's state."""
    models = [Generator(residual=True), Discriminator()]
    optimizers = [torch.optim.Adam(m.parameters()) for m in models]
    images = torch.randn(2, 3, 64, 64)
    for model, optimizer in zip(models, optimizers):
        model(images).float().mean().backward()
        optimizer.step()
    accelerator.prepare(*models, *optimizers)
    return BenchState(models[0])


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:  # before any work: --dir must take the checkpoints
        workdir = tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-checkpoint-")
    except OSError as error:
        raise InputError(f"--dir {args.dir}: cannot write there ({error.strerror or error})") from None
    accelerator = Accelerator()
    state = prepared_models(accelerator)
    seconds: dict[str, list[float]] = {"durable": [], "no fsync": []}
    verify_s = []
    with workdir as tmp:
        checkpoints = Path(tmp) / "checkpoints"
        for step in range(args.repeat):
            state.step = step
            for way in seconds:
                os.sync()
                start = time.perf_counter()
                with mock.patch("os.fsync") if way == "no fsync" else contextlib.nullcontext():
                    final = save_checkpoint(
                        accelerator, checkpoints / way.replace(" ", "-"), state, "bench: true\n", keep=1
                    )
                seconds[way].append(time.perf_counter() - start)
            start = time.perf_counter()
            problems = verify_checkpoint(final)
            verify_s.append(time.perf_counter() - start)
            if problems:
                raise Fault(f"{final}: the checkpoint just saved does not verify: {problems[0]}")
        size_mb = sum(p.stat().st_size for p in final.iterdir()) / 2**20
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    print(
        f"checkpoint of {size_mb:.1f} MiB (G + D + Adam states + EMA) in {args.dir.resolve()}, "
        f"median of {args.repeat} saves:"
    )
    for way, median in medians.items():
        print(
            f"  {way:<9} {1000 * median:8.1f} ms per save   (all: {', '.join(f'{1000 * s:.0f}' for s in seconds[way])})"
        )
    print(
        f"  fsync cost {1000 * (medians['durable'] - medians['no fsync']):8.1f} ms per save; "
        f"verifying one checkpoint {1000 * statistics.median(verify_s):.1f} ms"
    )
    print(
        json.dumps(
            {
                "benchmark": "checkpoint",
                "size_mib": round(size_mb, 1),
                "repeat": args.repeat,
                "median_ms": {way: round(1000 * m, 1) for way, m in medians.items()},
                "verify_ms": round(1000 * statistics.median(verify_s), 1),
                "all_ms": {way: [round(1000 * s, 1) for s in v] for way, v in seconds.items()},
            }
        )
    )
