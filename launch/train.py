"""Train the deblurring GAN on any number of processes/GPUs/machines.

    accelerate launch launch/train.py --config configs/ddp.yaml [key.sub=value ...]

Examples:
    accelerate launch --multi_gpu --num_processes 8 launch/train.py --config configs/ddp.yaml
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \\
        launch/train.py --config configs/demo.yaml train.max_steps=50
    python launch/train.py --config configs/demo.yaml          # one process, no launcher

Running the same command again resumes from the latest checkpoint in output_dir. SIGTERM or
Ctrl-C saves a checkpoint at the next step and exits. Accelerate's launcher flags go before the
script; everything after it (``--config``, overrides) is ours.
"""

from __future__ import annotations

import argparse
import os
import sys

from deblur.training.checkpoint import CheckpointError
from deblur.training.config import ConfigError, load_config
from deblur.training.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/ddp.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except CheckpointError as exc:  # every rank raises it; one message is enough
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
