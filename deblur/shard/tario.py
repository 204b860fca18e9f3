"""Deterministic WebDataset tar writing and DALI ``wds2idx`` index files.

Tars are plain USTAR with every header field fixed (mtime, uid/gid, names, mode), so the same
samples always give the same bytes. The index is what DALI's ``wds2idx`` writes:
``v1.2 <samples>`` then, per sample, ``<ext> <data offset> <size> <member name>`` for each of
its members on one line, where the key is the member name up to its first dot.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

INDEX_VERSION = "v1.2"
_HEADER = 512  # one USTAR header block; names are ASCII and <= 100 chars, so never more
_MTIME = 946684800  # 2000-01-01: fixed so rebuilds are byte-identical


def split_name(name: str) -> tuple[str, str]:
    """(key, ext) the way wds2idx, DALI and webdataset split a member name: at the first dot."""
    base = name.rsplit("/", 1)[-1]
    dot = name.find(".", len(name) - len(base))
    return name[:dot], name[dot + 1:]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    if len(name) > 100 or not name.isascii():
        raise ValueError(f"tar member name must be ASCII and <= 100 chars: {name!r}")
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def build_tar(samples: list[list[tuple[str, bytes]]]) -> tuple[bytes, str]:
    """Tar bytes and wds2idx index text for ``samples`` (each a list of (member name, data))."""
    buf = io.BytesIO()
    lines = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            fields = []
            for name, data in members:
                header_at = tar.offset
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                fields.append(f"{split_name(name)[1]} {header_at + _HEADER} {len(data)} {name}")
            lines.append(" ".join(fields))
    index = f"{INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)
    return buf.getvalue(), index


def index_of_tar(path: Path) -> str:
    """The wds2idx index text for an existing tar (used by --verify); raises on a broken tar."""
    groups: list[list[str]] = []
    last_key = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_name(member.name)
            field = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                groups.append([field])
                last_key = key
            else:
                groups[-1].append(field)
    return f"{INDEX_VERSION} {len(groups)}\n" + "".join(" ".join(g) + "\n" for g in groups)
