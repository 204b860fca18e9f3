"""Train the deblurring GAN on any number of processes/GPUs/machines.

    accelerate launch launch/train.py --config configs/ddp.yaml [key.sub=value ...]

Examples (docs/cluster.md has every launcher, Slurm included):
    accelerate launch --multi_gpu --num_processes 8 launch/train.py --config configs/ddp.yaml
    accelerate launch --multi_gpu --num_processes 2 launch/train.py --config configs/demo.yaml   # 2 CPU processes
    torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml
    python launch/train.py --config configs/demo.yaml          # one process, no launcher

Running the same command again resumes from the latest checkpoint in output_dir. SIGTERM,
SIGUSR1 or Ctrl-C saves a checkpoint at the next step and exits; a second signal more than 3 s
after the first aborts without saving. Launcher flags go before the script; everything after it
(``--config``, overrides) is ours.

A failure is one line on stderr (``error: ...``), printed once for the whole run, and the exit
status is 2 for bad input (config, data, output_dir, a checkpoint that cannot be resumed) and 1
for a fault (disk full, a lost process); DEBLUR_DEBUG=1 adds the traceback. Launchers add their
own report after a process fails (docs/cluster.md, "When a run fails").
"""

from __future__ import annotations

import argparse
import sys

from deblur.errors import run_main
from deblur.training.config import load_config
from deblur.training.failures import labelled, report
from deblur.training.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config YAML (e.g. configs/ddp.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order")
    args = parser.parse_args(argv)

    def body() -> None:
        with labelled():
            train(load_config(args.config, args.overrides))

    return run_main(body, report=report)


if __name__ == "__main__":
    sys.exit(main())
