"""Learning-rate schedules of G and D: ``optim.schedule`` (constant | cosine | linear) after
``optim.warmup_steps`` steps of linear warm-up.

The rate of training step ``s`` (0-based) is ``base * lr_factor(s)``, a pure function of the step:

- warm-up, ``s < warmup``: ``(s + 1) / warmup``, so the first step already trains (at
  ``base / warmup``) and step ``warmup - 1`` runs at ``base``;
- then, with ``p = (s - warmup) / (max_steps - warmup)`` going from 0 towards 1: constant 1,
  cosine ``(1 + cos(pi * p)) / 2`` or linear ``1 - p``; both reach 0 only after the last step.

Each schedule is torch's ``LambdaLR`` on the torch optimizer inside Accelerate's wrapper, stepped
by the trainer once per training step (:class:`deblur.training.state.TrainState`), never passed
to ``accelerator.prepare``: Accelerate's ``AcceleratedScheduler`` steps a scheduler
``num_processes`` times per call (it assumes an epoch of fewer, larger steps on more processes)
and not at all after an fp16 step it saw skipped, so the rate at step k would depend on the
number of processes and on the host reading the loss scaler's verdict. Here it depends on the
step only, so a run resumed on any number of processes continues it exactly. Stepping sets
``param_group["lr"]`` to a Python float that fused Adam takes as it is: nothing is sent to the
device. ``LambdaLR.state_dict()`` is plain numbers and goes into the checkpoint's trainer.json.

The decay spans ``train.max_steps`` as configured now: raising it when resuming stretches the
rest of the schedule (the rate jumps up to where the longer schedule would be).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from deblur.training.config import OptimConfig


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """The multiplier of the configured learning rate at training step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")


def make_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> LambdaLR:
    """``optimizer``'s schedule (the torch optimizer: unwrapped from Accelerate's wrapper), at step 0."""
    inner = getattr(optimizer, "optimizer", optimizer)
    factor = partial(lr_factor, schedule=optim.schedule, warmup_steps=optim.warmup_steps, max_steps=max_steps)
    return LambdaLR(inner, factor)


def fast_forward(schedule: LambdaLR, step: int) -> None:
    """Move a schedule at step 0 to ``step`` (for a checkpoint written before schedules were
    saved): the rate is the step's, as if it had been stepped all along."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            schedule.step()
