"""Deterministic WebDataset tar writing and DALI ``wds2idx`` index files.

Tars are plain USTAR with every header field fixed (mtime, uid/gid, names, mode), so the same
samples always give the same bytes. The index text itself is :func:`deblur.shard.format.index_text`.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from deblur.shard.format import index_text, split_name

_HEADER = 512  # one USTAR header block; names are ASCII and <= 100 chars, so never more
_MTIME = 946684800  # 2000-01-01: fixed so rebuilds are byte-identical


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
    placed = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            placed.append([])
            for name, data in members:
                header_at = tar.offset
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                placed[-1].append((name, header_at + _HEADER, len(data)))
    return buf.getvalue(), index_text(placed)


def index_of_tar(path: Path) -> str:
    """The wds2idx index text for an existing tar (used by --verify); raises on a broken tar."""
    groups: list[list[tuple[str, int, int]]] = []
    last_key = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key = split_name(member.name)[0]
            if key != last_key:
                groups.append([])
                last_key = key
            groups[-1].append((member.name, member.offset_data, member.size))
    return index_text(groups)
