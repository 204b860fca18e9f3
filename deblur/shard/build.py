"""Build training shards from a folder of sharp photographs.

    python -m deblur.shard --src ~/data/celeba/img_align_celeba --out shards/celeba
    python -m deblur.shard --demo --out shards/demo
    python -m deblur.shard --verify shards/celeba

Each image is decoded and checked, given a deterministic blurred twin, assigned to a split and
written into shuffled WebDataset tars with a DALI index beside each tar; ``manifest.json`` is
written last. Work is done per shard: a shard is published (``.partial`` then rename) together
with a small record in ``<out>/.build/`` so a rerun skips finished shards, and ``--part I/N``
builds shards I, I+N, I+2N, ...; whichever run finds every shard finished writes the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from deblur.files import sha256_file, write_atomic
from deblur.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
from deblur.shard import demo as demo_data
from deblur.shard.blur import BlurConfig, apply_blur, draw_params
from deblur.shard.format import BLURRED, MANIFEST, META, SAMPLE_MEMBERS, SHARP, SPLITS, index_path, stored_size
from deblur.shard.sources import (
    Item,
    Shard,
    find_partition,
    hash_split,
    list_files,
    make_keys,
    plan_shards,
    read_partition,
)
from deblur.shard.tario import build_tar

JPEG_QUALITY = 95  # blurred member, and the sharp member when the source cannot be stored as-is
RECORDS = ".build"  # per-shard completion records (resume and --part)
DEMO_SOURCE = ".demo-src"  # where --demo materializes its CelebA-shaped folder inside --out
SHARD_SIZE = 1000  # ~25 MB tars for CelebA: about 200 train shards to spread over ranks
# The demo has ~300 training crops; small shards still give every rank and loader worker
# whole shards of its own (webdataset splits by shard, not by sample).
DEMO_SHARD_SIZE = 64
# --store-size: PIL's antialiased bilinear (triangle) filter, the loaders' own resize filter, so
# a stored-small image reaches 64x64 through the same kind of filter as a full-size one.
STORE_FILTER = Image.Resampling.BILINEAR


class ShardSettings(BaseModel):
    """Everything that decides the bytes of a build (and so its resume fingerprint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    val_fraction: float = Field(0.05, ge=0.0, le=1.0)
    test_fraction: float = Field(0.05, ge=0.0, le=1.0)
    shard_size: int = Field(SHARD_SIZE, gt=0)
    min_size: int = Field(64, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    jpeg_quality: int = Field(JPEG_QUALITY, ge=1, le=100)
    blur: BlurConfig = BlurConfig()
    # Shorter side of the stored members in px (never upscaled); None = the source's size.
    store_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _fractions(self) -> ShardSettings:
        if self.val_fraction + self.test_fraction > 1.0:
            raise ValueError("val_fraction + test_fraction must be <= 1")
        return self


# ----------------------------------------------------------------------------- worker side


def keep_freed_heap() -> None:
    """Stop glibc from handing freed heap back to the OS after every image.

    Each blur allocates and frees a few MB of FFT buffers; with glibc's defaults the freed top
    of the heap is trimmed and the next image page-faults the same memory back in. Measured on
    178x218 crops: ~1.6 ms of kernel time per image, a third of all CPU time. 64 MB of top pad
    (kept, not returned) removes it. A no-op where there is no glibc ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_top_pad = -2  # from glibc's malloc.h
    mallopt(m_top_pad, 64 << 20)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


Members = list[tuple[str, bytes]]  # (tar member name, data) of one sample


def make_sample(item: Item, settings: ShardSettings) -> tuple[str, Members | str]:
    """Decode, blur and encode one image (runs in a worker process).

    Returns ``("ok", members)`` with the three tar members, or ``("skip", reason)`` for an
    unusable input. Anything else is a bug, raised with the file's name attached.
    """
    try:
        return _make_sample(item, settings)
    except Exception as e:
        raise RuntimeError(f"{item.rel}: unexpected failure: {type(e).__name__}: {e}") from e


def _make_sample(item: Item, settings: ShardSettings) -> tuple[str, Members | str]:
    try:
        data = Path(item.path).read_bytes()
    except OSError as e:
        return "skip", f"cannot read: {e.strerror or e}"
    try:
        decoded = decode_rgb(data, item.rel, min_size=settings.min_size, max_pixels=settings.max_pixels)
    except ImageError as e:
        return "skip", str(e).removeprefix(f"{item.rel}: ")
    sharp = np.asarray(decoded.image)
    h, w = sharp.shape[:2]
    # Blur at the source resolution, then downscale both members alike (the original
    # pipeline's blur-then-resize): the blur stays the one the json describes at source size.
    blur = draw_params(settings.seed, item.key, (w, h), settings.blur)
    sharp_image, blurred_image = decoded.image, Image.fromarray(apply_blur(sharp, blur))
    size = stored_size((w, h), settings.store_size)
    keep_bytes = decoded.reusable_jpeg and size == (w, h)
    if size != (w, h):
        sharp_image = sharp_image.resize(size, STORE_FILTER)
        blurred_image = blurred_image.resize(size, STORE_FILTER)
    meta = {
        "key": item.key,
        "source": item.rel,
        "split": item.split,
        "size": list(size),
        "source_size": [w, h],
        "blur": blur,
        "sharp_reencoded": not keep_bytes,
    }
    q = settings.jpeg_quality
    members = [
        (f"{item.key}.{SHARP}", data if keep_bytes else _jpeg(sharp_image, q)),
        (f"{item.key}.{BLURRED}", _jpeg(blurred_image, q)),
        (f"{item.key}.{META}", json.dumps(meta, sort_keys=True).encode()),
    ]
    return "ok", members


# ----------------------------------------------------------------------------- planning


def discover(src: Path, out: Path, settings: ShardSettings, limit: int | None) -> tuple[list[Item], list[dict], str]:
    """(items, skipped, split rule) for a source folder; raises if it is missing."""
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a directory")
    rels = list_files(src, exclude=out)
    if limit is not None:
        rels = rels[:limit]
    partition_path = find_partition(src)
    partition = read_partition(partition_path) if partition_path else None
    keys = make_keys(rels)
    items, skipped = [], []
    for rel in rels:
        if partition is not None:
            split = partition.get(rel)
            if split is None:
                skipped.append({"path": rel, "reason": f"not listed in {partition_path.name}"})
                continue
        else:
            split = hash_split(settings.seed, keys[rel], settings.val_fraction, settings.test_fraction)
        path = src / rel
        try:
            size = path.stat().st_size
        except OSError as e:  # e.g. a dangling symlink
            skipped.append({"path": rel, "reason": f"cannot read: {e.strerror or e}"})
            continue
        items.append(Item(keys[rel], rel, str(path.resolve()), split, size))
    rule = f"CelebA {partition_path.name}" if partition_path else "hash of (seed, key) against val/test fractions"
    return items, skipped, rule


def fingerprint(shard: Shard, settings: ShardSettings) -> str:
    """What a finished shard must have been built from for a rerun to keep it."""
    # exclude_none: a default build (store_size None) keeps the fingerprint it had before the
    # option existed, so upgrading does not rebuild finished shards; any store size changes it.
    payload = json.dumps(
        {
            "settings": settings.model_dump(mode="json", exclude_none=True),
            "name": shard.name,
            "items": [[it.key, it.rel, it.split, it.size] for it in shard.items],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _record_path(out: Path, shard: Shard) -> Path:
    return out / RECORDS / f"{shard.name}.json"


def finished_record(out: Path, shard: Shard, fp: str) -> dict | None:
    """The shard's record if the shard is already built from exactly this input, else None."""
    try:
        record = json.loads(_record_path(out, shard).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fp:
        return None
    if record.get("samples") == 0:
        return record
    tar = out / shard.name
    idx = index_path(tar)
    if not (tar.is_file() and idx.is_file()) or sha256_file(tar) != record["sha256"]:
        return None
    return record


def write_shard(out: Path, shard: Shard, fp: str, results: list) -> dict:
    """Publish one shard: tar and idx via .partial + rename, then its record."""
    samples = [payload for (status, payload) in results if status == "ok"]
    skipped = [
        {"path": it.rel, "reason": payload} for it, (status, payload) in zip(shard.items, results) if status == "skip"
    ]
    tar_path, idx_path = out / shard.name, index_path(out / shard.name)
    record = {
        "name": shard.name,
        "split": shard.split,
        "fingerprint": fp,
        "samples": len(samples),
        "sha256": None,
        "skipped": skipped,
    }
    if samples:
        tar_bytes, index = build_tar(samples)
        write_atomic(idx_path, index.encode())
        write_atomic(tar_path, tar_bytes)  # last: a final-named tar means a complete shard
        record["sha256"] = hashlib.sha256(tar_bytes).hexdigest()
    else:  # every input of this shard was unusable: no tar (DALI cannot read an empty one)
        tar_path.unlink(missing_ok=True)
        idx_path.unlink(missing_ok=True)
    write_atomic(_record_path(out, shard), json.dumps(record, sort_keys=True).encode())
    return record


def make_manifest(
    plan: list[Shard], records: dict[str, dict], settings: ShardSettings, source: str, rule: str, skipped: list[dict]
) -> dict:
    splits = {}
    for split in SPLITS:
        shards = [
            {"name": r["name"], "samples": r["samples"], "sha256": r["sha256"]}
            for s in plan
            if s.split == split and (r := records[s.name])["samples"]
        ]
        splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards)}
    all_skipped = skipped + [sk for s in plan for sk in records[s.name]["skipped"]]
    return {
        "format": "deblur-shards/1",
        "source": source,
        "seed": settings.seed,
        "split_rule": rule,
        "val_fraction": settings.val_fraction,
        "test_fraction": settings.test_fraction,
        "shard_size": settings.shard_size,
        "min_size": settings.min_size,
        "max_pixels": settings.max_pixels,
        "jpeg_quality": settings.jpeg_quality,
        "store_size": settings.store_size,
        "blur": settings.blur.model_dump(mode="json")
        | {
            "scaling": "ranges are at reference_size px; multiplied by min(w, h) / reference_size "
            "of the source; params at source size (deblur.shard.blur.stored_blur rescales)"
        },
        "members": list(SAMPLE_MEMBERS),
        "samples": sum(v["samples"] for v in splits.values()),
        "splits": splits,
        "skipped": sorted(all_skipped, key=lambda s: s["path"]),
    }


# ----------------------------------------------------------------------------- building


def _parse_part(part: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(part, str):
        try:
            i, n = (int(v) for v in part.split("/"))
        except ValueError:
            raise ValueError(f"--part must look like I/N, got {part!r}") from None
    else:
        i, n = part
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part I/N needs 0 <= I < N, got {i}/{n}")
    return i, n


def build_shards(
    src: Path | None,
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    shard_size: int | None = None,
    workers: int | None = None,
    limit: int | None = None,
    demo: bool = False,
    part: str | tuple[int, int] | None = None,
    progress: bool = True,
    blur: BlurConfig | None = None,
    min_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    store_size: int | None = None,
) -> dict:
    """Build (or finish building) a shard dataset in ``out``; return its manifest.

    ``shard_size`` defaults to 1000 samples per tar, or 64 for the demo. ``part=(I, N)`` or
    ``"I/N"`` builds only shards I, I+N, ...; the manifest is written (and
    returned) by whichever run finds every shard finished, otherwise a dict with
    ``"complete": False`` describing the part is returned. ``store_size`` stores both members
    with their shorter side at that many px (never upscaled); None keeps the source size.
    """
    settings = ShardSettings(
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        shard_size=(shard_size if shard_size is not None else DEMO_SHARD_SIZE if demo else SHARD_SIZE),
        min_size=min_size,
        max_pixels=max_pixels,
        blur=blur or BlurConfig(),
        store_size=store_size,
    )
    out = Path(out)
    if demo:
        if src is not None:
            raise ValueError("give either --src or --demo, not both")
        src, source = demo_data.materialize(out / DEMO_SOURCE), "demo: scikit-image photographs"
    elif src is None:
        raise ValueError("--src is required (or --demo for the built-in demo photographs)")
    else:
        source = str(Path(src).resolve())
    src = Path(src)
    part_i, part_n = _parse_part(part) if part is not None else (0, 1)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    workers = workers or os.cpu_count() or 1

    items, skipped, rule = discover(src, out, settings, limit)
    if not items:
        raise ValueError(f"no images found in {src}")
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORDS).mkdir(exist_ok=True)
    plan = plan_shards(items, settings.seed, settings.shard_size)
    fps = {s.name: fingerprint(s, settings) for s in plan}

    mine = [s for n, s in enumerate(plan) if n % part_n == part_i]
    for s in mine:  # leftovers of a killed run; other parts' .partial files may be in use
        for leftover in (out / f"{s.name}.partial", out / f"{index_path(out / s.name).name}.partial"):
            leftover.unlink(missing_ok=True)
    records = {s.name: r for s in mine if (r := finished_record(out, s, fps[s.name]))}
    todo = [s for s in mine if s.name not in records]
    n_items = sum(len(s.items) for s in todo)
    if records:
        print(f"resuming: {len(records)} of {len(mine)} shards already built", file=sys.stderr)
    if todo:  # the folder is about to change: an old manifest must not vouch for it meanwhile
        (out / MANIFEST).unlink(missing_ok=True)

    t0 = time.perf_counter()
    keep_freed_heap()  # for the work done in this process (workers=1); workers call it too
    work = functools.partial(make_sample, settings=settings)
    flat = [it for s in todo for it in s.items]
    bar = tqdm(total=n_items, unit="img", desc=f"building {out.name}", disable=not progress)
    with _pool(workers, n_items) as pool:
        if pool is None:
            results = map(work, flat)
        else:  # chunks small enough to keep every worker busy to the end
            chunk = max(1, min(16, n_items // (8 * workers)))
            results = pool.imap(work, flat, chunksize=chunk)
        for shard in todo:  # imap keeps order, so results arrive shard by shard
            got = []
            for _ in shard.items:
                got.append(next(results))
                bar.update()
            records[shard.name] = write_shard(out, shard, fps[shard.name], got)
    bar.close()
    elapsed = time.perf_counter() - t0

    built = sum(records[s.name]["samples"] for s in todo)
    bad = Counter(sk["reason"].split(":")[0] for s in todo for sk in records[s.name]["skipped"])
    print(
        f"built {len(todo)} shards, {built} samples from {n_items} images in {elapsed:.1f} s: "
        f"{n_items / max(elapsed, 1e-9):.1f} images/s with {workers} workers; "
        f"skipped {sum(bad.values())}" + (f" ({dict(bad)})" if bad else ""),
        file=sys.stderr,
    )

    for s in plan:  # other parts' shards count only if they are really there
        if s.name not in records and (r := finished_record(out, s, fps[s.name])):
            records[s.name] = r
    missing = [s.name for s in plan if s.name not in records]
    if missing:
        print(
            f"part {part_i}/{part_n} done; {len(missing)} shards of other parts missing, manifest not written yet",
            file=sys.stderr,
        )
        return {"complete": False, "part": [part_i, part_n], "missing": missing}
    manifest = make_manifest(plan, records, settings, source, rule, skipped)
    if manifest["samples"] == 0:
        raise ValueError(f"no usable images in {src}: all {len(items)} candidates were skipped")
    _remove_stale(out, plan)
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    counts = ", ".join(f"{k} {v['samples']}" for k, v in manifest["splits"].items())
    print(
        f"dataset {out}: {manifest['samples']} samples ({counts}), {len(manifest['skipped'])} files skipped",
        file=sys.stderr,
    )
    return manifest


def _pool(workers: int, n_items: int):
    """A process pool when it pays off, else a null context (work runs in this process)."""
    if workers <= 1 or n_items < 2:
        return contextlib.nullcontext(None)
    # Not fork: the parent may hold threads (torch, tqdm) whose locks fork would copy. The
    # forkserver imports this module once and forks workers from it, so N workers do not pay
    # N times for numpy/scipy/PIL imports the way spawn would.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["deblur.shard.build"])
    return ctx.Pool(workers, initializer=keep_freed_heap)


def _remove_stale(out: Path, plan: list[Shard]) -> None:
    """Delete shards from an earlier, larger build that this plan does not contain."""
    keep = {s.name for s in plan}
    for path in out.glob("*-??????.tar"):
        if path.name.split("-")[0] in SPLITS and path.name not in keep:
            print(f"removing stale shard {path.name} (not part of this build)", file=sys.stderr)
            path.unlink()
            index_path(path).unlink(missing_ok=True)
            (out / RECORDS / f"{path.name}.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m deblur.shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--src", type=Path, help="folder of sharp images (searched recursively)")
    p.add_argument("--out", type=Path, help="dataset folder to write")
    p.add_argument("--demo", action="store_true", help="use the built-in demo photographs")
    p.add_argument("--verify", type=Path, metavar="DIR", help="check a built dataset and exit")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help=f"samples per tar (default {SHARD_SIZE}; {DEMO_SHARD_SIZE} with --demo)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N files (sorted)")
    p.add_argument("--part", default=None, metavar="I/N", help="build only portion I of N (0 <= I < N)")
    p.add_argument("--motion-fraction", type=float, default=0.5)
    p.add_argument(
        "--sigma-range",
        type=float,
        nargs=2,
        default=(1.6, 2.6),
        metavar=("LO", "HI"),
        help="Gaussian sigma range in px at 64-px scale",
    )
    p.add_argument(
        "--motion-length-range",
        type=float,
        nargs=2,
        default=(7.0, 12.0),
        metavar=("LO", "HI"),
        help="motion length range in px at 64-px scale",
    )
    p.add_argument("--min-size", type=int, default=64, help="skip images with a shorter side")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images as decompression bombs"
    )
    p.add_argument(
        "--store-size",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="store both members downscaled so the shorter side is PX (never "
        "upscaled; default: source size); blur is still applied at source size",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        from deblur.shard.verify import verify

        problems = verify(args.verify, progress=not args.no_progress)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.verify}: " + (f"{len(problems)} problems" if problems else "OK"))
        return 1 if problems else 0
    if args.out is None:
        print("error: --out is required", file=sys.stderr)
        return 2
    try:
        blur = BlurConfig(
            motion_fraction=args.motion_fraction,
            sigma_range=args.sigma_range,
            motion_length_range=args.motion_length_range,
        )
        build_shards(
            args.src,
            args.out,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            shard_size=args.shard_size,
            workers=args.workers,
            limit=args.limit,
            demo=args.demo,
            part=args.part,
            progress=not args.no_progress,
            blur=blur,
            min_size=args.min_size,
            max_pixels=args.max_pixels,
            store_size=args.store_size,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
