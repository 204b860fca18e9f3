"""Command-line parsing for the use side and the benchmarks: every bad option is one line.

argparse reports a bad option as a usage block plus ``prog: error: ...`` and exits by itself;
:class:`Parser` raises :class:`deblur.errors.InputError` instead, so the command's
:func:`deblur.errors.run_main` prints ``error: argument --batch-size: invalid int value: 'x'``
and returns status 2 like every other bad input. ``--help`` still prints the help and exits 0.

The checks below name the option in the message (``--batch-size: must be at least 1, got 0``),
for the values argparse's types let through: zero or negative counts, non-finite floats.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from deblur.errors import InputError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line InputErrors (see the module docstring)."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see --help)")


def at_least(option: str, value: int | float | None, minimum: int | float) -> None:
    """Refuse ``value`` below ``minimum`` (None, an option left out, passes)."""
    if value is not None and not value >= minimum:  # `not >=` also refuses NaN
        raise InputError(f"{option}: must be at least {minimum}, got {value}")


def positive(option: str, value: float | None) -> None:
    """Refuse a float that is zero, negative, NaN or infinite (None passes)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{option}: must be a positive finite number, got {value}")
