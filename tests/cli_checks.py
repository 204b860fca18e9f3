"""Driving a command as a user does (``python -m ...`` in a subprocess) and checking how it fails:
the exit status, one ``error:`` line that names the file or option, no traceback, and every file
that was there before left byte for byte as it was."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def command(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DEBLUR_DEBUG", None)  # the user's view: no tracebacks
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(command(module, *args), timeout)


def files(*roots: Path) -> dict[Path, bytes]:
    """Every file under ``roots`` with its bytes (a snapshot to compare after a failed command)."""
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        found |= {path: path.read_bytes() for path in paths}
    return found


def error_line(result: subprocess.CompletedProcess, status: int, *, alone: bool = True) -> str:
    """The one ``error:`` line of a command that exited with ``status``; with ``alone`` it is
    all of stderr (a failure before any work), otherwise the last line after progress output."""
    output = result.stdout + result.stderr
    assert result.returncode == status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    if alone:
        assert lines == errors, result.stderr[-3000:]
    return errors[0]


def namespace_prefix() -> list[str]:
    """``unshare`` into a user and mount namespace, where a test can mount a tiny or read-only
    tmpfs (real ENOSPC and EROFS, nothing faked); skip where the kernel does not allow it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"user namespaces are not available: {probe.stderr.decode().strip()}")
    return [unshare, "-rm"]


def in_small_filesystem(
    folder: Path, size: str, cmd: list[str], *, read_only: bool = False
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``cmd`` with a tmpfs of ``size`` (e.g. "64k") mounted on ``folder``; return the result
    and the names found in ``folder`` right after (the mount ends with the command)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    script = (
        f'mount -t tmpfs -o {options} tmpfs "$1" || exit 99; shift; '
        '"$@"; status=$?; ls -A "$0" > "$0.listing" 2>/dev/null || true; exit $status'
    )
    # $0 is the folder (for the listing), $1 too (for the mount); the listing is written beside
    # the folder, outside the mount, so it outlives the namespace.
    result = run([*namespace_prefix(), "sh", "-c", script, str(folder), str(folder), *cmd])
    assert result.returncode != 99, result.stderr
    listing = folder.with_name(folder.name + ".listing")
    names = listing.read_text().split() if listing.exists() else []
    listing.unlink(missing_ok=True)
    return result, names
