"""``python -m deblur.shard``: the command line of :mod:`deblur.shard.build`.

A thin entry of its own so that the builder's code is never the ``__main__`` module: the
forkserver's workers re-import the parent's main module by name, and re-running the package
itself there made every worker warn "'deblur.shard' found in sys.modules" (multiprocessing
skips a package's ``__main__`` instead).
"""

from deblur.shard.build import main

if __name__ == "__main__":
    raise SystemExit(main())
