"""Checking a dataset before the work: what a member must be, and the trainer's start check.

- :func:`check_jpeg`: a member is decodable when libjpeg decodes it **without an error or a
  warning**. Bit flips inside a JPEG's entropy-coded data mostly decode to garbage with only a
  "Corrupt JPEG data" warning: PIL and DALI's decoders (CPU and GPU) hand out those pixels, and
  DALI has no switch to make the warning an error, so every reader checks members with this
  function (simplejpeg in strict mode, as the torch backend decodes) before it uses them.
  The check decodes at 1/8 scale: libjpeg still decodes every bit of the entropy-coded data,
  where all those warnings come from, but skips most of the inverse DCT (0.6x the time of a
  full decode of a 178x218 member).
- :func:`check_dataset`: before training, ``manifest.json`` is read and checked
  (:func:`deblur.shard.format.read_manifest`), every listed shard's index is checked against its
  tar and the manifest's sample count, every tar (and index, where the manifest records
  ``index_sha256``) is hashed against the manifest, and the members of the ``decode`` splits
  are checked with :func:`check_jpeg`. Several processes share the hashing and decoding (each
  takes every ``world_size``-th shard) and each raises for what it finds.

Every problem is a :class:`deblur.shard.format.ShardError` naming the file (and member or
manifest key).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import simplejpeg
from tqdm import tqdm

from deblur.shard.format import MANIFEST, PAIR_MEMBERS, SPLITS, ShardError, ShardFile, index_rows, split_shards

CHUNK = 8 << 20  # bytes hashed per read


def check_jpeg(data: bytes, where: str) -> None:
    """Raise ShardError "cannot decode <where>: ..." unless libjpeg decodes ``data`` cleanly."""
    try:
        # min_width/min_height 1: the largest DCT scaling (1/8), see the module docstring.
        simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=1, min_height=1, strict=True)
    except (ValueError, RuntimeError) as error:
        raise ShardError(f"cannot decode {where}: {error}") from None


def check_members(members: Iterable[tuple[str, bytes]], threads: int) -> int:
    """:func:`check_jpeg` on every ``(where, data)``, on ``threads`` threads (simplejpeg
    releases the GIL); the first failure in the given order is raised. Returns the count."""
    members = list(members)
    if threads <= 1 or len(members) < 2:
        for where, data in members:
            check_jpeg(data, where)
        return len(members)
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda member: check_jpeg(member[1], member[0]), members):
            pass
    return len(members)


def shard_members(shard: ShardFile, data: bytes) -> list[tuple[str, bytes]]:
    """``(where, bytes)`` of the shard's image members, cut from its tar's bytes at the index's
    offsets (checked against the tar's size by :func:`deblur.shard.format.read_index`)."""
    return [
        (f"shard {shard.tar} member {name}", data[offset : offset + size])
        for row in index_rows(shard.idx)
        for offset, size, name in (row[ext] for ext in PAIR_MEMBERS)
    ]


def default_threads() -> int:
    """This process's share of the usable cores (launchers set LOCAL_WORLD_SIZE per machine)."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _hash_file(path: Path, bar: tqdm | None = None, keep: bool = False) -> tuple[str, bytes]:
    """(sha256 hex digest, the file's bytes if ``keep`` else b""), read once."""
    digest, kept = hashlib.sha256(), bytearray()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            if keep:
                kept += chunk
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest(), bytes(kept)


def _mismatch(file: Path, root: Path, key: str, actual: str, expected: str) -> ShardError:
    return ShardError(
        f"{file}: sha256 {actual[:16]}... differs from {root / MANIFEST} {key} ({expected[:16]}...): "
        "the file changed after the build; rebuild the shards (python -m deblur.shard) or restore the file"
    )


def check_dataset(
    shards: Path | str,
    *,
    splits: tuple[str, ...] = SPLITS,
    decode: tuple[str, ...] = ("val", "test"),
    rank: int = 0,
    world_size: int = 1,
    threads: int | None = None,
    progress: bool = True,
) -> str:
    """Check ``splits`` of the dataset against its manifest (see the module docstring) and
    return a one-line summary (also printed when ``progress``). Process ``rank`` of
    ``world_size`` hashes and decodes every ``world_size``-th shard only."""
    root = Path(shards)
    start = time.perf_counter()
    listed = [(split, i, shard) for split in splits for i, shard in enumerate(split_shards(root, split))]
    mine = listed[rank::world_size]
    threads = threads or default_threads()
    total = sum(shard.tar.stat().st_size for _, _, shard in mine)
    members = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checking shards", disable=not progress
    ) as bar:
        for split, i, shard in mine:
            key = f"splits.{split}.shards[{i}]"
            actual, data = _hash_file(shard.tar, bar, keep=split in decode)
            if actual != shard.sha256:
                raise _mismatch(shard.tar, root, f"{key}.sha256", actual, shard.sha256)
            if shard.index_sha256 is not None:
                index_digest, _ = _hash_file(shard.idx)
                if index_digest != shard.index_sha256:
                    raise _mismatch(shard.idx, root, f"{key}.index_sha256", index_digest, shard.index_sha256)
            if split in decode:
                members += check_members(shard_members(shard, data), threads)
    seconds = time.perf_counter() - start
    share = f" (process {rank} of {world_size}: {len(mine)} of {len(listed)} shards)" if world_size > 1 else ""
    decoded = f", {members} {'/'.join(s for s in splits if s in decode)} members decoded" if members else ""
    summary = (
        f"checked {root}: {len(mine)} shards, {total / 2**20:.0f} MiB hashed against {MANIFEST}{decoded}{share} "
        f"in {seconds:.1f} s ({total / 2**20 / max(seconds, 1e-9):.0f} MiB/s)"
    )
    if progress:
        print(summary, flush=True)
    return summary
