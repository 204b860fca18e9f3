"""Input-pipeline benchmark, all on the same pairs in one run.

    python -m deblur.bench loader --shards shards/demo [--batch-size 64] [--seconds 10] [--repeat 3]
    python -m deblur.bench loader --shards shards/full --small-shards shards/small64
    python -m deblur.bench loader --crop --frames 512          # ROI vs full decode, 1280x720 pairs

Measures (blurred, sharp) pairs per second of one split's pairs for

* ``dali``: ``make_loader(backend="dali")`` (shuffle and flip on, as in training);
* ``torch``: ``make_loader(backend="torch")`` (index reads + DataLoader, same settings);
* ``original``: the way of the reference code this project reimplements: the same pairs
  exported once to two folders of PNG files with identical names, read with PIL + torchvision
  Resize/ToTensor/Normalize, a shuffling torch DataLoader with as many workers as cores;
* ``raw_decode``: the machine's JPEG decode rate for the same pairs, decode only, all cores: the
  faster of ``raw_decode_pil`` (both members decoded by PIL from bytes already in memory, one
  process per worker) and ``raw_decode_dali`` (a DALI pipeline of just the webdataset reader and
  the CPU decoder, as many threads as workers);
* ``decode_ceiling`` (only with a GPU): a DALI pipeline of the reader and the GPU ("mixed")
  decoder with the loader's own threads and ``hw_decoder_load``: the most the DALI loader could
  deliver on this machine; ``dali_fraction_of_ceiling`` is the share it reaches (without a
  GPU the ceiling is ``raw_decode``).

With ``--small-shards`` (the same photographs built with ``python -m deblur.shard
--store-size PX``), ``dali``, ``torch``, ``raw_decode_dali`` (and ``decode_ceiling``) also run on
those, as ``<method>_small``, in the same rounds; ``dali_small_x_dali`` is the gain of storing
images small.

``--crop`` measures patch training instead (``make_loader(..., crop=True)``): pairs/s of
``--image-size`` crop pairs, over ``--shards`` or over ``--frames N`` GoPro-sized pairs it
builds from the demo photographs (``--frame-size``, default 1280x720; deblur/bench/frames.py):

* ``dali_roi``: the DALI crop loader as training runs it, region-of-interest decoding
  (``fn.decoders.image_slice``: only the window is decoded);
* ``dali_full_decode``: the same loader with the full decode then ``fn.slice``;
* ``torch_full_decode``: the torch backend's crop (simplejpeg decodes everything, then a slice);
* with a GPU, ``dali_roi_gpu`` and ``dali_full_decode_gpu`` on the GPU ("mixed") decoders too.

``roi_x_full_decode`` is the ROI gain in pairs/s (and ``roi_cpu_x_full_decode`` in CPU time
per pair); the target on the CPU is 2x.

Every method is built once and warmed up for ``--warmup`` seconds (pipeline build, worker
start-up, shuffle-buffer fill, allocator growth: a DALI loader's first seconds run 25-30 %
slow). Then ``--repeat`` rounds measure each method for ``--seconds``, the methods taking turns
within a round so that a shared machine's slow spells hit all of them alike; each method's
rate is the median of its rounds. Streams run across epoch boundaries, so epoch-start costs
(the loaders' shuffle buffers, the original way's worker restarts) are counted as a user pays
them. Before each measurement the bench waits until the previous method's prefetching has
stopped, so no method is charged for another's work. Each measurement also records the CPU
time it used (this process and its worker processes), as microseconds per pair: it does not
fall when other jobs take the cores the way pairs/s does (though a virtual machine's per-core
speed still drifts, about +-8 % within minutes here), so ``dali_cpu_x_original`` and
``dali_cpu_fraction_of_raw_decode`` (against the cheaper decode) estimate the two target ratios
on idle cores. Prints a table of medians with each one's ratio to the original way, its
fraction of the raw decode rate, its CPU cost and each round's rate; the last line is one JSON
object (rates in pairs/s).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from nvidia.dali import fn, pipeline_def, types
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from deblur.bench.frames import write_gopro_frames
from deblur.cli import Parser, at_least, positive
from deblur.errors import InputError
from deblur.loading.contract import find_shards, read_members, usable_cores
from deblur.loading.loader import make_loader
from deblur.norm import IMAGENET_MEAN, IMAGENET_STD
from deblur.shard.build import build_shards
from deblur.shard.format import MANIFEST, META, PAIR_MEMBERS, SPLITS, read_samples
from deblur.shard.settings import BuildSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="python -m deblur.bench loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=None, help="shard dataset folder")
    parser.add_argument(
        "--small-shards",
        type=Path,
        default=None,
        help="the same photographs built with --store-size, measured alongside",
    )
    parser.add_argument("--split", choices=SPLITS, default="train", help="split to read (default train)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per method and round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each method's rate is its median")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds each method runs before the rounds")
    parser.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="DALI threads / DataLoader workers / decode processes (default: cores)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to export the PNG folders or build --frames (default: a temporary folder)",
    )
    parser.add_argument("--crop", action="store_true", help="measure crop pairs: ROI decoding vs full decode + crop")
    parser.add_argument(
        "--frames", type=int, default=None, help="with --crop: build this many GoPro-sized pairs instead of --shards"
    )
    parser.add_argument(
        "--frame-size", type=int, nargs=2, default=(1280, 720), metavar=("W", "H"), help="of --frames (1280 720)"
    )
    args = parser.parse_args(argv)
    for option in ("--batch-size", "--image-size", "--repeat", "--workers"):
        at_least(option, getattr(args, option[2:].replace("-", "_")), 1)
    if args.frames is not None:
        if not args.crop or args.shards is not None:
            raise InputError("--frames: builds the pairs of --crop, instead of --shards (give --crop, not --shards)")
        at_least("--frames", args.frames, args.batch_size)
        at_least("--frame-size", min(args.frame_size), args.image_size)
    elif args.shards is None:
        raise InputError("--shards is required (or, with --crop, --frames N)")
    if args.crop and args.small_shards is not None:
        raise InputError("--small-shards: compares resize-mode loaders; it does not go with --crop")
    positive("--seconds", args.seconds)
    at_least("--warmup", args.warmup, 0)
    if args.warmup == float("inf"):
        raise InputError(f"--warmup: must be finite, got {args.warmup}")
    if args.workdir is not None and not args.workdir.is_dir():
        raise InputError(f"--workdir {args.workdir}: not a folder")
    for option, root in (("--shards", args.shards), ("--small-shards", args.small_shards)):
        if root is None:
            continue
        total = sum(s.samples for s in find_shards(root, args.split))  # names the file at fault
        if total < args.batch_size:
            raise InputError(
                f"--batch-size {args.batch_size}: more than the {total} {args.split} pairs of {option} {root}"
            )
    if args.small_shards:  # the comparison only means something on the same photographs
        sources = [json.loads((root / MANIFEST).read_text()).get("source") for root in (args.shards, args.small_shards)]
        if sources[0] != sources[1]:
            raise InputError(f"--shards and --small-shards were built from different sources: {sources}")
    return args


def read_pairs(shards: Path, split: str) -> list[tuple[str, bytes, bytes]]:
    """(key, blurred JPEG, sharp JPEG) of every sample of the split, read by index offsets."""
    members = read_members(find_shards(shards, split))
    # zip of one iterator with itself takes it two items at a time: each sample yields its
    # blurred member, then its sharp one (the PAIR_MEMBERS order).
    return [(name.split(".", 1)[0], blurred, sharp) for (_, name, blurred), (_, _, sharp) in zip(members, members)]


def export_png_folders(pairs: list[tuple[str, bytes, bytes]], root: Path) -> tuple[Path, Path]:
    """The original project's layout: blurred/<key>.png and sharp/<key>.png."""
    folders = root / "blurred", root / "sharp"
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for key, *members in tqdm(pairs, desc="export PNG folders", unit="pair"):
        for folder, data in zip(folders, members):
            Image.open(io.BytesIO(data)).convert("RGB").save(folder / f"{key}.png")
    return folders


class FolderPairs(Dataset):
    """The original project's dataset: same file name in a blurred and a sharp folder."""

    def __init__(self, blurred: Path, sharp: Path, image_size: int):
        self.blurred, self.sharp = blurred, sharp
        self.names = sorted(p.name for p in blurred.iterdir())
        self.transform = transforms.Compose(
            [
                transforms.Resize((image_size, image_size)),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        return tuple(
            self.transform(Image.open(folder / self.names[i]).convert("RGB")) for folder in (self.blurred, self.sharp)
        )


# A method runs for about ``seconds`` and says how many pairs it delivered in how long.
Method = Callable[[float], tuple[int, float]]


@dataclass(frozen=True)
class Reading:
    pairs: int
    seconds: float
    cpu_seconds: float  # this process and its children (DALI threads, DataLoader/pool workers)

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds

    @property
    def cpu_us_per_pair(self) -> float:
        return 1e6 * self.cpu_seconds / self.pairs


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process, its live children and its reaped children.

    The difference over a measurement is what a method cost in CPU, whether its work ran in
    DALI's threads or in worker processes; unlike pairs/s it does not drop when the machine's
    other tenants take the cores (a virtual machine's per-core speed still drifts).
    """
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:  # exited since listed: counted as reaped next time
            continue
        total += child_times.user + child_times.system
    return total


def pair_counts(epoch: Callable[[], Iterable]) -> Iterator[int]:
    """Pairs per batch, epoch after epoch, forever (each call of ``epoch`` is the next epoch)."""
    while True:
        for blurred, _ in epoch():
            if torch.cuda.is_available() and blurred.is_cuda:
                torch.cuda.synchronize()  # count a GPU batch when it is ready, not when queued
            yield len(blurred)


def stream_method(counts: Iterator[int]) -> Method:
    """Pairs/s of the next ``seconds`` of a batch stream (whole batches; the stream continues
    where the previous measurement stopped, so warm-up happens once)."""

    def run(seconds: float) -> tuple[int, float]:
        pairs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            pairs += next(counts)
        return pairs, elapsed

    return run


_decode_pairs: list[tuple[str, bytes, bytes]] = []


def _keep_pairs(pairs):
    global _decode_pairs
    _decode_pairs = pairs


def _decode_for(args: tuple[int, int, float]) -> tuple[int, float]:
    """Decode both members of this worker's share of the pairs, round and round, for ``seconds``."""
    worker, workers, seconds = args
    mine = _decode_pairs[worker::workers] or _decode_pairs
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, blurred, sharp = mine[done % len(mine)]
        for data in (blurred, sharp):
            Image.open(io.BytesIO(data)).load()
        done += 1
    return done, time.perf_counter() - start


def pil_decode_method(pool, workers: int) -> Method:
    """All workers decoding in parallel, one process each (PIL holds the GIL between images)."""

    def run(seconds: float) -> tuple[int, float]:
        start = time.perf_counter()
        results = pool.map(_decode_for, [(w, workers, seconds) for w in range(workers)])
        return sum(done for done, _ in results), time.perf_counter() - start

    return run


@pipeline_def
def decode_only_pipeline(shards: Path, split: str, gpu: bool = False, hw_decoder_load: float = 0.65):
    found = find_shards(shards, split)
    jpegs = fn.readers.webdataset(
        paths=[str(s.tar) for s in found], index_paths=[str(s.idx) for s in found], ext=list(PAIR_MEMBERS)
    )
    decoder = dict(device="mixed", hw_decoder_load=hw_decoder_load) if gpu else dict(device="cpu")
    return tuple(fn.decoders.image(member, output_type=types.RGB, **decoder) for member in jpegs)


def dali_decode_counts(
    shards: Path, split: str, batch_size: int, threads: int, gpu: bool = False, hw_decoder_load: float = 0.65
) -> Iterator[int]:
    pipe = decode_only_pipeline(
        shards,
        split,
        gpu,
        hw_decoder_load,
        batch_size=batch_size,
        num_threads=threads,
        device_id=torch.cuda.current_device() if gpu else None,
    )
    pipe.build()
    while True:
        pipe.run()
        if gpu:
            torch.cuda.synchronize()  # count a batch when decoded, not when queued (as pair_counts)
        yield batch_size


def shard_set_methods(shards: Path, split: str, suffix: str, loader_options: dict) -> dict[str, Method]:
    """The loaders over one shard folder, its CPU decode-only rate and, with a GPU, its ceiling."""
    loaders = {backend: make_loader(shards, split, backend=backend, **loader_options) for backend in ("dali", "torch")}
    batch_size, workers = loader_options["batch_size"], loader_options["num_workers"]
    methods: dict[str, Method] = {
        f"{backend}{suffix}": stream_method(pair_counts(lambda loader=loader: loader))
        for backend, loader in loaders.items()
    }
    methods[f"raw_decode_dali{suffix}"] = stream_method(dali_decode_counts(shards, split, batch_size, workers))
    if torch.cuda.is_available():
        dali = loaders["dali"]
        methods[f"decode_ceiling{suffix}"] = stream_method(
            dali_decode_counts(
                shards, split, batch_size, dali.decode_threads, gpu=True, hw_decoder_load=dali.hw_decoder_load
            )
        )
    return methods


def settle(poll: float = 0.2, idle_cores: float = 0.05, limit: float = 10.0) -> None:
    """Wait until this process tree is idle: a stream stopped mid-epoch keeps decoding its
    prefetched batches for a moment, and that work must not be charged to the next method."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        before = tree_cpu_seconds()
        time.sleep(poll)
        if tree_cpu_seconds() - before < idle_cores * poll:
            return


def run_rounds(methods: dict[str, Method], repeat: int, seconds: float, warmup: float) -> dict[str, list[Reading]]:
    """Warm every method up once, then ``repeat`` rounds in which the methods take turns, each
    starting once the previous one's prefetching has died down."""
    rounds: dict[str, list[Reading]] = {name: [] for name in methods}
    with tqdm(total=len(methods) * (repeat + 1), desc="measuring", unit="run") as bar:
        for name, method in methods.items():
            bar.set_postfix_str(f"warming up {name}")
            method(warmup)
            bar.update()
        for _ in range(repeat):
            for name, method in methods.items():
                settle()
                cpu_before = tree_cpu_seconds()
                pairs, elapsed = method(seconds)
                rounds[name].append(Reading(pairs, elapsed, tree_cpu_seconds() - cpu_before))
                bar.set_postfix_str(f"{name} {rounds[name][-1].rate:.0f} pairs/s")
                bar.update()
    return rounds


def crop_methods(shards: Path, split: str, loader_options: dict) -> dict[str, Method]:
    """ROI decoding vs full decode + crop: the DALI crop loader both ways (on the CPU, and on the
    GPU when there is one) and the torch backend's crop."""
    devices = {"": "cpu"} | ({"_gpu": "cuda"} if torch.cuda.is_available() else {})
    methods: dict[str, Method] = {}
    for suffix, device in devices.items():
        for name, roi in (("dali_roi", True), ("dali_full_decode", False)):
            loader = make_loader(shards, split, backend="dali", crop=True, device=device, **loader_options)
            loader.roi = roi
            methods[f"{name}{suffix}"] = stream_method(pair_counts(lambda loader=loader: loader))
    torch_loader = make_loader(shards, split, backend="torch", crop=True, device="cpu", **loader_options)
    methods["torch_full_decode"] = stream_method(pair_counts(lambda: torch_loader))
    return methods


def crop_main(args: argparse.Namespace) -> None:
    """``--crop``: see the module docstring."""
    loader_options = dict(
        batch_size=args.batch_size, image_size=args.image_size, shuffle=True, flip=True, num_workers=args.workers
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        shards = args.shards
        if shards is None:
            w, h = args.frame_size
            print(f"building {args.frames} {w}x{h} pairs from the demo photographs in {tmp}")
            root = write_gopro_frames(Path(tmp) / "frames", args.frames, (w, h))
            shards = Path(tmp) / "shards"
            build_shards(BuildSettings(gopro=root, out=shards, val_fraction=0, test_fraction=0, workers=args.workers))
        found = find_shards(shards, args.split)
        first = next(read_samples(found[0].tar, (META,)))[1][META]
        member = json.loads(first)["size"]
        pairs = sum(s.samples for s in found)
        print(
            f"{pairs} {args.split} pairs of {member[0]}x{member[1]} from {shards}, {args.image_size}x"
            f"{args.image_size} crops, batch {args.batch_size}, {args.workers} workers; {args.repeat} rounds of "
            f"{args.seconds:g} s per method after {args.warmup:g} s warm-up; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        rounds = run_rounds(crop_methods(shards, args.split, loader_options), args.repeat, args.seconds, args.warmup)
    rates = {name: statistics.median(r.rate for r in readings) for name, readings in rounds.items()}
    cpu_us = {name: statistics.median(r.cpu_us_per_pair for r in readings) for name, readings in rounds.items()}
    print(f"\n{'method':<22}{'pairs/s':>10}{'CPU us/pair':>13}   rounds (pairs/s)")
    for name, rate in rates.items():
        print(f"{name:<22}{rate:>10.0f}{cpu_us[name]:>13.0f}   {' '.join(f'{r.rate:.0f}' for r in rounds[name])}")
    summary: dict = {"mode": "crop", **{name: round(rate, 1) for name, rate in rates.items()}}
    for suffix in ("", "_gpu") if "dali_roi_gpu" in rates else ("",):
        gain = rates[f"dali_roi{suffix}"] / rates[f"dali_full_decode{suffix}"]
        summary[f"roi_x_full_decode{suffix}"] = round(gain, 2)
    summary.update(
        roi_cpu_x_full_decode=round(cpu_us["dali_full_decode"] / cpu_us["dali_roi"], 2),
        roi_x_torch=round(rates["dali_roi"] / rates["torch_full_decode"], 2),
        statistic=f"median of {args.repeat} rounds of {args.seconds:g} s after {args.warmup:g} s warm-up",
        rounds={name: [round(r.rate, 1) for r in readings] for name, readings in rounds.items()},
        cpu_us_per_pair={name: round(value, 1) for name, value in cpu_us.items()},
        member_size=member,
        crop=args.image_size,
        pairs=pairs,
        batch_size=args.batch_size,
        workers=args.workers,
        loadavg_1min=round(os.getloadavg()[0], 2),
    )
    print(json.dumps(summary))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.crop:
        return crop_main(args)
    pairs = read_pairs(args.shards, args.split)
    small = f" and {args.small_shards} (as *_small)" if args.small_shards else ""
    print(
        f"{len(pairs)} {args.split} pairs from {args.shards}{small}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, {args.workers} workers; {args.repeat} rounds of "
        f"{args.seconds:g} s per method after {args.warmup:g} s warm-up; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    loader_options = dict(
        batch_size=args.batch_size, image_size=args.image_size, shuffle=True, flip=True, num_workers=args.workers
    )
    context = multiprocessing.get_context("fork")
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as tmp,
        context.Pool(args.workers, initializer=_keep_pairs, initargs=(pairs,)) as pool,
    ):
        folders = FolderPairs(*export_png_folders(pairs, Path(tmp)), image_size=args.image_size)
        original = DataLoader(
            folders, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers
        )
        methods = shard_set_methods(args.shards, args.split, "", loader_options)
        methods["original"] = stream_method(pair_counts(lambda: original))
        methods["raw_decode_pil"] = pil_decode_method(pool, args.workers)
        if args.small_shards:
            methods |= shard_set_methods(args.small_shards, args.split, "_small", loader_options)
        rounds = run_rounds(methods, args.repeat, args.seconds, args.warmup)
    rates = {name: statistics.median(r.rate for r in readings) for name, readings in rounds.items()}
    cpu_us = {name: statistics.median(r.cpu_us_per_pair for r in readings) for name, readings in rounds.items()}
    raw = max(("raw_decode_pil", "raw_decode_dali"), key=rates.get)
    # Strict on both counts: the faster decode's rate, the cheaper decode's CPU.
    rates["raw_decode"] = rates[raw]
    cpu_us["raw_decode"] = min(cpu_us["raw_decode_pil"], cpu_us["raw_decode_dali"])
    suffixes = ["", "_small"] if args.small_shards else [""]
    for suffix in suffixes:  # the most the DALI loader could deliver on each set
        ceiling = (
            f"decode_ceiling{suffix}"
            if f"decode_ceiling{suffix}" in rates
            else ("raw_decode" if not suffix else "raw_decode_dali_small")
        )
        rates[f"ceiling{suffix}"] = rates[ceiling]

    # "of ceiling": against the decode-only ceiling of the method's own shard set
    print(f"\n{'method':<22}{'pairs/s':>10}{'x original':>12}{'of ceiling':>12}{'CPU us/pair':>13}   rounds (pairs/s)")
    for name, rate in rates.items():
        if name.startswith("ceiling"):
            continue
        ceiling = rates["ceiling_small" if name.endswith("_small") else "ceiling"]
        each = " ".join(f"{r.rate:.0f}" for r in rounds.get(name, []))
        print(
            f"{name:<22}{rate:>10.0f}{rate / rates['original']:>12.2f}{rate / ceiling:>12.2f}"
            f"{cpu_us[name]:>13.0f}   {each}"
        )
    summary = {name: round(rate, 1) for name, rate in rates.items()}
    for suffix in suffixes:
        summary[f"dali{suffix}_fraction_of_ceiling"] = round(rates[f"dali{suffix}"] / rates[f"ceiling{suffix}"], 3)
    if args.small_shards:
        summary["dali_small_x_dali"] = round(rates["dali_small"] / rates["dali"], 2)
        summary["torch_small_x_torch"] = round(rates["torch_small"] / rates["torch"], 2)
    summary.update(
        torch_x_original=round(rates["torch"] / rates["original"], 2),
        torch_cpu_x_raw_decode=round(cpu_us["torch"] / cpu_us["raw_decode"], 2),
        dali_x_original=round(rates["dali"] / rates["original"], 2),
        dali_fraction_of_raw_decode=round(rates["dali"] / rates["raw_decode"], 2),
        raw_decode_method=f"faster of PIL (process per worker, bytes in memory) and DALI CPU decode-only: {raw}",
        statistic=f"median of {args.repeat} rounds of {args.seconds:g} s after {args.warmup:g} s warm-up",
        rounds={name: [round(r.rate, 1) for r in readings] for name, readings in rounds.items()},
        cpu_us_per_pair={name: round(value, 1) for name, value in cpu_us.items()},
        # The same two ratios in CPU time per pair: what they would be with the cores to itself.
        dali_cpu_x_original=round(cpu_us["original"] / cpu_us["dali"], 2),
        dali_cpu_fraction_of_raw_decode=round(cpu_us["raw_decode"] / cpu_us["dali"], 2),
        pairs=len(pairs),
        batch_size=args.batch_size,
        workers=args.workers,
        loadavg_1min=round(os.getloadavg()[0], 2),
    )
    print(json.dumps(summary))
