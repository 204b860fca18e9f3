"""``python -m deblur.shard --verify DIR``: check a built dataset against its manifest.

Checks the manifest's shard list (names, counts), re-hashes every shard and its index against
it, rebuilds every index from its tar, decodes every image member, checks every json member,
and flags tars and indexes the manifest does not list and half-written ``.partial`` files.
Returns all problems found, each naming its file (an empty list means the dataset is sound).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from deblur.errors import InputError
from deblur.files import sha256_file
from deblur.shard.blur import is_real, kernel_from_params, stored_blur
from deblur.shard.check import check_jpeg
from deblur.shard.folder import PARTIAL
from deblur.shard.format import (
    BLURRED,
    FORMAT,
    MANIFEST,
    META,
    SAMPLE_MEMBERS,
    SHARP,
    SPLITS,
    ShardError,
    index_path,
    split_name,
    stored_size,
)
from deblur.shard.tario import index_of_tar


def _check_sample(shard: str, key: str, members: dict[str, bytes], split: str, store_size: int | None) -> list[str]:
    where = f"{shard}: sample {key}"
    if sorted(members) != sorted(SAMPLE_MEMBERS):
        return [f"{where}: members {sorted(members)}, expected {list(SAMPLE_MEMBERS)}"]
    problems = []
    try:
        meta = json.loads(members[META])
        if meta["key"] != key or meta["split"] != split:
            problems.append(f"{where}: json says key {meta['key']!r}, split {meta['split']!r}")
        if is_real(meta["blur"]):  # a photographed pair: no kernel, both source files named
            if not isinstance(meta.get("blurred_source"), str):
                problems.append(f"{where}: json of a real pair names no blurred_source")
        else:
            kernel_from_params(meta["blur"])
            kernel_from_params(stored_blur(meta))
        size = tuple(meta["size"])
        source_size = tuple(meta.get("source_size", size))
        if size != stored_size(source_size, store_size):
            problems.append(
                f"{where}: json size {size} is not source size {source_size} stored at store_size {store_size}"
            )
    except (ValueError, KeyError, TypeError) as e:
        return problems + [f"{where}: bad json member: {type(e).__name__}: {e}"]
    for ext in (SHARP, BLURRED):
        try:
            with Image.open(io.BytesIO(members[ext])) as im:
                im.load()
                if im.format != "JPEG" or im.size != size:
                    problems.append(f"{where}: {ext} is {im.format} {im.size}, json size {size}")
            # The readers' own test of a member: libjpeg without a warning (PIL decodes
            # "Corrupt JPEG data" into garbage without a word).
            check_jpeg(members[ext], f"{ext}")
        except ShardError as e:
            problems.append(f"{where}: {e}")
        except Exception as e:  # any decode failure is a finding, whatever PIL raises
            problems.append(f"{where}: {ext} does not decode: {type(e).__name__}: {e}")
    return problems


def _check_shard(path: Path, entry: dict, split: str, keys: set[str], store_size: int | None) -> list[str]:
    name = path.name
    if not path.is_file():
        return [f"{name}: {'not a regular file' if path.exists() else 'missing'}"]
    problems = []
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    idx = index_path(path)
    if not idx.is_file():
        problems.append(f"{idx.name}: {'not a regular file' if idx.exists() else 'missing'}")
    elif "index_sha256" in entry and sha256_file(idx) != entry["index_sha256"]:
        problems.append(f"{idx.name}: index_sha256 differs from the manifest")
    try:
        expected_index = index_of_tar(path)
        if idx.is_file() and idx.read_text(errors="replace") != expected_index:
            problems.append(f"{idx.name}: does not match the tar's contents")
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, ext = split_name(member.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        return problems + [f"{name}: unreadable tar: {type(e).__name__}: {e}"]
    if len(samples) != entry["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['samples']}")
    for key, members in samples.items():
        if key in keys:
            problems.append(f"{name}: key {key} also appears in another shard")
        keys.add(key)
        problems += _check_sample(name, key, members, split, store_size)
    return problems


def _entries(manifest) -> tuple[list[tuple[str, dict]], list[str]]:
    """(split, shard entry) of every well-formed shard entry of the manifest, and the problems
    with the rest: a reader must be able to trust each name, count and hash it lists."""
    entries, problems = [], []
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return [], [f"{MANIFEST}: not a {FORMAT} manifest"]
    for split in SPLITS:
        listed = manifest.get("splits", {}).get(split) if isinstance(manifest.get("splits"), dict) else None
        if not isinstance(listed, dict) or not isinstance(listed.get("shards"), list):
            problems.append(f"{MANIFEST}: no shard list for split {split!r}")
            continue
        for n, entry in enumerate(listed["shards"]):
            where = f"{MANIFEST}: {split} shard {n}"
            if not isinstance(entry, dict) or not all(k in entry for k in ("name", "samples", "sha256")):
                problems.append(f"{where}: expected name, samples and sha256, got {entry!r:.80}")
            elif not isinstance(entry["name"], str) or not re.fullmatch(rf"{split}-[0-9]{{6}}\.tar", entry["name"]):
                # e.g. "../x.tar": readers open what the manifest names
                problems.append(f"{where}: {entry['name']!r:.80} is not a shard file name of split {split}")
            elif not isinstance(entry["samples"], int) or entry["samples"] < 1:
                problems.append(f"{where}: samples must be a positive whole number, got {entry['samples']!r}")
            else:
                entries.append((split, entry))
        total = sum(e["samples"] for s, e in entries if s == split)
        if listed.get("samples") != total:
            problems.append(f"manifest: {split} samples {listed.get('samples')} != sum over its shards {total}")
    return entries, problems


def verify(root: Path, progress: bool = True) -> list[str]:
    """Every problem found in the dataset at ``root`` (an empty list: it is sound)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--verify {root}: {'not a folder' if root.exists() else 'not found'}")
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    except (OSError, ValueError) as e:
        return [f"{manifest_path}: unreadable manifest: {type(e).__name__}: {e}"]
    if manifest is None:
        return [f"{manifest_path}: missing (not a built dataset, or its build has not finished)"]
    entries, problems = _entries(manifest)
    keys: set[str] = set()
    for split, entry in tqdm(entries, unit="shard", desc=f"verifying {root.name}", disable=not progress):
        problems += _check_shard(root / entry["name"], entry, split, keys, manifest.get("store_size"))
    listed = {e["name"] for _, e in entries}
    listed |= {index_path(Path(name)).name for name in listed}
    for path in sorted([*root.glob("*.tar"), *root.glob("*.idx")]):
        if path.name not in listed:
            problems.append(f"{path.name}: not listed in the manifest")
    for path in sorted(root.glob(f"*{PARTIAL}")):
        problems.append(f"{path.name}: an unfinished write (an interrupted build); rerun the build to finish it")
    return problems
