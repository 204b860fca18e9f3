"""One ``output_dir``, one trainer: a lock the main process holds for the run's life.

:func:`claim` is the first thing a run does to ``output_dir``: it creates the folder if needed
and takes an exclusive lock on ``output_dir/trainer.lock`` (POSIX ``lockf``, non-blocking). A
second trainer started on the same folder is refused at once, naming the holder (pid, host,
start time, command, which the holder writes into the file), before it deletes or writes
anything. The kernel releases the lock when the holding process exits, however it exits
(SIGKILL included), so a killed run never leaves the folder locked; the file itself stays and
is reused.

Why ``lockf`` (a POSIX record lock) rather than ``flock``: record locks belong to the process,
so the DataLoader workers it forks do not hold it after the trainer dies; and Linux's NFS client
implements ``flock`` with them anyway. Their one trap: closing *any* descriptor of the file
releases the process's lock, so nothing but :func:`claim` may open ``trainer.lock`` in the
trainer process.

Shared filesystems: on NFS (v3 through the NLM lock manager, v4 natively) the lock is seen by
every client, unless the filesystem is mounted ``nolock`` or ``local_lock=...``. If a node
crashes, the server releases its locks when the client's lease expires (NFSv4, 90 s by default)
or when the rebooted client reports to ``statd`` (NFSv3). Lustre sees locks across nodes only
when mounted with ``-o flock``; with ``-o localflock`` each node sees only its own, and without
either option locking fails (``ENOSYS``). GPFS locks across nodes; BeeGFS only with
``tuneUseGlobalFileLocks``. Where the filesystem cannot lock at all, the run prints a warning
and continues unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from deblur.errors import InputError, from_os_error

LOCK_NAME = "trainer.lock"
# lockf on a filesystem without locking: ENOLCK (NFS without a lock manager), ENOSYS (Lustre
# without -o flock), EOPNOTSUPP/EINVAL (FUSE filesystems that do not implement it).
NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class OutputLock:
    """The held lock on ``output_dir/trainer.lock``; released by :meth:`release` or at exit."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the record lock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def claim(out: Path) -> OutputLock:
    """Create ``out`` if needed and lock it for this process. Raises InputError when ``out`` is
    not a usable folder or another trainer holds it."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {out}: exists and is not a folder")
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise from_os_error(error, "creating output_dir") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise from_os_error(error, "output_dir is not writable:") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise InputError(
                f"output_dir {out} is in use by another trainer ({holder}; lock {path}): "
                "wait for it to finish, or give this run another output_dir"
            ) from None
        if error.errno not in NO_LOCKING:
            os.close(fd)
            raise from_os_error(error, "locking") from None
        print(
            f"warning: {path}: this filesystem cannot lock files ({error.strerror}); "
            "a second trainer started on this output_dir would not be refused",
            file=sys.stderr,
        )
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {' '.join(sys.argv)}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder + "\n").encode(), 0)
    except OSError as error:
        os.close(fd)
        error.filename = str(path)
        raise from_os_error(error, "writing") from None
    return OutputLock(path, fd)
