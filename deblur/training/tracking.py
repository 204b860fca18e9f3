"""Where scalars and images go: the W&B tracker (through Accelerate) and ``log.jsonl``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from accelerate import Accelerator

from deblur.training.config import Config
from deblur.training.hardware import resolve_compile


def init_tracking(cfg: Config, accelerator: Accelerator) -> None:
    """W&B through Accelerate's tracker (main process only), run directory inside output_dir.

    The run id is kept in output_dir so that a resumed run continues the same W&B run.
    """
    if cfg.wandb.mode == "disabled":
        return
    id_file = cfg.output_dir / "wandb_run_id.txt"
    if accelerator.is_main_process and not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    accelerator.wait_for_everyone()
    init = {
        "dir": str(cfg.output_dir),
        "mode": cfg.wandb.mode,
        "name": cfg.wandb.name or cfg.output_dir.name,
        "id": id_file.read_text().strip(),
        "resume": "allow",
    }
    if cfg.wandb.entity:
        init["entity"] = cfg.wandb.entity
    resolved = {
        "mixed_precision": accelerator.mixed_precision,  # what setup.build_accelerator chose
        "compile": resolve_compile(cfg.train.compile, accelerator.device)[0],
        "device": str(accelerator.device),
    }
    config = {**cfg.to_dict(), "resolved": resolved}
    accelerator.init_trackers(cfg.wandb.project, config=config, init_kwargs={"wandb": init})


class Log:
    """Scalars go to the W&B tracker and to output_dir/log.jsonl (main process only)."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.use_wandb = cfg.wandb.mode != "disabled"
        self.path = cfg.output_dir / "log.jsonl"

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.use_wandb and self.accelerator.is_main_process:
            import wandb

            self.accelerator.log({key: wandb.Image(str(path))}, step=step)
