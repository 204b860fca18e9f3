"""Atomic, rotating training checkpoints under ``output_dir/checkpoints/``.

Layout of one complete checkpoint, ``checkpoints/step-0001000/``:

    model.safetensors, model_1.safetensors   generator, discriminator (Accelerate save_state)
    optimizer.bin, optimizer_1.bin           their Adam states
    scaler.pt                                fp16 loss scaler (fp16 runs only)
    random_states_<rank>.pkl                 Python/NumPy/torch RNG states, one per rank
    loader-rank<rank>.json                   each rank's training loader position
    config.yaml                              the resolved config of the run
    trainer.json                             step and skip counters; written last

A save goes to ``checkpoints/.tmp-step-0001000`` first; when every rank has written its part,
the main process renames it to ``step-0001000``. ``rename`` within one directory is atomic, so a
directory named ``step-*`` is always complete and a kill mid-save leaves the previous ones
intact. Leftover ``.tmp-*`` folders are deleted at the next start. The checkpoint folder must be
on a filesystem all ranks share (it is written by all of them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from deblur.tario import write_atomic

STEP_DIR = re.compile(r"^step-(\d{7,})$")
TRAINER_STATE = "trainer.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def loader_state_name(rank: int) -> str:
    return f"loader-rank{rank}.json"


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for path in checkpoints.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = complete_checkpoints(checkpoints)
    return found[-1][1] if found else None


def remove_partial_saves(checkpoints: Path) -> None:
    """Delete ``.tmp-*`` folders left by a save that was killed. Main process only."""
    if checkpoints.is_dir():
        for path in checkpoints.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints: Path,
    step: int,
    loader_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
) -> Path:
    """Collective: every rank must call it at the same step. Returns the final folder."""
    final = checkpoints / step_dir_name(step)
    tmp = checkpoints / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / loader_state_name(accelerator.process_index)).write_text(json.dumps(loader_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_yaml)
        state = {**trainer_state, "step": step, "world_size": accelerator.num_processes}
        write_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=1).encode())
        if final.exists():
            raise FileExistsError(f"{final} already exists; a step is never saved twice")
        os.replace(tmp, final)
        for _, old in complete_checkpoints(checkpoints)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore models, optimizers, scaler and this rank's RNG; return (trainer state, this rank's loader state)."""
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if trainer_state["world_size"] != accelerator.num_processes:
        raise RuntimeError(
            f"{path} was written by {trainer_state['world_size']} processes, this run has "
            f"{accelerator.num_processes}: the per-rank loader positions cannot be mapped; "
            "resume with the same number of processes or start a new output_dir"
        )
    accelerator.load_state(str(path))
    loader_state = json.loads((path / loader_state_name(accelerator.process_index)).read_text())
    return trainer_state, loader_state
