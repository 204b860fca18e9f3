"""Where scalars and images go: the W&B tracker (through Accelerate) and ``log.jsonl``.

W&B's mode: ``wandb.mode`` in the config > WANDB_MODE (or WANDB_DISABLED) in the environment >
``auto``, which is ``offline``: a local run folder under ``output_dir/wandb/`` that ``wandb
sync`` uploads later. Online by default would hang or fail on compute nodes without network,
and credentials in a (cluster-wide, shared) home directory say nothing about the network.

Resuming continues one W&B run: its id is kept in ``output_dir/wandb_run_id.txt`` and passed
with ``resume="allow"``. Online, W&B continues the run on the server; steps it already has
(replayed after a kill, with the same values) are skipped rather than sent and refused.
Offline, each attempt writes its own ``offline-run-*`` folder with that id, and
``wandb sync output_dir/wandb/offline-run-*`` uploads them in order of their start into the one
run.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from accelerate import Accelerator

from deblur.errors import InputError
from deblur.training.config import Config
from deblur.training.hardware import resolve_compile

# WANDB_MODE's values (W&B also takes its older names run and dryrun) -> the mode.
WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def resolve_wandb_mode(setting: str, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """``wandb.mode`` -> ("online" | "offline" | "disabled", reason naming the source and any
    value it overrode)."""
    from_env = environment_wandb_mode(env)
    if setting != "auto":
        why = f"wandb.mode={setting} in the config"
        if from_env is not None and from_env[0] != setting:
            why += f", overriding {from_env[1]}"
        return setting, why
    if from_env is not None:
        return from_env
    return "offline", "auto: offline, upload later with wandb sync; wandb.mode=online or WANDB_MODE=online streams"


def environment_wandb_mode(env: Mapping[str, str]) -> tuple[str, str] | None:
    disabled = env.get("WANDB_DISABLED", "")
    if disabled.lower() in ("true", "1", "yes"):
        return "disabled", f"WANDB_DISABLED={disabled} in the environment"
    value = env.get("WANDB_MODE", "")
    if not value:
        return None
    if value.lower() not in WANDB_MODES:
        raise InputError(f"WANDB_MODE={value} in the environment: expected online, offline or disabled")
    return WANDB_MODES[value.lower()], f"WANDB_MODE={value} in the environment"


def init_tracking(cfg: Config, accelerator: Accelerator) -> None:
    """W&B through Accelerate's tracker (main process only), run directory inside output_dir.

    The run id is kept in output_dir so that a resumed run continues the same W&B run.
    """
    mode = resolve_wandb_mode(cfg.wandb.mode)[0]
    if mode == "disabled":
        return
    id_file = cfg.output_dir / "wandb_run_id.txt"
    if accelerator.is_main_process and not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    accelerator.wait_for_everyone()
    init = {
        "dir": str(cfg.output_dir),
        "mode": mode,
        "name": cfg.wandb.name or cfg.output_dir.name,
        "id": id_file.read_text().strip(),
        "resume": "allow",
    }
    if cfg.wandb.entity:
        init["entity"] = cfg.wandb.entity
    layout, launch = getattr(accelerator, "layout", None), getattr(accelerator, "launch", None)
    resolved = {
        "mixed_precision": accelerator.mixed_precision,  # what setup.build_accelerator chose
        "compile": resolve_compile(cfg.train.compile, accelerator.device, launch and launch.dynamo_backend())[0],
        "device": str(accelerator.device),
        "wandb_mode": mode,
        "processes": accelerator.num_processes,
        **({"nodes": layout.nodes, "threads": layout.threads} if layout is not None else {}),
    }
    config = {**cfg.to_dict(), "resolved": resolved}
    accelerator.init_trackers(cfg.wandb.project, config=config, init_kwargs={"wandb": init})


class Log:
    """Scalars go to the W&B tracker and to output_dir/log.jsonl (main process only).

    W&B never ends a run: if a call to it fails (its service process was killed with the rest of
    a Slurm job step, the network went away), the run says so once and goes on logging to
    log.jsonl only."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.use_wandb = resolve_wandb_mode(cfg.wandb.mode)[0] != "disabled"
        self.path = cfg.output_dir / "log.jsonl"
        # An online run resumed after a kill replays steps W&B already has (same values):
        # W&B refuses a step below its last, with a warning per call, so they are not sent.
        self.first_tracker_step = 0
        if self.use_wandb and accelerator.is_main_process:
            run = accelerator.get_tracker("wandb", unwrap=True)
            if getattr(run, "resumed", False):
                self.first_tracker_step = getattr(run, "starting_step", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.use_wandb and step >= self.first_tracker_step:
            self._to_wandb(values, step)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.use_wandb and self.accelerator.is_main_process and step >= self.first_tracker_step:
            import wandb

            self._to_wandb({key: wandb.Image(str(path))}, step)

    def finish(self) -> None:
        """End the trackers (W&B uploads or closes its run)."""
        try:
            self.accelerator.end_training()
        except Exception as error:  # W&B's service is gone: its local files are all there is
            self._give_up_wandb(error, None)

    def _to_wandb(self, values: dict, step: int) -> None:
        try:
            self.accelerator.log(values, step=step)
        except Exception as error:
            self._give_up_wandb(error, step)

    def _give_up_wandb(self, error: Exception, step: int | None) -> None:
        import wandb

        self.use_wandb = False
        self.accelerator.trackers = [t for t in self.accelerator.trackers if getattr(t, "name", "") != "wandb"]
        with contextlib.suppress(Exception):
            wandb.teardown()
        since = "" if step is None else f" from step {step} on"
        self.accelerator.print(
            f"warning: W&B stopped working ({type(error).__name__}: {error}); logging only to {self.path}{since}"
        )
