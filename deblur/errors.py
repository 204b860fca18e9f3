"""How every command fails: one line that names the file or key at fault, and an exit status.

    error: shards/celeba/manifest.json: not found; build shards with python -m deblur.shard

- :class:`InputError` (exit status 2): bad input, something the user gave or pointed at: an
  option, a config key, a file or folder that is missing, damaged or not ours to touch.
- :class:`Fault` (exit status 1): the input was fine but the work could not be done: the disk
  is full, a device failed, another process of the run died.
- Anything else is a bug: one ``internal error`` line (exit status 1) that says how to get the
  traceback.

Every command's entry runs its body through :func:`run_main`. A traceback is printed only with
``DEBLUR_DEBUG=1`` in the environment (it reaches every process a launcher starts).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "DEBLUR_DEBUG"
INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT


class DeblurError(Exception):
    """An expected failure; its message is the whole report (one line, naming the file or key)."""

    exit_code = 1


class InputError(DeblurError):
    """Bad input: an option, config key, file or folder the user gave. Exit status 2."""

    exit_code = 2


class Fault(DeblurError):
    """Good input, failed work: disk full, a device error, a lost peer process. Exit status 1."""

    exit_code = 1


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def free_space(path: str | Path) -> str:
    """'N MiB free on <folder>' for the nearest existing folder at or above ``path``."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.0f} MiB free on {folder}"


def from_os_error(error: OSError, doing: str = "") -> DeblurError:
    """An OSError as one line naming its path: disk full is a Fault that says how much space is
    left; a path the user cannot use (missing, not permitted, not a folder) is an InputError."""
    path = error.filename or ""
    what = f"{doing} {path}".strip() or "file operation"
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return Fault(f"disk full while {what}: {free_space(path or '.')}")
    if error.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS):
        return InputError(f"{what}: {reason}")
    return Fault(f"{what}: {reason}")


def classify(error: BaseException) -> tuple[str, int]:
    """(the one line to print, exit status) for an exception that ended a command."""
    if isinstance(error, DeblurError):
        return f"error: {error}", error.exit_code
    if isinstance(error, OSError):
        converted = from_os_error(error)
        return f"error: {converted}", converted.exit_code
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", INTERRUPTED
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return f"internal error: {type(error).__name__}: {error}{at} (set {DEBUG_ENV}=1 for the traceback)", 1


def run_main(main: Callable[[], int | None], report: Callable[[BaseException], bool] = lambda error: True) -> int:
    """Run a command's body and return its exit status; an exception becomes one line on stderr
    (when ``report(error)`` says this process should print it) or, with DEBLUR_DEBUG=1, a
    traceback as well."""
    try:
        return main() or 0
    except (Exception, KeyboardInterrupt) as error:  # SystemExit (argparse's usage errors) passes
        line, status = classify(error)
        if debug_enabled():
            traceback.print_exc()
        if report(error):
            print(" ".join(line.split()), file=sys.stderr, flush=True)
        return status
