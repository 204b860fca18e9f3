"""Benchmarks: ``python -m deblur.bench {shard,loader,train,checkpoint,gpu} [options]``.

Each subcommand lives in its own module; ``--help`` after the subcommand lists its options.
"""

from __future__ import annotations

import sys

USAGE = "usage: python -m deblur.bench {shard,loader,train,checkpoint,gpu} [options]"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name == "shard":
        from deblur.bench import shard as bench
    elif name == "loader":
        from deblur.bench import loader as bench
    elif name == "train":
        from deblur.bench import train as bench
    elif name == "checkpoint":
        from deblur.bench import checkpoint as bench
    elif name == "gpu":
        from deblur.bench import gpu as bench
    else:
        raise SystemExit(f"unknown benchmark {name!r}; {USAGE}")
    bench.main(rest)


if __name__ == "__main__":
    main()
