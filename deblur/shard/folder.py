"""The dataset folder: what the builder may touch there, its records in ``.build/``, publishing.

Ownership. The builder writes only into a folder that is new, empty, or its own, and proves the
last with ``.build/owner.json``, written when it claims a folder. A folder built by an earlier
version (``.build/`` shard records and a ``deblur-shards/1`` manifest, no marker) counts as its
own and gets the marker. Anything else is refused before a byte is written.

Inside its own folder it replaces or removes only files its records name. A shard's record
(``.build/<shard>.json``: fingerprint, settings, sample count, sha256 of the tar and of its
index) is written *before* the tar and index, so every shard file it could have written has a
record: a tar or index at a name it is about to write but without a record is refused, and a
stale shard (an earlier build's, not in this plan) is removed only while its bytes are still
the ones its record names.

Every file is written through :func:`publish` (``.partial``, then a rename:
deblur.files.write_atomic), and a failure there (disk full, a signal) removes the ``.partial``;
an OSError becomes one line naming the file (disk full says how much space is left).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tarfile
from pathlib import Path

from deblur.errors import DeblurError, Fault, InputError, from_os_error
from deblur.files import sha256_file, write_atomic
from deblur.shard.format import FORMAT, MANIFEST, index_path
from deblur.shard.tario import index_of_tar

RECORDS = ".build"  # the builder's own records: ownership marker, one record per shard
OWNER = "owner.json"
WRITER = "python -m deblur.shard"
PARTIAL = ".partial"  # deblur.files.write_atomic's name for a file being written


def partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def os_error(error: OSError, path: Path, doing: str) -> DeblurError:
    """An OSError while ``doing`` ``path`` as one line that names ``path``; a fault (disk full)
    adds that finished work is kept for the rerun."""
    converted = from_os_error(OSError(error.errno, error.strerror or str(error), str(path)), doing)
    if isinstance(converted, Fault):
        return Fault(f"{converted}; finished shards are kept: rerun the same command to resume")
    return converted


def publish(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; on any failure remove the ``.partial``, and raise an
    OSError as one line naming ``path``."""
    try:
        write_atomic(path, data)
    except BaseException as error:
        with contextlib.suppress(OSError):
            partial(path).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise os_error(error, path, "writing") from error
        raise


# ----------------------------------------------------------------------------- ownership


def _read_json(path: Path):
    """The JSON in a regular file, or None (missing, not a regular file, unreadable, not JSON)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _claimed(out: Path) -> bool:
    marker = _read_json(out / RECORDS / OWNER)
    return isinstance(marker, dict) and marker.get("written_by") == WRITER


def _built_by_earlier_version(out: Path) -> bool:
    """An earlier version's build: our manifest and at least one shard record, no marker."""
    manifest = _read_json(out / MANIFEST)
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        return False
    records = (_read_json(p) for p in sorted((out / RECORDS).glob("*.tar.json")))
    return any(isinstance(r, dict) and "fingerprint" in r for r in records)


def why_not_ours(out: Path) -> str | None:
    """Why the builder may not write into ``out`` (one clause), or None when it may."""
    if not out.exists():
        return "is a broken symlink" if out.is_symlink() else None
    if not out.is_dir():
        return "is a file, not a folder"
    if _claimed(out):
        return None
    try:
        entries = sorted(os.listdir(out))
    except OSError as error:
        raise os_error(error, out, "reading") from error
    if not entries:
        return None
    if entries == [RECORDS] and set(os.listdir(out / RECORDS)) <= {OWNER, OWNER + PARTIAL}:
        return None  # another --part is claiming it right now
    if _built_by_earlier_version(out):
        return None
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return f"not a folder this builder made (it holds {shown}, and no {RECORDS}/{OWNER})"


def claim_folder(out: Path) -> None:
    """Make ``out`` the builder's: create it, or accept it empty or already its own (then write
    the marker); refuse anything else, changing nothing."""
    if why := why_not_ours(out):
        raise InputError(f"--out {out}: {why}; give a new or empty folder (nothing was changed)")
    if _claimed(out):
        return
    try:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise os_error(error, out / RECORDS, "creating") from error
    try:
        publish(out / RECORDS / OWNER, (json.dumps({"written_by": WRITER, "format": FORMAT}) + "\n").encode())
    except DeblurError:
        if not _claimed(out):  # else: parts started at the same moment, and another one's rename won
            raise


# ----------------------------------------------------------------------------- shard records


def record_path(out: Path, name: str) -> Path:
    return out / RECORDS / f"{name}.json"


def read_record(out: Path, name: str) -> dict | None:
    record = _read_json(record_path(out, name))
    return record if isinstance(record, dict) else None


def write_record(out: Path, record: dict) -> None:
    publish(record_path(out, record["name"]), json.dumps(record, sort_keys=True).encode())


def shard_files(out: Path, name: str) -> tuple[Path, Path]:
    """(tar, index) of a shard."""
    return out / name, index_path(out / name)


def finished_record(out: Path, name: str, fingerprint: str) -> dict | None:
    """The shard's record if it was built from exactly this input and its tar and index are still
    the bytes the record names; else None (build it)."""
    record = read_record(out, name)
    if record is None or record.get("fingerprint") != fingerprint:
        return None
    if record.get("samples") == 0:  # every input unusable: nothing was written
        return record
    tar, idx = shard_files(out, name)
    if not (tar.is_file() and idx.is_file()) or sha256_file(tar) != record.get("sha256"):
        return None
    index_sha256 = sha256_file(idx)
    if "index_sha256" in record:
        return record if index_sha256 == record["index_sha256"] else None
    try:  # recorded by an earlier version, which did not hash the index: it must be the tar's own
        matches = idx.read_text() == index_of_tar(tar)
    except (OSError, ValueError, tarfile.TarError):
        return None
    return record | {"index_sha256": index_sha256} if matches else None


def refuse_foreign(out: Path, names: list[str]) -> None:
    """Refuse to build when a tar or index this run would write is there without a record."""
    foreign = [
        path.name
        for name in names
        if not record_path(out, name).exists()
        for path in shard_files(out, name)
        if path.exists() or path.is_symlink()
    ]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"--out {out}: {shown} not written by this builder (no record in {RECORDS}/); copy their "
            f"{RECORDS}/ records along or move them away (nothing was changed)"
        )


def remove_partials(out: Path, names: list[str]) -> None:
    """Drop half-written files of these shards (a killed run's); other parts' may be in use."""
    for name in names:
        for path in (*shard_files(out, name), record_path(out, name)):
            partial(path).unlink(missing_ok=True)


def _is(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and sha256_file(path) == sha256


def remove_stale(out: Path, keep: set[str]) -> None:
    """Remove the shards of an earlier build that this plan does not contain, as far as their
    records vouch for them; files whose bytes differ from the record are left (and named)."""
    left = []
    for path in sorted((out / RECORDS).glob("*.tar.json")):
        name = path.name.removesuffix(".json")
        if name in keep:
            continue
        record, (tar, idx) = read_record(out, name) or {}, shard_files(out, name)
        tar_ours = _is(tar, record.get("sha256"))
        idx_ours = _is(idx, record["index_sha256"]) if "index_sha256" in record else tar_ours
        for file, ours in ((tar, tar_ours), (idx, idx_ours)):
            if ours:
                file.unlink()
            elif file.exists():
                left.append(file.name)
            partial(file).unlink(missing_ok=True)
        if tar_ours:
            print(f"removed stale shard {name} (an earlier build's, not part of this one)", file=sys.stderr)
        path.unlink()
    if left:
        print(
            f"left {', '.join(left)}: not part of this build, and not the bytes this builder wrote there",
            file=sys.stderr,
        )


def check_apart(src: Path, out: Path, option: str = "--src") -> None:
    """The builder's output never becomes its input: ``--out`` may lie inside ``--src`` (or the
    source folder ``option`` names; it is not searched) but may not be that folder, nor hold it."""
    s, o = src.resolve(), out.resolve()
    if s == o:
        raise InputError(f"--out {out} is {option}: the build would read its own shards as images; give another --out")
    if s.is_relative_to(o):
        raise InputError(
            f"{option} {src} lies inside --out {out}: the dataset folder is the builder's alone; give an --out "
            "outside the images"
        )
