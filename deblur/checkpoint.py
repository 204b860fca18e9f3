"""``python -m deblur.checkpoint RUN_DIR``: list a run's checkpoints and whether each verifies.

The command's spelling stays short; the code is :mod:`deblur.training.checkpoint`.
"""

from deblur.training.checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
