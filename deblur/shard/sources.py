"""Which files go into which shard: discovery, keys, the train/val/test split, the shuffle.

Everything here is a pure function of the folder listing and the settings, so every run (and
every ``--part``) computes the same plan without decoding a single image. Only regular files are
inputs: a named pipe, socket or device (which a read would block on or never finish) is skipped
with a reason, as is a symlink to a folder (not followed) and a folder that cannot be listed.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deblur.errors import InputError
from deblur.shard.format import SPLITS, shard_name

PARTITION_FILE = "list_eval_partition.txt"  # CelebA's official split: 0=train, 1=val, 2=test
_PARTITION_SPLITS = {"0": "train", "1": "val", "2": "test"}
_MAX_KEY = 80  # + ".sharp.jpg" stays within a USTAR name (100 chars)
NOT_REGULAR = "not a regular file"
_KINDS = (
    (stat.S_ISDIR, "a folder behind a symlink (not followed)"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class Item:
    key: str
    rel: str  # path relative to --src, "/"-separated: the json "source"
    path: str  # absolute path to read
    split: str
    size: int  # bytes on disk: part of the shard fingerprint, so a changed file is rebuilt
    # Paired sources only (deblur/shard/pairs.py): the blurred partner, as rel / path / size.
    blurred_rel: str | None = None
    blurred_path: str | None = None
    blurred_size: int = 0


@dataclass(frozen=True)
class Shard:
    name: str  # e.g. "train-000003.tar"
    split: str
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Inputs:
    """What a source offers: the candidates, what was refused before decoding, the split rule."""

    items: list[Item]
    skipped: list[dict]  # {"path": ..., "reason": ...}
    split_rule: str
    scenes: dict[str, int] | None = None  # paired sources: scenes per split (splits never cut one)


def not_regular(mode: int) -> str | None:
    """Why a file of this ``st_mode`` cannot be an input ("not a regular file: a socket"), or None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
    return f"{NOT_REGULAR}: {kind}"


def list_files(src: Path, exclude: Path | None = None) -> tuple[list[str], list[dict]]:
    """Relative paths of every non-hidden entry under ``src``, sorted (partition file excluded),
    and the folders that could not be listed ({"path": "sub/", "reason": ...}).

    ``exclude`` (the output folder, when it lies inside ``src``) is not searched. Symlinks to
    folders are listed as entries, not followed (:func:`discover` skips them with a reason).

    Content decides what is an image (a PNG called .jpg is fine, a text file called .jpg is
    skipped with a reason), so no file is dropped here because of its extension.
    """
    found, unreadable = [], []
    skip = os.path.realpath(exclude) if exclude is not None else None

    def rel(path: str) -> str:
        return os.path.relpath(path, src).replace(os.sep, "/")

    def cannot_list(error: OSError) -> None:
        reason = error.strerror or str(error)
        unreadable.append({"path": rel(error.filename) + "/", "reason": f"cannot read folder: {reason}"})

    for root, dirs, files in os.walk(src, onerror=cannot_list):
        kept = []
        for d in dirs:
            path = os.path.join(root, d)
            if d.startswith(".") or os.path.realpath(path) == skip:
                continue
            if os.path.islink(path):
                found.append(rel(path))  # listed, not followed: discover says why it is skipped
            else:
                kept.append(d)
        dirs[:] = kept
        for name in files:
            if name.startswith(".") or name == PARTITION_FILE:
                continue
            found.append(rel(os.path.join(root, name)))
    return sorted(found), sorted(unreadable, key=lambda s: s["path"])


def check_folder(root: Path, option: str) -> None:
    """An InputError naming ``option`` unless ``root`` is a folder that can be listed."""
    if not root.is_dir():
        raise InputError(f"{option} {root}: {'not a folder' if root.exists() else 'not found'}")
    try:
        os.listdir(root)
    except OSError as error:
        raise InputError(f"{option} {root}: {error.strerror or error}") from None


def discover(
    src: Path, exclude: Path | None, seed: int, val_fraction: float, test_fraction: float, limit: int | None
) -> Inputs:
    """The candidates of a source folder: keyed, split (CelebA's partition file when there is
    one, else a hash of (seed, key)), each a regular file; the rest skipped with a reason."""
    check_folder(src, "--src")
    rels, skipped = list_files(src, exclude=exclude)
    if limit is not None:
        rels = rels[:limit]
    partition_path = find_partition(src)
    partition = read_partition(partition_path) if partition_path else None
    keys = make_keys(rels)
    items = []
    for rel in rels:
        if partition is not None:
            split = partition.get(rel)
            if split is None:
                skipped.append({"path": rel, "reason": f"not listed in {partition_path.name}"})
                continue
        else:
            split = hash_split(seed, keys[rel], val_fraction, test_fraction)
        path = src / rel
        try:
            info = path.stat()
        except OSError as e:  # e.g. a dangling symlink
            skipped.append({"path": rel, "reason": f"cannot read: {e.strerror or e}"})
            continue
        if reason := not_regular(info.st_mode):
            skipped.append({"path": rel, "reason": reason})
            continue
        items.append(Item(keys[rel], rel, str(path.resolve()), split, info.st_size))
    rule = f"CelebA {partition_path.name}" if partition_path else "hash of (seed, key) against val/test fractions"
    return Inputs(items, sorted(skipped, key=lambda s: s["path"]), rule)


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
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the partition file: {error}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in _PARTITION_SPLITS:
            raise InputError(f"{path}:{n}: expected '<file> <0|1|2>', got {line[:80]!r}")
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
