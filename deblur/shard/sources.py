"""Which files go into which shard: discovery, keys, the train/val/test split, the shuffle.

Everything here is a pure function of the folder listing and the settings, so every run (and
every ``--part``) computes the same plan without decoding a single image.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deblur.shard.format import SPLITS, shard_name

PARTITION_FILE = "list_eval_partition.txt"  # CelebA's official split: 0=train, 1=val, 2=test
_PARTITION_SPLITS = {"0": "train", "1": "val", "2": "test"}
_MAX_KEY = 80  # + ".sharp.jpg" stays within a USTAR name (100 chars)


@dataclass(frozen=True)
class Item:
    key: str
    rel: str  # path relative to --src, "/"-separated: the json "source"
    path: str  # absolute path to read
    split: str
    size: int  # bytes on disk: part of the shard fingerprint, so a changed file is rebuilt


@dataclass(frozen=True)
class Shard:
    name: str  # e.g. "train-000003.tar"
    split: str
    items: tuple[Item, ...]


def list_files(src: Path, exclude: Path | None = None) -> list[str]:
    """Relative paths of every non-hidden file under ``src``, sorted; partition file excluded.

    ``exclude`` (the output folder, when it lies inside ``src``) is not searched.

    Content decides what is an image (a PNG called .jpg is fine, a text file called .jpg is
    skipped with a reason), so no file is dropped here because of its extension.
    """
    found = []
    skip = os.path.realpath(exclude) if exclude is not None else None
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) != skip]
        for name in files:
            if name.startswith(".") or name == PARTITION_FILE:
                continue
            rel = os.path.relpath(os.path.join(root, name), src).replace(os.sep, "/")
            found.append(rel)
    return sorted(found)


def make_keys(rels: list[str]) -> dict[str, str]:
    """A unique, dot-free, ASCII key per relative path ("a/b.c.jpg" -> "a_b_c").

    Collisions (after sanitizing) and over-long keys get a short hash of the full path appended,
    so keys never depend on which other files exist except in the colliding case.
    """

    def stem(rel: str) -> str:
        base, ext = os.path.splitext(rel)
        return re.sub(r"[^A-Za-z0-9_-]", "_", base if base else rel) or "_"

    def hashed(rel: str, s: str) -> str:
        return s[: _MAX_KEY - 9] + "-" + hashlib.sha1(rel.encode()).hexdigest()[:8]

    stems = {rel: stem(rel) for rel in rels}
    counts: dict[str, int] = {}
    for s in stems.values():
        counts[s] = counts.get(s, 0) + 1
    return {rel: (hashed(rel, s) if counts[s] > 1 or len(s) > _MAX_KEY else s) for rel, s in stems.items()}


def find_partition(src: Path) -> Path | None:
    """CelebA's list_eval_partition.txt if it sits in ``src``, its parent or the parent's Eval/."""
    for candidate in (src / PARTITION_FILE, src.parent / PARTITION_FILE, src.parent / "Eval" / PARTITION_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_partition(path: Path) -> dict[str, str]:
    """{file name relative to the images: split} from a CelebA partition file."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in _PARTITION_SPLITS:
            raise ValueError(f"{path}:{n}: expected '<file> <0|1|2>', got {line!r}")
        out[parts[0]] = _PARTITION_SPLITS[parts[1]]
    return out


def hash_split(seed: int, key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from (seed, key): stable when files are added or removed."""
    digest = hashlib.sha256(f"split\x00{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def plan_shards(items: list[Item], seed: int, shard_size: int) -> list[Shard]:
    """Shuffle each split globally (seeded) and cut it into shards of ``shard_size`` items."""
    shards = []
    for split_index, split in enumerate(SPLITS):
        members = sorted((it for it in items if it.split == split), key=lambda it: it.key)
        order = np.random.default_rng([seed, split_index]).permutation(len(members))
        members = [members[i] for i in order]
        for n, start in enumerate(range(0, len(members), shard_size)):
            shards.append(Shard(shard_name(split, n), split, tuple(members[start : start + shard_size])))
    return shards
