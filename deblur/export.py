"""Export a trained generator to ONNX.

    python -m deblur.export --weights runs/demo/generator.safetensors --onnx generator.onnx

The graph takes ``input`` of shape (batch, 3, 64, 64), ImageNet-normalized like the training
loader's tensors (see ``deblur.norm``), and returns ``output`` in the same space; the batch axis
is dynamic. Uses torch's dynamo-based exporter (``torch.onnx.export(dynamo=True)``, the default
in torch 2.9+), which needs onnxscript.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="generator.safetensors from training")
    parser.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    args = parser.parse_args(argv)
    try:
        generator = load_generator(args.weights)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    start = time.perf_counter()
    path = export_onnx(generator, args.onnx)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
