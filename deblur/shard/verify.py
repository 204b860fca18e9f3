"""``python -m deblur.shard --verify DIR``: check a built dataset against its manifest.

Re-hashes every shard, rebuilds every index from its tar, decodes every image member and checks
every json member. Returns all problems found (an empty list means the dataset is sound).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from deblur.files import sha256_file
from deblur.shard.blur import kernel_from_params, stored_blur
from deblur.shard.format import (
    BLURRED,
    MANIFEST,
    META,
    SAMPLE_MEMBERS,
    SHARP,
    SPLITS,
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
        except Exception as e:  # any decode failure is a finding, whatever PIL raises
            problems.append(f"{where}: {ext} does not decode: {type(e).__name__}: {e}")
    return problems


def _check_shard(path: Path, entry: dict, split: str, keys: set[str], store_size: int | None) -> list[str]:
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    idx = index_path(path)
    try:
        expected_index = index_of_tar(path)
        if not idx.is_file():
            problems.append(f"{idx.name}: missing")
        elif idx.read_text() != expected_index:
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


def verify(root: Path, progress: bool = True) -> list[str]:
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        entries = [(split, s) for split in SPLITS for s in manifest["splits"][split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{root / MANIFEST}: unreadable manifest: {type(e).__name__}: {e}"]
    problems, keys = [], set()
    for split, entry in tqdm(entries, unit="shard", desc=f"verifying {root.name}", disable=not progress):
        problems += _check_shard(root / entry["name"], entry, split, keys, manifest.get("store_size"))
    listed = {e["name"] for _, e in entries}
    for path in sorted(root.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: not listed in the manifest")
    for split in SPLITS:
        total = sum(s["samples"] for s in manifest["splits"][split]["shards"])
        if total != manifest["splits"][split]["samples"]:
            problems.append(
                f"manifest: {split} samples {manifest['splits'][split]['samples']} != sum over its shards {total}"
            )
    return problems
