"""The on-disk shard format: the one contract between the builder and every reader.

A dataset folder holds, per split, ``{split}-NNNNNN.tar`` WebDataset tars, a DALI ``wds2idx``
index beside each (same name, ``.idx``) and ``manifest.json``, which lists every split's shards
with their sample counts, the tar's ``sha256`` and the index's ``index_sha256`` (manifests
written before that key existed lack it; readers treat it as optional). Readers take a split's
shards from the manifest, never from the folder listing: a split may have no shards, and a
shard whose every input was unusable is not written, leaving a gap in the numbering.

Each sample is three members named ``<key>.<ext>``: ``sharp.jpg``, ``blur.jpg`` and ``json``.
The key is everything before the first dot of the member's base name (how ``wds2idx``, DALI
and webdataset split names), so keys never contain a dot.

The index is what DALI's ``wds2idx`` writes: ``v1.2 <samples>``, then one line per sample with
``<ext> <data offset> <size> <member name>`` for each of its members.
docs/shards.md describes the contract in full.
"""

from __future__ import annotations

import json
from pathlib import Path

from deblur.errors import InputError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "deblur-shards/1"  # manifest["format"]
INDEX_VERSION = "v1.2"  # the wds2idx format version DALI's webdataset reader reads

SHARP = "sharp.jpg"
BLURRED = "blur.jpg"
META = "json"
SAMPLE_MEMBERS = (SHARP, BLURRED, META)  # every sample's members, in the order they are written
PAIR_MEMBERS = (BLURRED, SHARP)  # the image members the loaders read, in output order


class ShardError(InputError, RuntimeError):
    """A shard (tar or its index) is missing, truncated, corrupt or holds an undecodable member."""


def shard_name(split: str, number: int) -> str:
    """``("train", 3)`` -> ``train-000003.tar``."""
    return f"{split}-{number:06d}.tar"


def index_path(tar: Path) -> Path:
    """``train-000000.tar`` -> ``train-000000.idx``: the index lies beside its tar."""
    return tar.with_suffix(".idx")


def split_name(name: str) -> tuple[str, str]:
    """(key, ext) the way wds2idx, DALI and webdataset split a member name: at the first dot."""
    base = name.rsplit("/", 1)[-1]
    dot = name.find(".", len(name) - len(base))
    return name[:dot], name[dot + 1 :]


def stored_size(size: tuple[int, int], store_size: int | None) -> tuple[int, int]:
    """(w, h) of the stored members: the shorter side ``store_size``, aspect kept, never larger
    than the source."""
    w, h = size
    if store_size is None or min(w, h) <= store_size:
        return w, h
    scale = store_size / min(w, h)
    # max(): the short side is exactly store_size even where float rounding gives 63.99...
    return max(store_size, round(w * scale)), max(store_size, round(h * scale))


# ----------------------------------------------------------------------------- index


def index_text(samples: list[list[tuple[str, int, int]]]) -> str:
    """The index for ``samples``, each a list of (member name, data offset, size) in tar order."""
    lines = [
        " ".join(f"{split_name(name)[1]} {offset} {size} {name}" for name, offset, size in members)
        for members in samples
    ]
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)


def parse_index_rows(rows: list[str]) -> list[dict[str, tuple[int, int, str]]]:
    """One dict per sample line: member ext -> (data offset, size, member name)."""
    samples = []
    for row in rows:
        fields = row.split()
        samples.append(
            {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields) - 3, 4)}
        )
    return samples


def index_rows(idx: Path) -> list[dict[str, tuple[int, int, str]]]:
    """One dict per sample of a ``.idx`` file: member ext -> (data offset, size, member name)."""
    return parse_index_rows(idx.read_text().splitlines()[1:])


def read_index(tar: Path) -> int:
    """Validate a shard's DALI index against its tar cheaply; return its sample count.

    DALI reads members at the index's offsets without looking at the tar headers, so a stale
    index or a truncated tar would surface deep inside the pipeline; here it names the file.
    """
    idx = index_path(tar)
    if not idx.is_file():
        raise ShardError(f"missing index {idx} for shard {tar} (build it with wds2idx)")
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{idx}: not a wds2idx {INDEX_VERSION} index (first line {lines[:1]}) for shard {tar}")
    count, rows = int(head[1]), lines[1:]
    if len(rows) != count:
        raise ShardError(f"{idx}: header says {count} samples but lists {len(rows)}, shard {tar}")
    tar_size = tar.stat().st_size
    try:
        samples = parse_index_rows(rows)
    except (ValueError, IndexError) as error:
        raise ShardError(f"{idx}: malformed index line ({error}) for shard {tar}") from error
    for row_no, members in enumerate(samples, start=2):
        for ext in PAIR_MEMBERS:
            if ext not in members:
                raise ShardError(f"{idx} line {row_no}: sample has no .{ext} member, shard {tar}")
            offset, size, _ = members[ext]
            if offset + size > tar_size:
                raise ShardError(
                    f"shard {tar} is truncated or does not match its index: .{ext} member at "
                    f"{offset}+{size} bytes but the tar has {tar_size} bytes ({idx} line {row_no})"
                )
    return count


# ----------------------------------------------------------------------------- manifest


def manifest_split(shards: Path | str, split: str) -> tuple[list[Path], int]:
    """The split's tar files as ``manifest.json`` lists them, and its sample count ([] and 0 for
    an empty split); a missing manifest or a listed tar that is not there is an error."""
    manifest_path = Path(shards) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["splits"][split]["shards"]
    except FileNotFoundError as e:
        raise ValueError(f"{manifest_path}: not found; build shards with python -m deblur.shard") from e
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path}: no shard list for split {split!r} ({e!r})") from e
    paths = [Path(shards) / entry["name"] for entry in entries]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path}: listed in {manifest_path} but missing")
    return paths, sum(int(entry["samples"]) for entry in entries)
