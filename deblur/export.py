"""Export a trained generator to ONNX.

    python -m deblur.export --weights runs/demo/generator.safetensors --onnx generator.onnx

The graph takes ``input`` of shape (batch, 3, 64, 64), ImageNet-normalized like the training
loader's tensors (see ``deblur.norm``), and returns ``output`` in the same space; the batch axis
is dynamic. Uses torch's dynamo-based exporter (``torch.onnx.export(dynamo=True)``, the default
in torch 2.9+), which needs onnxscript.

The ``--onnx`` path is checked before the export runs (a folder, an existing file without
``--overwrite``, a place that cannot be written: one line, exit status 2); the model is written
to a temporary file beside it and renamed when complete, so a failed export leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from deblur.cli import Parser
from deblur.errors import InputError, from_os_error, run_main
from deblur.models import Generator
from deblur.weights import load_generator

# ONNX Runtime >= 1.18 runs opset 18; the dynamo exporter's own default may move ahead of it.
OPSET = 18


def export_onnx(generator: Generator, path: str | Path) -> Path:
    """Write ``generator`` to ``path`` as a single self-contained ONNX file with a dynamic batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = generator.to("cpu").eval()
    size = generator.image_size
    # batch 2, not 1: torch.export specializes dimensions whose example value is 0 or 1
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        generator,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes={"x": {0: batch}},
        # ~6M parameters fit well under ONNX's 2 GB protobuf limit: keep one file, no .data sidecar
        external_data=False,
    )
    return path


def claim_output(path: Path, overwrite: bool) -> Path:
    """Before the export runs: refuse an ``--onnx`` path that cannot be written (a folder, an
    existing file without ``--overwrite``, a folder that cannot be created or written) and
    create the temporary file the export goes to (renamed over ``path`` once complete)."""
    if path.is_dir():
        raise InputError(f"--onnx {path}: is a folder")
    if path.exists() and not overwrite:
        raise InputError(f"--onnx {path}: exists already; choose another path or pass --overwrite")
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise InputError(f"--onnx {path}: cannot write there ({error.strerror or error})") from None
    return partial


def run(args: argparse.Namespace) -> int:
    generator = load_generator(args.weights)
    partial = claim_output(args.onnx, args.overwrite)
    start = time.perf_counter()
    try:
        export_onnx(generator, partial)
        os.replace(partial, args.onnx)
    except OSError as error:
        error.filename = str(args.onnx)
        raise from_os_error(error, "writing") from None
    finally:
        partial.unlink(missing_ok=True)
    size = args.onnx.stat().st_size
    print(f"wrote {args.onnx} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m deblur.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, required=True, help="generator.safetensors from training")
    parser.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")
    return run_main(lambda: run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
