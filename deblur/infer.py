"""Deblur image files with a trained generator.

    python -m deblur.infer --weights runs/demo/generator.safetensors --out restored/ blurry/*.jpg

Writes one file per input under ``--out`` (``<input stem>.png`` by default). The generator takes
64x64 inputs (trained on whole faces resized to 64x64, or on 64x64 crops of real pairs), so
inputs of other sizes are handled by one of two modes:

- ``--mode resize`` (default): resize the whole image to 64x64 (as the training loader does),
  restore it, and add the restored *detail* (restored minus blurred, both at 64x64), upsampled,
  onto the original image. The output keeps the input's size and the model sees a whole face, as
  in training; what it can add is limited to detail at the 64-px scale.
- ``--mode tiles``: run the model on overlapping 64x64 tiles at native resolution (50% overlap,
  blended with a Hann window whose shifted copies sum to one; the borders are padded by
  reflection). Right for blur that is a few pixels wide at native resolution, and the mode for
  a generator trained on crops (``data.crop: true``); a face-trained one sees patches, not
  the faces it was trained on. ``python -m deblur.evaluate --mode full`` scores through it.

In ``resize`` mode a 64x64 input gets exactly the generator's output. Files that cannot be read
are reported and skipped; the exit status is 1 if any failed (2 if nothing could start).

Nothing is overwritten that this run did not write: an output name that exists already is
refused before any work (``--overwrite`` replaces such files, never an input). Bad options,
weights and an unusable ``--out`` are one line and exit status 2; a write that fails (disk
full) removes its partial file, ends the run with one line and exit status 1, and leaves the
outputs finished before it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from deblur.cli import Parser, at_least
from deblur.device import device_option
from deblur.errors import InputError, from_os_error, run_main
from deblur.images import ImageError, load_rgb
from deblur.models import Generator
from deblur.norm import denormalize, normalize
from deblur.weights import load_generator

MODES = ("resize", "tiles")
FORMATS = ("png", "jpg", "webp")
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def resize_unit(unit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize NCHW [0, 1] images to ``size`` (h, w), antialiased when shrinking.

    Antialiased bilinear matches the training loader's resize (DALI's ``resize`` is linear with
    antialiasing on by default), so the model sees inputs filtered like those it learned from.
    """
    return F.interpolate(unit, size=size, mode="bilinear", antialias=True, align_corners=False)


@torch.inference_mode()
def restore(generator: Generator, unit: torch.Tensor) -> torch.Tensor:
    """Generator on NCHW [0, 1] images at its training size -> restored [0, 1] images."""
    return denormalize(generator(normalize(unit))).clamp(0, 1)


def restore_resize(generator: Generator, unit: torch.Tensor) -> torch.Tensor:
    """``--mode resize`` on one (1, 3, H, W) image: restore at 64, add the detail back at H x W."""
    size = generator.image_size
    small = resize_unit(unit, (size, size))
    detail = restore(generator, small) - small
    if unit.shape[-2:] != small.shape[-2:]:
        # upsampling: bicubic keeps the restored edges sharper than bilinear
        detail = F.interpolate(detail, size=unit.shape[-2:], mode="bicubic", align_corners=False)
    return (unit + detail).clamp(0, 1)


def restore_tiles(generator: Generator, unit: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``--mode tiles`` on one (1, 3, H, W) image: overlapping tiles at native resolution."""
    tile = generator.image_size
    stride = tile // 2
    h, w = unit.shape[-2:]
    # margin = stride on every side, so each real pixel lies under a full set of overlapping
    # windows (the periodic Hann window's copies shifted by half its length sum to exactly 1);
    # extra bottom/right padding makes the padded size land on the tile grid. numpy's "reflect"
    # keeps reflecting when the image is smaller than the pad (torch's refuses).
    pad_h, pad_w = stride + (-h) % stride, stride + (-w) % stride
    padded = np.pad(unit[0].cpu().numpy(), ((0, 0), (stride, pad_h), (stride, pad_w)), mode="reflect")
    padded = torch.from_numpy(padded).to(unit.device)[None]
    ph, pw = padded.shape[-2:]

    tiles = F.unfold(padded, kernel_size=tile, stride=stride)  # (1, 3*tile*tile, n)
    tiles = tiles[0].T.reshape(-1, 3, tile, tile)
    restored = torch.cat([restore(generator, b) for b in tiles.split(batch_size)])

    window = torch.hann_window(tile, periodic=True, device=unit.device)
    window = (window[:, None] * window[None, :]).expand(3, tile, tile)
    cols = (restored * window).reshape(len(restored), -1).T[None]
    weights = window.reshape(-1, 1).expand(-1, len(restored))[None]
    blended = F.fold(cols, (ph, pw), kernel_size=tile, stride=stride)
    norm = F.fold(weights, (ph, pw), kernel_size=tile, stride=stride)
    out = blended / norm.clamp_min(1e-6)
    return out[..., stride : stride + h, stride : stride + w].clamp(0, 1)


def read_rgb(path: Path) -> torch.Tensor:
    """Read an image file as a (1, 3, H, W) float tensor in [0, 1].

    The shard builder's reader: every format it accepts (JPEG/PNG/WebP by content, EXIF
    orientation, 16-bit, palette, alpha) reads here too, and failures raise ``ImageError``
    naming the file.
    """
    array = np.asarray(load_rgb(path), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def encode_rgb(unit: torch.Tensor, fmt: str) -> bytes:
    """A (1, 3, H, W) [0, 1] tensor as the bytes of a ``fmt`` file (one of FORMATS)."""
    array = (unit[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    # quality applies to the lossy formats (jpg, webp); PNG ignores it
    Image.fromarray(array).save(buffer, format=PIL_FORMATS[fmt], quality=95)
    return buffer.getvalue()


def write_output(path: Path, data: bytes, overwrite: bool) -> None:
    """Write one finished output. Without ``overwrite`` the file must not exist (created
    exclusively, so not even a file that appeared since the check is replaced); with it, the
    data goes to a temporary file renamed over ``path``. A failed write (disk full) removes
    what it wrote and raises, naming ``path``."""
    target = path.with_name(f".{path.name}.{os.getpid()}.partial") if overwrite else path
    created = False
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if overwrite:
            os.replace(target, path)
    except BaseException as error:
        if created:
            target.unlink(missing_ok=True)
        if isinstance(error, OSError):
            error.filename = str(path)  # write() errors carry no file name; the output's is the one to name
            raise from_os_error(error, "writing") from None
        raise


def output_paths(inputs: list[Path], out_dir: Path, fmt: str, overwrite: bool = False) -> list[Path]:
    """``out_dir/<stem>.<fmt>`` per input; refuses collisions with inputs or with each other,
    and (unless ``overwrite``) outputs that already exist: this run did not write them."""
    outputs = [out_dir / f"{p.stem}.{fmt}" for p in inputs]
    resolved_inputs = {p.resolve(): p for p in inputs}
    seen: dict[Path, Path] = {}
    for src, dst in zip(inputs, outputs):
        key = dst.resolve()
        if key in resolved_inputs:
            raise InputError(f"output {dst} would overwrite input {resolved_inputs[key]}; choose another --out")
        if key in seen:
            raise InputError(f"inputs {seen[key]} and {src} would both be written to {dst}")
        seen[key] = src
        if dst.is_dir():
            raise InputError(f"output {dst} is a folder; choose another --out")
        if dst.exists() and not overwrite:
            raise InputError(
                f"output {dst} already exists (not written by this run); choose another --out or pass --overwrite"
            )
    return outputs


def prepare_out(out: Path) -> None:
    """Create ``--out`` if needed and prove it writable, before any work."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".deblur-infer-{os.getpid()}.probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise InputError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m deblur.infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files to deblur")
    parser.add_argument("--weights", type=Path, required=True, help="generator.safetensors from training")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--mode", choices=MODES, default="resize", help="how to handle sizes other than 64x64")
    parser.add_argument("--format", choices=FORMATS, default="png", help="output file format")
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass in --mode tiles")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace output files that exist already (never an input)"
    )
    args = parser.parse_args(argv)
    at_least("--batch-size", args.batch_size, 1)
    return args


def run(args: argparse.Namespace) -> int:
    device = device_option(args.device)
    outputs = output_paths(args.images, args.out, args.format, args.overwrite)
    generator = load_generator(args.weights, device)
    prepare_out(args.out)

    failed: list[Path] = []
    start = time.perf_counter()
    # A context manager: an error mid-way (disk full) closes the bar before its message is printed.
    with tqdm(list(zip(args.images, outputs)), desc=f"deblur ({args.mode})", unit="img") as bar:
        for src, dst in bar:
            try:
                unit = read_rgb(src).to(device)
            except ImageError as e:
                tqdm.write(f"error: {e}", file=sys.stderr)
                failed.append(src)
                continue
            if args.mode == "resize":
                restored = restore_resize(generator, unit)
            else:
                restored = restore_tiles(generator, unit, args.batch_size)
            write_output(dst, encode_rgb(restored, args.format), args.overwrite)
    elapsed = time.perf_counter() - start
    done = len(outputs) - len(failed)
    print(
        f"restored {done} of {len(outputs)} images into {args.out} in {elapsed:.1f} s ({done / elapsed:.1f} images/s)"
    )
    if failed:
        print(f"{len(failed)} failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
