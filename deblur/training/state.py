"""The run's state beyond Accelerate's objects, with one owner: :class:`TrainState`.

Accelerate's ``save_state``/``load_state`` keep the models, optimizers, loss scaler and RNG
states. Everything else a resumed run needs is here, saved and restored as one object (as
torchtitan's ``Trainer.state_dict`` is registered with its checkpointer), instead of loop
locals handed to the checkpoint code one by one:

    step                    training steps done
    skipped_total,          the Meter's skip counters (deblur/training/meter.py)
    consecutive_skips
    ema                     the EMA's decay and update count; its tensors: ema.safetensors
    lr_schedules            each optimizer's LambdaLR position (deblur/training/schedule.py)
    loader                  this rank's training-loader position: loader-rank<R>.json

:meth:`TrainState.state_dict` is the JSON of trainer.json (the same on every rank),
:meth:`TrainState.tensor_files` the safetensors files (the same on every rank, so the main
process writes them), and the loader's own ``state_dict`` the per-rank file;
deblur/training/checkpoint.py writes them all under one manifest and reads them back through
:meth:`TrainState.load_state_dict`. No pickle: JSON and safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from deblur.training.config import Config
from deblur.training.gan import GanStep
from deblur.training.meter import Meter
from deblur.training.schedule import fast_forward, make_schedule

EMA_FILE = "ema.safetensors"


class TrainState:
    """Step, skip counters, EMA, learning-rate schedules and the training loader's position.

    ``advance`` after each training step moves the step and the schedules on (host arithmetic
    only); ``lrs`` are the learning rates the last step trained with (what the log shows)."""

    def __init__(self, cfg: Config, gan: GanStep, loader, meter: Meter) -> None:
        self.step = 0
        self.gan = gan
        self.loader = loader
        self.meter = meter
        self.schedules = {
            "generator": make_schedule(gan.g_optimizer, cfg.optim, cfg.train.max_steps),
            "discriminator": make_schedule(gan.d_optimizer, cfg.optim, cfg.train.max_steps),
        }
        self.lrs = self.current_lrs()

    @property
    def ema(self):
        return self.gan.ema

    def current_lrs(self) -> dict[str, float]:
        """The rates the next step trains with."""
        return {name: schedule.get_last_lr()[0] for name, schedule in self.schedules.items()}

    def advance(self) -> None:
        """One training step is done: count it, and move both schedules to the next step."""
        self.lrs = self.current_lrs()
        self.step += 1
        for schedule in self.schedules.values():
            schedule.step()

    def state_dict(self) -> dict[str, Any]:
        """trainer.json: plain JSON, the same on every rank."""
        ema = None if self.ema is None else {"decay": self.ema.decay, "updates": self.ema.updates}
        return {
            "step": self.step,
            **self.meter.counters(),
            "ema": ema,
            "lr_schedules": {name: schedule.state_dict() for name, schedule in self.schedules.items()},
        }

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The safetensors files of this state (file name -> tensors), the same on every rank."""
        if self.ema is None:
            return {}
        return {EMA_FILE: {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> list[str]:
        """Restore from trainer.json's ``state`` and the files in checkpoint ``folder`` (after
        Accelerate restored the models and optimizers). Returns notes on what could not be kept
        as it was (a checkpoint from before EMA or schedules, the EMA switched on or off)."""
        notes = []
        self.step = state["step"]
        self.meter.load_counters(state)
        saved_ema = state.get("ema")
        if self.ema is not None and saved_ema is not None:
            self.ema.load_state_dict(load_file(folder / EMA_FILE, device=str(self.ema_device())), saved_ema["updates"])
            if saved_ema["decay"] != self.ema.decay:
                notes.append(f"EMA: decay {self.ema.decay} from now on (train.ema_decay), {saved_ema['decay']} before")
        elif self.ema is not None:
            self.ema.copy_from(self.gan.accelerator.unwrap_model(self.gan.generator))
            notes.append(f"EMA: {folder} has none (train.ema_decay was 0, or older); it starts from the generator")
        elif saved_ema is not None:
            notes.append(f"EMA: train.ema_decay=0, so the EMA saved in {folder} is not used (nor saved again)")
        saved_schedules = state.get("lr_schedules")
        for name, schedule in self.schedules.items():
            if saved_schedules is not None:
                schedule.load_state_dict(saved_schedules[name])
            else:
                fast_forward(schedule, self.step)
        if saved_schedules is None:
            notes.append(f"learning rates: {folder} holds no schedule position; each schedule continues at the step")
        self.lrs = self.current_lrs()
        return notes

    def ema_device(self) -> torch.device:
        return next(self.ema.module.parameters()).device
