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

Before any scoring the split is checked as training checks it (``deblur.shard.check``: the
manifest, every index against its tar, every tar against its sha256), so a truncated or changed
shard fails before any work. Shards are then read at their ``.idx`` offsets
(``deblur.shard.format.read_samples``, as the loaders read them); a member that does not decode
or a json that does not parse is one line naming the shard and the member.

Prints a table, then as its last line one strict JSON object (no NaN):
``{"restored": {"psnr": .., "ssim": ..}, "blurred": {..}, "wiener": {..}, "richardson_lucy": {..}, "n": N}``;
a method whose output held NaN or inf for some sample has ``"psnr": null, "ssim": null`` and a
``"reason"``.
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
from deblur.infer import resize_unit, restore
from deblur.loading.decode import decode_member
from deblur.metrics import mean_scores, score_sums
from deblur.models import Generator
from deblur.shard.blur import kernel_from_params, stored_blur
from deblur.shard.check import check_dataset
from deblur.shard.format import BLURRED, MANIFEST, META, SHARP, SPLITS, ShardError, read_samples, split_shards
from deblur.weights import load_generator

CLASSICAL = ("wiener", "richardson_lucy")
METHODS = ("restored", "blurred", *CLASSICAL)

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
    sharp: torch.Tensor  # (1, 3, S, S) in [0, 1], exactly the torch loader's pixels
    blurred: torch.Tensor  # (1, 3, S, S) likewise
    blurred_stored: np.ndarray  # (H, W, 3) float64 in [0, 1] at the stored resolution
    blur: dict  # the json's "blur" params rescaled to the stored resolution


def read_meta(data: bytes, where: str) -> dict:
    """A sample's json member -> its blur params at the stored resolution; ShardError if the
    member is not UTF-8 JSON of the builder's shape."""
    try:
        return stored_blur(json.loads(data.decode("utf-8")))
    except UnicodeDecodeError as e:
        raise ShardError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{where}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardError(f"{where}: not a sample json of this format ({type(e).__name__}: {e})") from None


def read_pairs(tars: list[Path], image_size: int) -> Iterator[Pair]:
    """Every sample of ``tars`` in shard order (no shuffle stage: every method and run sees the
    same pairs), read at the index offsets, both members decoded and resized by the torch
    loader's own function."""
    for tar in tars:
        for key, members in read_samples(tar):
            where = f"shard {tar} sample {key}"
            member = f"shard {tar} member {key}."
            try:
                blurred_stored = decode_rgb(members[BLURRED], f"{member}{BLURRED}").image
            except ImageError as e:
                raise ShardError(str(e)) from None
            yield Pair(
                key=key,
                where=where,
                sharp=_as_unit(decode_member(members[SHARP], image_size, f"{member}{SHARP}")),
                blurred=_as_unit(decode_member(members[BLURRED], image_size, f"{member}{BLURRED}")),
                blurred_stored=np.asarray(blurred_stored, dtype=np.float64) / 255.0,
                blur=read_meta(members[META], f"{member}{META}"),
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
        deconvolved = _as_unit(deconvolve(pair.blurred_stored, kernel, method, **settings))
        results[method] = resize_unit(deconvolved, (size, size)).clamp(0, 1)
    return results


def non_finite(images: torch.Tensor) -> int:
    """How many images of an NCHW batch hold a NaN or inf."""
    return int((~torch.isfinite(images.flatten(1)).all(1)).sum())


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
    averaged by :mod:`deblur.metrics` as training's validation averages them. A method whose
    output held NaN or inf for any sample gets no score: ``None`` and a ``reason``."""
    device = next(generator.parameters()).device
    size = generator.image_size
    sums = {m: torch.zeros(2, dtype=torch.float64) for m in METHODS}
    bad = dict.fromkeys(METHODS, 0)
    batch: dict[str, list[torch.Tensor]] = {"sharp": [], **{m: [] for m in METHODS if m != "restored"}}

    def score_batch() -> None:
        sharp = torch.cat(batch["sharp"])
        images = {m: torch.cat(batch[m]) for m in METHODS if m != "restored"}
        images["restored"] = restore(generator, images["blurred"].to(device)).cpu()
        for method, image in images.items():
            bad[method] += non_finite(image)
            sums[method] += score_sums(image, sharp).double()
        for members in batch.values():
            members.clear()

    n = 0
    total = limit if samples is None else samples if limit is None else min(samples, limit)
    # A context manager: an error mid-way closes the bar before its message is printed.
    with tqdm(total=total, desc="evaluate", unit="sample", disable=not progress) as bar:
        for pair in read_pairs(tars, size):
            if limit is not None and n >= limit:
                break
            batch["sharp"].append(pair.sharp)
            batch["blurred"].append(pair.blurred)
            settings = dict(wiener_balance=wiener_balance, rl_iterations=rl_iterations)
            for method, image in deconvolved_at_model_size(pair, size, **settings).items():
                batch[method].append(image)
            n += 1
            bar.update(1)
            if len(batch["sharp"]) == batch_size:
                score_batch()
        if batch["sharp"]:
            score_batch()
    if n == 0:
        raise InputError(f"no samples in {', '.join(map(str, tars))}")
    result: dict = {}
    for method in METHODS:
        scores = mean_scores(sums[method], n)
        if bad[method] or not all(math.isfinite(v) for v in scores.values()):
            reason = f"its output held NaN or inf for {bad[method]} of {n} samples"
            scores = {"psnr": None, "ssim": None, "reason": reason}
        result[method] = scores
    result["n"] = n
    return result


def format_table(result: dict) -> str:
    lines = [f"{'method':<16} {'PSNR (dB)':>10} {'SSIM':>8}"]
    for method in METHODS:
        scores = result[method]
        if scores["psnr"] is None:
            lines.append(f"{method:<16} {'n/a':>10} {'n/a':>8}   ({scores['reason']})")
        else:
            lines.append(f"{method:<16} {scores['psnr']:>10.2f} {scores['ssim']:>8.4f}")
    lines.append(f"({result['n']} samples, 64x64)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(
        prog="python -m deblur.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, required=True, help="generator.safetensors from training")
    parser.add_argument("--shards", type=Path, required=True, help="shard folder with manifest.json")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per generator forward pass")
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
