"""Start a fresh run from trained weights: ``train.init_from`` (BasicSR's ``pretrain_network_g``,
mmagic's ``load_from``, for fine-tuning on new data or continuing with another recipe).

``train.init_from`` is either

- a generator file (``generator.safetensors``, ``generator_raw.safetensors`` or any file
  :func:`deblur.weights.save_generator` wrote), with ``discriminator.safetensors`` beside it
  loaded too when there is one; or
- a finished run's ``output_dir``: its ``generator.safetensors`` (the EMA when that run kept one)
  and its ``discriminator.safetensors``.

Weights only: the optimizers, the learning-rate schedules, the skip counters and the data start
fresh at step 0; the EMA starts as a copy of the loaded generator. A discriminator that is not
there starts from its random initialization (the log says so). Every tensor is checked first
(names, shapes, kinds, finite values: :func:`deblur.weights.check_tensors`), so a file of another
model is one error naming the file and the tensor, and nothing is loaded. The trainer calls this
only when ``output_dir`` has no checkpoint: a rerun of the same command resumes its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from deblur.errors import InputError
from deblur.training.gan import GanStep
from deblur.weights import WeightsError, generator_state, load_discriminator_state

GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"


def init_files(source: Path) -> tuple[Path, Path | None]:
    """(the generator file, the discriminator file or None) that ``train.init_from`` names."""
    if source.is_dir():
        generator = source / GENERATOR_FILE
        if not generator.is_file():
            raise InputError(
                f"train.init_from: {source} is a folder without {GENERATOR_FILE}; give a finished run's output_dir "
                "or a generator .safetensors file"
            )
    elif source.is_file():
        generator = source
    else:
        raise InputError(f"train.init_from: {source} not found")
    discriminator = generator.with_name(DISCRIMINATOR_FILE)
    return generator, (discriminator if discriminator.is_file() and discriminator != generator else None)


@torch.no_grad()
def init_from(source: Path, accelerator: Accelerator, gan: GanStep) -> list[str]:
    """Load ``source``'s weights into the prepared G (and its EMA) and D; returns the log lines."""
    generator_file, discriminator_file = init_files(source)
    try:
        g_state, residual = generator_state(generator_file)
        d_state = None if discriminator_file is None else load_discriminator_state(discriminator_file)
    except WeightsError as error:
        raise InputError(f"train.init_from: {error}") from error
    generator = accelerator.unwrap_model(gan.generator)
    if residual != generator.residual:
        raise InputError(
            f"train.init_from: {generator_file} holds a generator with residual={str(residual).lower()}, "
            f"this run's model.residual is {str(generator.residual).lower()}; set model.residual to match"
        )
    generator.load_state_dict(g_state)
    if gan.ema is not None:
        gan.ema.copy_from(generator)
    loaded = [f"{generator_file} (generator{' and its EMA' if gan.ema is not None else ''})"]
    if d_state is not None:
        accelerator.unwrap_model(gan.discriminator).load_state_dict(d_state)
        loaded.append(f"{discriminator_file} (discriminator)")
    lines = [f"initialized from {' and '.join(loaded)}: weights only, new optimizers, step 0"]
    if d_state is None:
        lines.append(f"no {DISCRIMINATOR_FILE} beside {generator_file}: the discriminator starts untrained")
    return lines
