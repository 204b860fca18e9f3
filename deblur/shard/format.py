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

The reader side: :func:`read_manifest` checks the manifest (naming the key at fault),
:func:`split_shards` / :func:`manifest_split` list a split's shards checked against their
indexes (:func:`read_index`), and :func:`read_member` / :func:`read_samples` read member bytes
at the index offsets, as DALI does. Every problem is a :class:`ShardError` naming the file.
``deblur.shard.check`` builds the full dataset check (hashes, decoding) on these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    """One dict per sample line: member ext -> (data offset, size, member name). A line that is
    not whole ``ext offset size name`` groups raises ValueError."""
    samples = []
    for row in rows:
        fields = row.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{len(fields)} fields, not groups of 4 (ext offset size name)")
        members = {}
        for i in range(0, len(fields), 4):
            offset, size = int(fields[i + 1]), int(fields[i + 2])
            if offset < 0 or size < 0:
                raise ValueError(f"negative offset or size in {' '.join(fields[i : i + 4])!r}")
            members[fields[i]] = (offset, size, fields[i + 3])
        samples.append(members)
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
    if not tar.is_file():
        raise ShardError(f"shard {tar} is missing (or not a file)")
    if not idx.is_file():
        raise ShardError(f"missing index {idx} for shard {tar} (build it with wds2idx)")
    try:
        lines = idx.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise ShardError(
            f"{idx}: not a wds2idx {INDEX_VERSION} index (not text: {error.reason}) for shard {tar}"
        ) from None
    except OSError as error:
        raise ShardError(f"{idx}: cannot read ({error.strerror or error}) for shard {tar}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{idx}: not a wds2idx {INDEX_VERSION} index (first line {lines[:1]}) for shard {tar}")
    count, rows = int(head[1]), lines[1:]
    if len(rows) != count:
        raise ShardError(f"{idx}: header says {count} samples but lists {len(rows)}, shard {tar}")
    tar_size = tar.stat().st_size
    for row_no, row in enumerate(rows, start=2):
        try:
            (members,) = parse_index_rows([row])
        except ValueError as error:
            raise ShardError(f"{idx} line {row_no}: malformed index line ({error}), shard {tar}") from None
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


def read_member(file: BinaryIO, tar: Path, member: tuple[int, int, str]) -> bytes:
    """One member's bytes, read from the open ``tar`` at its index entry (offset, size, name),
    the way DALI reads it: the tar headers are not parsed."""
    offset, size, name = member
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise ShardError(f"cannot read shard {tar} member {name}: the tar is shorter than its index says")
    return data


def read_samples(tar: Path, exts: tuple[str, ...] = SAMPLE_MEMBERS) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of every sample of a shard, in tar order, read at the offsets of
    its index with :func:`read_member`, the one way every reader gets at member bytes."""
    idx = index_path(tar)
    try:
        rows = index_rows(idx)
    except ValueError as error:
        raise ShardError(f"{idx}: malformed index ({error}), shard {tar}") from None
    with open(tar, "rb") as file:
        for line, members in enumerate(rows, start=2):
            missing = [ext for ext in exts if ext not in members]
            if missing:
                raise ShardError(f"{idx} line {line}: sample has no {', '.join(missing)} member, shard {tar}")
            key = split_name(members[exts[0]][2])[0]
            yield key, {ext: read_member(file, tar, members[ext]) for ext in exts}


# ----------------------------------------------------------------------------- manifest

SHARD_NAME = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6,}}\.tar$")  # shard_name's names: no path, no ".."
DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShardFile:
    """One shard as ``manifest.json`` lists it: its tar (the index lies beside it), sample count
    and sha256s (``index_sha256``: the index's, where the manifest records it)."""

    tar: Path
    samples: int
    sha256: str = ""
    index_sha256: str | None = None

    @property
    def idx(self) -> Path:
        return index_path(self.tar)


def _checked(condition: bool, manifest: Path, key: str, problem: str) -> None:
    if not condition:
        raise ShardError(f"{manifest}: {key}: {problem}; rebuild with python -m deblur.shard or restore the file")


def _digest(value: object, manifest: Path, key: str) -> str:
    _checked(
        isinstance(value, str) and DIGEST.match(value) is not None, manifest, key, f"not a sha256 hex digest: {value!r}"
    )
    _checked(value != "0" * 64, manifest, key, "is zeroed, not the digest of a file")
    return value


def _shard_entry(root: Path, manifest: Path, split: str, key: str, entry: object) -> ShardFile:
    _checked(isinstance(entry, dict), manifest, key, f"expected an object, got {type(entry).__name__}")
    name = entry.get("name")
    _checked(
        isinstance(name, str) and SHARD_NAME.match(name) is not None and name.startswith(f"{split}-"),
        manifest,
        f"{key}.name",
        f"{name!r} is not a shard of this folder (expected {shard_name(split, 0).replace('000000', 'NNNNNN')})",
    )
    samples = entry.get("samples")
    _checked(
        isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0,
        manifest,
        f"{key}.samples",
        f"expected a sample count, got {samples!r}",
    )
    index_sha256 = entry.get("index_sha256")
    return ShardFile(
        tar=root / name,
        samples=samples,
        sha256=_digest(entry.get("sha256"), manifest, f"{key}.sha256"),
        index_sha256=None if index_sha256 is None else _digest(index_sha256, manifest, f"{key}.index_sha256"),
    )


def read_manifest(shards: Path | str) -> dict[str, tuple[ShardFile, ...]]:
    """Every split's shards as ``manifest.json`` lists them, after checking the file: readable
    JSON, an object with ``splits`` holding each of SPLITS, shard names of this folder (no
    path, no ``..``), sample counts that add up, sha256s that are digests. Any problem is a
    :class:`ShardError` naming the file and the key."""
    root = Path(shards)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise ShardError(f"{root}: shard folder not found (or not a folder); build shards with python -m deblur.shard")
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(f"{manifest}: not found; build shards with python -m deblur.shard") from None
    except UnicodeDecodeError as error:
        raise ShardError(f"{manifest}: not UTF-8 text ({error.reason} at byte {error.start}): damaged") from None
    except OSError as error:
        raise ShardError(f"{manifest}: cannot read ({error.strerror or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ShardError(
            f"{manifest}: not valid JSON ({error.msg}: line {error.lineno} column {error.colno}): damaged or cut short"
        ) from None
    _checked(isinstance(data, dict), manifest, "top level", f"expected an object, got {type(data).__name__}")
    _checked(data.get("format", FORMAT) == FORMAT, manifest, "format", f"{data.get('format')!r}, expected {FORMAT!r}")
    splits = data.get("splits")
    _checked(isinstance(splits, dict), manifest, "splits", f"expected an object, got {type(splits).__name__}")
    listing: dict[str, tuple[ShardFile, ...]] = {}
    seen: set[str] = set()
    for split in SPLITS:
        entry = splits.get(split)
        _checked(
            isinstance(entry, dict), manifest, f"splits.{split}", f"expected an object, got {type(entry).__name__}"
        )
        shards_list = entry.get("shards")
        key = f"splits.{split}.shards"
        _checked(isinstance(shards_list, list), manifest, key, f"expected a list, got {type(shards_list).__name__}")
        files = tuple(_shard_entry(root, manifest, split, f"{key}[{i}]", e) for i, e in enumerate(shards_list))
        for i, shard in enumerate(files):
            _checked(shard.tar.name not in seen, manifest, f"{key}[{i}].name", f"{shard.tar.name} is listed twice")
            seen.add(shard.tar.name)
        total = sum(s.samples for s in files)
        _checked(
            entry.get("samples", total) == total,
            manifest,
            f"splits.{split}.samples",
            f"{entry.get('samples')!r}, but its shards hold {total}",
        )
        listing[split] = files
    return listing


def split_shards(shards: Path | str, split: str) -> tuple[ShardFile, ...]:
    """The split's shards in manifest order (:func:`read_manifest`), each present, with an index
    that matches its tar (:func:`read_index`) and the manifest's sample count."""
    manifest = Path(shards) / MANIFEST
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    found = read_manifest(shards)[split]
    for i, shard in enumerate(found):
        if not shard.tar.is_file():
            raise ShardError(f"{shard.tar}: listed in {manifest} but missing")
        count = read_index(shard.tar)
        if count != shard.samples:
            raise ShardError(
                f"{manifest}: splits.{split}.shards[{i}].samples is {shard.samples} "
                f"but {shard.idx} lists {count} samples"
            )
    return found


def manifest_split(shards: Path | str, split: str) -> tuple[list[Path], int]:
    """The split's tar files in manifest order and its sample count ([] and 0 for an empty
    split), each checked as :func:`split_shards` checks them."""
    found = split_shards(shards, split)
    return [s.tar for s in found], sum(s.samples for s in found)
