"""Benchmarks: ``python -m deblur.bench {shard,loader,train,checkpoint,launch,gpu} [options]``.

Each subcommand lives in its own module; ``--help`` after the subcommand lists its options.
The whole command runs through :func:`deblur.errors.run_main`: a bad option, shard folder or
split is one line naming it and exit status 2.
"""

from __future__ import annotations

import sys

from deblur.errors import InputError, run_main

USAGE = "usage: python -m deblur.bench {shard,loader,train,checkpoint,launch,gpu} [options]"


def dispatch(argv: list[str]) -> int | None:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv:
        raise InputError(f"no benchmark named; {USAGE}")
    name, rest = argv[0], argv[1:]
    if name == "shard":
        from deblur.bench import shard as bench
    elif name == "loader":
        from deblur.bench import loader as bench
    elif name == "train":
        from deblur.bench import train as bench
    elif name == "checkpoint":
        from deblur.bench import checkpoint as bench
    elif name == "launch":
        from deblur.bench import launch as bench
    elif name == "gpu":
        from deblur.bench import gpu as bench
    else:
        raise InputError(f"unknown benchmark {name!r}; {USAGE}")
    return bench.main(rest)


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: dispatch(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
