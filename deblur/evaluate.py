"""Score a trained generator against the blurred input and classical non-blind deconvolution.

    python -m deblur.evaluate --weights runs/demo/generator.safetensors --shards shards/demo --split test
    python -m deblur.evaluate --weights runs/gopro/generator.safetensors --shards shards/gopro --mode full

Every method is scored on the same pairs, against the sharp member seen the same way. What is
scored is ``--mode``'s:

- ``resize`` (default, the CelebA recipe's): each member resized whole to the training
  resolution (64x64) by the training loader's own function (``deblur.loading.decode``);
- ``crop`` (patch training's, ``data.crop: true``): the 64x64 window the loaders use for
  evaluation (one fixed window per sample, ``deblur.loading.crops.crop_window``), cut at the
  stored resolution: exactly what validation scores;
- ``full``: the whole stored frame, restored through the tiled inference path
  (``deblur.infer.restore_tiles``: overlapping 64x64 tiles, Hann-blended) and scored at full
  resolution, the way GoPro results are reported.

The methods:

- ``restored``: the generator on the blurred member (normalized exactly as training feeds it);
- ``blurred``: the blurred input itself (the bar to beat);
- ``wiener`` and ``richardson_lucy``: scikit-image's deconvolutions given the TRUE kernel, rebuilt
  from the sample's json by ``deblur.shard.blur.kernel_from_params`` (for shards stored downscaled,
  after ``stored_blur`` rescales the params to the stored size). That kernel is defined at the
  stored image's resolution, so they deconvolve the stored blurred image, and their results are
  then resized, cut or kept like everything else (resizing first would change the blur into one
  the kernel no longer describes). They know the blur exactly, which the generator does not.
  On photographed pairs (``python -m deblur.shard --sharp/--gopro/--pairs``) there is no kernel:
  they are not applicable and get no score (never an invented one).

Before any scoring the split is checked as training checks it (``deblur.shard.check``: the
manifest, every index against its tar, every tar against its sha256), so a truncated or changed
shard fails before any work. Shards are then read at their ``.idx`` offsets
(``deblur.shard.format.read_samples``, as the loaders read them); a member that does not decode
or a json that does not parse is one line naming the shard and the member.

Prints a table, then as its last line one strict JSON object (no NaN):
``{"restored": {"psnr": .., "ssim": ..}, "blurred": {..}, "wiener": {..}, "richardson_lucy": {..}, "n": N, "mode": M}``;
a method that got no score has ``"psnr": null, "ssim": null`` and a ``"reason"``: its output
held NaN or inf for some sample, or (the classical methods on real pairs) it is not applicable.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.restoration import richardson_lucy, wiener
from tqdm import tqdm

from deblur.cli import Parser, at_least, positive
from deblur.device import device_option
from deblur.errors import InputError, run_main
from deblur.images import ImageError, decode_rgb
from deblur.infer import resize_unit, restore, restore_tiles
from deblur.loading.crops import Window, crop_window, jpeg_size
from deblur.loading.decode import decode_crop, decode_full, decode_member
from deblur.metrics import mean_scores, score_sums
from deblur.models import Generator
from deblur.shard.blur import is_real, kernel_from_params, stored_blur
from deblur.shard.check import check_dataset
from deblur.shard.format import BLURRED, MANIFEST, META, SHARP, SPLITS, ShardError, read_samples, split_shards
from deblur.weights import load_generator

CLASSICAL = ("wiener", "richardson_lucy")
METHODS = ("restored", "blurred", *CLASSICAL)
MODES = ("resize", "crop", "full")
NO_KERNEL = "not applicable: the blur is real (photographed pairs), there is no kernel to deconvolve with"

# Chosen by a sweep on 24 of the demo's test samples (docs/use.md, "Score against classical
# deconvolution"), best PSNR
# for each method: balance 0.003-30 (0.3: 28.3 dB, 1: 29.7, 3: 30.4, 10: 30.2) and 5-50 iterations
# (5: 30.3 dB, 10: 30.9, 20: 30.1, 50: 27.8). The blurred members are 8-bit JPEGs, so weaker
# regularization or more iterations amplify that noise. Tuning on test data flatters the baselines,
# which is deliberate: they are the bar the generator is compared with.
WIENER_BALANCE = 3.0
RL_ITERATIONS = 10


@dataclass(frozen=True)
class Pair:
    key: str
    where: str  # "shard <tar> sample <key>", for messages
    sharp: torch.Tensor  # (1, 3, h, w) in [0, 1] as --mode scores it: exactly the torch loader's pixels
    blurred: torch.Tensor  # (1, 3, h, w) likewise
    blurred_stored: np.ndarray | None  # (H, W, 3) float64 in [0, 1] at the stored resolution; None: real blur
    blur: dict | None  # the json's "blur" params rescaled to the stored resolution; None: real blur (no kernel)
    window: Window | None  # --mode crop: where sharp and blurred were cut


def read_meta(data: bytes, where: str) -> dict | None:
    """A sample's json member -> its blur params at the stored resolution (None for a real
    pair); ShardError if the member is not UTF-8 JSON of the builder's shape."""
    try:
        meta = json.loads(data.decode("utf-8"))
        return None if is_real(meta["blur"]) else stored_blur(meta)
    except UnicodeDecodeError as e:
        raise ShardError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{where}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardError(f"{where}: not a sample json of this format ({type(e).__name__}: {e})") from None


def read_pairs(tars: list[Path], image_size: int, mode: str = "resize") -> Iterator[Pair]:
    """Every sample of ``tars`` in shard order (no shuffle stage: every method and run sees the
    same pairs), read at the index offsets, both members decoded (and resized or cut, as
    ``mode`` says) by the torch loader's own functions."""
    for tar in tars:
        for key, members in read_samples(tar):
            where = f"shard {tar} sample {key}"
            member = f"shard {tar} member {key}."
            blur = read_meta(members[META], f"{member}{META}")
            window = None
            if mode == "crop":  # the loaders' evaluation window (shuffle=False: fixed per key)
                size = jpeg_size(members[SHARP], f"{member}{SHARP}")
                try:
                    window = crop_window(key, size, image_size, seed=0, epoch=0, random=False, flip=False)
                except ValueError as e:
                    raise ShardError(f"{member}{SHARP}: {e}; score it with --mode resize or full") from None
            views = {ext: _view(members[ext], f"{member}{ext}", mode, image_size, window) for ext in (SHARP, BLURRED)}
            stored = None
            if blur is not None:  # the classical methods deconvolve the stored image
                try:
                    stored = decode_rgb(members[BLURRED], f"{member}{BLURRED}").image
                except ImageError as e:
                    raise ShardError(str(e)) from None
            yield Pair(
                key=key,
                where=where,
                sharp=views[SHARP],
                blurred=views[BLURRED],
                blurred_stored=None if stored is None else np.asarray(stored, dtype=np.float64) / 255.0,
                blur=blur,
                window=window,
            )


def _view(data: bytes, where: str, mode: str, size: int, window: Window | None) -> torch.Tensor:
    """One member as ``mode`` scores it, (1, 3, h, w) in [0, 1]."""
    if mode == "resize":
        return _as_unit(decode_member(data, size, where))
    if mode == "crop":
        return decode_crop(data, window.x, window.y, size, where)[None].float() / 255.0
    return _as_unit(decode_full(data, where))


def _as_unit(image: np.ndarray) -> torch.Tensor:
    """HWC image (uint8 or [0, 1] float) -> (1, 3, H, W) float32 in [0, 1]."""
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None] / scale


def deconvolve(
    blurred: np.ndarray,
    kernel: np.ndarray,
    method: str,
    *,
    wiener_balance: float = WIENER_BALANCE,
    rl_iterations: int = RL_ITERATIONS,
) -> np.ndarray:
    """Non-blind deconvolution of an HWC [0, 1] image, channel by channel.

    Both methods treat the border as periodic (Wiener) or as zeros (Richardson-Lucy's 'same'
    convolution); padding by reflection first and cropping afterwards keeps the ringing that
    causes at the border off the scored image.
    """
    pad = max(kernel.shape)
    padded = np.pad(blurred, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    channels = []
    for c in range(padded.shape[2]):
        if method == "wiener":
            channels.append(wiener(padded[..., c], kernel, balance=wiener_balance, clip=True))
        elif method == "richardson_lucy":
            channels.append(richardson_lucy(padded[..., c], kernel, num_iter=rl_iterations, clip=True))
        else:
            raise ValueError(f"unknown deconvolution method {method!r}")
    return np.clip(np.stack(channels, axis=-1)[pad:-pad, pad:-pad], 0.0, 1.0)


def deconvolved(pair: Pair, mode: str, size: int, **settings) -> dict[str, torch.Tensor]:
    """Wiener and Richardson-Lucy at the stored resolution with the true kernel, each then seen
    as ``mode`` sees the members: resized to size x size, cut at the pair's window, or whole.

    The torch loader resizes 8-bit pixels with torch's antialiased bilinear (triangle) filter
    (deblur.loading.decode); ``resize_unit`` is the same filter on floats (tests/test_evaluate.py
    checks they agree to within one grey level), so every method reaches 64x64 the same way.
    """
    try:
        kernel = kernel_from_params(pair.blur)
    except (KeyError, ValueError, TypeError) as e:
        raise ShardError(f"{pair.where}: bad blur params {pair.blur!r} in its json ({e})") from None
    results = {}
    for method in CLASSICAL:
        image = _as_unit(deconvolve(pair.blurred_stored, kernel, method, **settings))
        if mode == "resize":
            image = resize_unit(image, (size, size))
        elif mode == "crop":
            image = image[..., pair.window.y : pair.window.y + size, pair.window.x : pair.window.x + size]
        results[method] = image.clamp(0, 1)
    return results


def non_finite(images: torch.Tensor) -> int:
    """How many images of an NCHW batch hold a NaN or inf."""
    return int((~torch.isfinite(images.flatten(1)).all(1)).sum())


def evaluate(
    generator: Generator,
    tars: list[Path],
    *,
    mode: str = "resize",
    samples: int | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    wiener_balance: float = WIENER_BALANCE,
    rl_iterations: int = RL_ITERATIONS,
    progress: bool = True,
) -> dict:
    """Mean PSNR/SSIM per method over the shards' samples (the first ``limit`` if given), seen as
    ``mode`` says, averaged by :mod:`deblur.metrics` as training's validation averages them. A
    method that got no score (NaN or inf in its output, no kernel for the classical methods) is
    ``None`` with a ``reason``. ``batch_size``: pairs per generator pass, or in ``full`` mode
    tiles per pass."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = next(generator.parameters()).device
    size = generator.image_size
    sums = {m: torch.zeros(2, dtype=torch.float64) for m in METHODS}
    bad = dict.fromkeys(METHODS, 0)
    scored = dict.fromkeys(METHODS, 0)
    pending: list[Pair] = []  # waiting for one generator pass

    def score(method: str, images: torch.Tensor, sharp: torch.Tensor) -> None:
        bad[method] += non_finite(images)
        sums[method] += score_sums(images, sharp).double()
        scored[method] += len(images)

    def restore_pending() -> None:
        if mode == "full":  # whole frames, each through the tiled path
            for pair in pending:
                score("restored", restore_tiles(generator, pair.blurred.to(device), batch_size).cpu(), pair.sharp)
        elif pending:
            blurred = torch.cat([p.blurred for p in pending]).to(device)
            score("restored", restore(generator, blurred).cpu(), torch.cat([p.sharp for p in pending]))
        pending.clear()

    n = 0
    total = limit if samples is None else samples if limit is None else min(samples, limit)
    settings = dict(wiener_balance=wiener_balance, rl_iterations=rl_iterations)
    # A context manager: an error mid-way closes the bar before its message is printed.
    with tqdm(total=total, desc=f"evaluate ({mode})", unit="sample", disable=not progress) as bar:
        for pair in read_pairs(tars, size, mode):
            if limit is not None and n >= limit:
                break
            score("blurred", pair.blurred, pair.sharp)
            if pair.blur is not None:
                for method, image in deconvolved(pair, mode, size, **settings).items():
                    score(method, image, pair.sharp)
            pending.append(pair)
            n += 1
            bar.update(1)
            if len(pending) == batch_size or mode == "full":
                restore_pending()
        restore_pending()
    if n == 0:
        raise InputError(f"no samples in {', '.join(map(str, tars))}")
    result: dict = {}
    for method in METHODS:
        scores = mean_scores(sums[method], scored[method])
        if scored[method] < n:  # only the classical methods skip samples: those without a kernel
            missing = n - scored[method]
            reason = NO_KERNEL if missing == n else f"no kernel for {missing} of {n} samples (real blur)"
            scores = {"psnr": None, "ssim": None, "reason": reason}
        elif bad[method] or not all(math.isfinite(v) for v in scores.values()):
            reason = f"its output held NaN or inf for {bad[method]} of {n} samples"
            scores = {"psnr": None, "ssim": None, "reason": reason}
        result[method] = scores
    result["n"] = n
    result["mode"] = mode
    return result


MODE_NOTES = {
    "resize": "64x64, whole images resized",
    "crop": "64x64 crops at stored resolution, the loaders' evaluation windows",
    "full": "full frames at stored resolution, restored in overlapping 64x64 tiles",
}


def format_table(result: dict) -> str:
    lines = [f"{'method':<16} {'PSNR (dB)':>10} {'SSIM':>8}"]
    for method in METHODS:
        scores = result[method]
        if scores["psnr"] is None:
            lines.append(f"{method:<16} {'n/a':>10} {'n/a':>8}   ({scores['reason']})")
        else:
            lines.append(f"{method:<16} {scores['psnr']:>10.2f} {scores['ssim']:>8.4f}")
    lines.append(f"({result['n']} samples, {MODE_NOTES[result['mode']]})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m deblur.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, required=True, help="generator.safetensors from training")
    parser.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="resize",
        help="what is scored: whole images resized to 64x64 (default), the loaders' 64x64 evaluation crops "
        "(patch training), or full frames restored in tiles",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="samples (with --mode full: tiles) per generator forward pass"
    )
    parser.add_argument("--wiener-balance", type=float, default=WIENER_BALANCE, help="Wiener regularization weight")
    parser.add_argument("--rl-iterations", type=int, default=RL_ITERATIONS, help="Richardson-Lucy iterations")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    at_least("--limit", args.limit, 1)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--rl-iterations", args.rl_iterations, 1)
    positive("--wiener-balance", args.wiener_balance)
    return args


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = device_option(args.device)
    shards = split_shards(args.shards, args.split)
    if not shards:
        raise InputError(f"{args.shards / MANIFEST}: split {args.split!r} has no shards")
    generator = load_generator(args.weights, device)
    # Up front, as training checks it: every index against its tar, every tar against its sha256.
    check_dataset(args.shards, splits=(args.split,), decode=())
    result = evaluate(
        generator,
        [s.tar for s in shards],
        mode=args.mode,
        samples=sum(s.samples for s in shards),
        limit=args.limit,
        batch_size=args.batch_size,
        wiener_balance=args.wiener_balance,
        rl_iterations=args.rl_iterations,
    )
    elapsed = time.perf_counter() - start
    print(format_table(result))
    print(f"{result['n']} samples in {elapsed:.1f} s ({result['n'] / elapsed:.1f} samples/s)")
    print(json.dumps(result, allow_nan=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
