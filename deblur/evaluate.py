"""Score a trained generator against the blurred input and classical non-blind deconvolution.

    python -m deblur.evaluate --weights runs/demo/generator.safetensors --shards shards/demo --split test

Every method is scored on the same pairs, at the training resolution (64x64), against the sharp
member resized the same way:

- ``restored``: the generator on the blurred member, decoded and resized to 64x64 by the
  training loader's own function (``deblur.loading.decode.decode_member``) and normalized, exactly
  what training feeds it;
- ``blurred``: the blurred input itself (the bar to beat);
- ``wiener`` and ``richardson_lucy``: scikit-image's deconvolutions given the TRUE kernel, rebuilt
  from the sample's json by ``deblur.shard.blur.kernel_from_params`` (for shards stored downscaled,
  after ``stored_blur`` rescales the params to the stored size). That kernel is defined at the
  stored image's resolution, so they deconvolve the stored blurred image and their results are
  then resized to 64x64 like everything else (resizing first would change the blur into one the
  kernel no longer describes). They know the blur exactly, which the generator does not.

Prints a table, then as its last line one JSON object:
``{"restored": {"psnr": .., "ssim": ..}, "blurred": {..}, "wiener": {..}, "richardson_lucy": {..}, "n": N}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from skimage.restoration import richardson_lucy, wiener
from tqdm import tqdm

from deblur.device import resolve_device
from deblur.images import decode_rgb
from deblur.infer import resize_unit, restore
from deblur.loading.decode import decode_member
from deblur.metrics import mean_scores, score_sums
from deblur.models import Generator
from deblur.shard.blur import kernel_from_params, stored_blur
from deblur.shard.format import BLURRED, MANIFEST, META, SHARP, SPLITS, ShardError, manifest_split
from deblur.weights import load_generator

CLASSICAL = ("wiener", "richardson_lucy")
METHODS = ("restored", "blurred", *CLASSICAL)

# Chosen by a sweep on 24 of the demo's test samples (README, "Using a trained model"), best PSNR
# for each method: balance 0.003-30 (0.3: 28.3 dB, 1: 29.7, 3: 30.4, 10: 30.2) and 5-50 iterations
# (5: 30.3 dB, 10: 30.9, 20: 30.1, 50: 27.8). The blurred members are 8-bit JPEGs, so weaker
# regularization or more iterations amplify that noise. Tuning on test data flatters the baselines,
# which is deliberate: they are the bar the generator is compared with.
WIENER_BALANCE = 3.0
RL_ITERATIONS = 10


@dataclass(frozen=True)
class Pair:
    key: str
    sharp: torch.Tensor  # (1, 3, S, S) in [0, 1], exactly the training loader's pixels
    blurred: torch.Tensor  # (1, 3, S, S) likewise
    blurred_stored: np.ndarray  # (H, W, 3) float64 in [0, 1] at the stored resolution
    blur: dict  # the json's "blur" params rescaled to the stored resolution


def read_pairs(tars: list[Path], image_size: int) -> Iterator[Pair]:
    """Every sample of ``tars`` in shard order (no shuffle stage: every method and run sees the
    same pairs), with both members decoded and resized by the torch loader's own function."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(t) for t in tars]), wds.tarfile_to_samples())
    for sample in pipeline:
        key = sample["__key__"]
        where = f"{sample.get('__url__', '?')}: sample {key!r}"
        try:
            blur = stored_blur(json.loads(sample[META]))
            sharp_bytes, blurred_bytes = sample[SHARP], sample[BLURRED]
        except KeyError as e:
            raise ValueError(f"{where}: missing member or key {e}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: unreadable json ({e})") from e
        yield Pair(
            key=key,
            sharp=_as_unit(decode_member(sharp_bytes, image_size, f"{where} {SHARP}")),
            blurred=_as_unit(decode_member(blurred_bytes, image_size, f"{where} {BLURRED}")),
            blurred_stored=np.asarray(decode_rgb(blurred_bytes, f"{where} {BLURRED}").image, dtype=np.float64) / 255.0,
            blur=blur,
        )


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


def deconvolved_at_model_size(pair: Pair, size: int, **settings) -> dict[str, torch.Tensor]:
    """Wiener and Richardson-Lucy at the stored resolution with the true kernel, each then
    resized to size x size.

    The loader resizes with PIL's antialiased bilinear (triangle) filter on 8-bit pixels;
    ``resize_unit`` is the same filter on floats (tests/test_evaluate.py checks they agree to
    within one grey level), so every method reaches 64x64 the same way.
    """
    try:
        kernel = kernel_from_params(pair.blur)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"sample {pair.key!r}: bad blur params {pair.blur!r} ({e})") from e
    results = {}
    for method in CLASSICAL:
        deconvolved = _as_unit(deconvolve(pair.blurred_stored, kernel, method, **settings))
        results[method] = resize_unit(deconvolved, (size, size)).clamp(0, 1)
    return results


def evaluate(
    generator: Generator,
    tars: list[Path],
    *,
    samples: int | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    wiener_balance: float = WIENER_BALANCE,
    rl_iterations: int = RL_ITERATIONS,
    progress: bool = True,
) -> dict:
    """Mean PSNR/SSIM per method over the shards' samples (the first ``limit`` if given),
    averaged by :mod:`deblur.metrics` as training's validation averages them."""
    device = next(generator.parameters()).device
    size = generator.image_size
    sums = {m: torch.zeros(2, dtype=torch.float64) for m in METHODS}
    batch: dict[str, list[torch.Tensor]] = {"sharp": [], **{m: [] for m in METHODS if m != "restored"}}

    def score_batch() -> None:
        sharp = torch.cat(batch["sharp"])
        images = {m: torch.cat(batch[m]) for m in METHODS if m != "restored"}
        images["restored"] = restore(generator, images["blurred"].to(device)).cpu()
        for method, image in images.items():
            sums[method] += score_sums(image, sharp).double()
        for members in batch.values():
            members.clear()

    n = 0
    total = limit if samples is None else samples if limit is None else min(samples, limit)
    bar = tqdm(total=total, desc="evaluate", unit="sample", disable=not progress)
    for pair in read_pairs(tars, size):
        if limit is not None and n >= limit:
            break
        batch["sharp"].append(pair.sharp)
        batch["blurred"].append(pair.blurred)
        classical = deconvolved_at_model_size(pair, size, wiener_balance=wiener_balance, rl_iterations=rl_iterations)
        for method, image in classical.items():
            batch[method].append(image)
        n += 1
        bar.update(1)
        if len(batch["sharp"]) == batch_size:
            score_batch()
    if batch["sharp"]:
        score_batch()
    bar.close()
    if n == 0:
        raise ValueError(f"no samples in {', '.join(map(str, tars))}")
    result: dict = {method: mean_scores(sums[method], n) for method in METHODS}
    result["n"] = n
    return result


def format_table(result: dict) -> str:
    lines = [f"{'method':<16} {'PSNR (dB)':>10} {'SSIM':>8}"]
    for method in METHODS:
        lines.append(f"{method:<16} {result[method]['psnr']:>10.2f} {result[method]['ssim']:>8.4f}")
    lines.append(f"({result['n']} samples, 64x64)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="generator.safetensors from training")
    parser.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per generator forward pass")
    parser.add_argument("--wiener-balance", type=float, default=WIENER_BALANCE, help="Wiener regularization weight")
    parser.add_argument("--rl-iterations", type=int, default=RL_ITERATIONS, help="Richardson-Lucy iterations")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")

    start = time.perf_counter()
    try:
        tars, samples = manifest_split(args.shards, args.split)
        if not tars:
            raise ValueError(f"{args.shards / MANIFEST}: split {args.split!r} has no shards")
        generator = load_generator(args.weights, resolve_device(args.device))
        result = evaluate(
            generator,
            tars,
            samples=samples,
            limit=args.limit,
            batch_size=args.batch_size,
            wiener_balance=args.wiener_balance,
            rl_iterations=args.rl_iterations,
        )
    except (FileNotFoundError, ValueError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(format_table(result))
    print(f"{result['n']} samples in {elapsed:.1f} s ({result['n'] / elapsed:.1f} samples/s)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
