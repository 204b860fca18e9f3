"""``python -m deblur.shard`` on a disk that is full for some files (a helper the tests run).

    python -m tests.faulty_disk 'train-000002.tar' --src photos --out shards

Writing a file whose name matches the pattern (fnmatch; the ``.partial`` being written counts
by its final name) stores half of the data and then fails with ENOSPC, as a full disk does.
The fault is injected where the builder's bytes reach the operating system (the file object of
deblur.files.write_atomic, the builder's only way to write), so everything above it runs as in
a real build: the cleanup, the one-line message, the exit status. The free space it reports is
the real disk's.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import sys

import deblur.files

PATTERN = sys.argv[1]


class _FullDisk:
    def __init__(self, file) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _open(path, mode="r", *args, **kwargs):
    file = open(path, mode, *args, **kwargs)
    name = os.path.basename(os.fspath(path)).removesuffix(".partial")
    return _FullDisk(file) if "w" in mode and fnmatch.fnmatch(name, PATTERN) else file


deblur.files.open = _open  # write_atomic's global lookup of open() finds this before the builtin

if __name__ == "__main__":
    from deblur.shard.build import main

    sys.exit(main(sys.argv[2:]))
