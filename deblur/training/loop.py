"""The training loop: ``accelerate launch launch/train.py --config configs/ddp.yaml [key=value ...]``.

Read :func:`train` top to bottom: set up Accelerate, models, optimizers, the EMA of G and the
per-rank loaders; gather the run's state in one :class:`deblur.training.state.TrainState`
(step, skip counters, EMA, learning-rate schedules, loader position); resume it from the newest
checkpoint in ``output_dir`` that verifies, or else start from ``train.init_from``'s weights;
then repeat GAN steps (:meth:`deblur.training.gan.GanStep.step`), advancing the state, logging,
validating, checkpointing, until ``train.max_steps`` or a stop signal; finally write
``generator.safetensors`` (the EMA), ``generator_raw.safetensors``, ``discriminator.safetensors``
and ``metrics.json`` (test split). Each of those is a named piece in its own module of
``deblur/training/``.

Determinism: every rank seeds the same way before building the models, so all replicas start
identical (DDP would broadcast rank 0's weights anyway); the training step itself draws no
random numbers, and the loaders are seeded and resumable, so a resumed run replays exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from deblur.errors import InputError
from deblur.shard.check import check_dataset
from deblur.training.checkpoint import remove_partial_saves, resume_checkpoint, save_checkpoint, step_dir_name
from deblur.training.config import Config, dump_config
from deblur.training.failures import together
from deblur.training.feed import Feed
from deblur.training.init import init_from
from deblur.training.lock import claim
from deblur.training.meter import Meter, Throughput, interval_scalars
from deblur.training.outputs import final_outputs
from deblur.training.setup import build_accelerator, build_loader, build_models
from deblur.training.state import TrainState
from deblur.training.stop import StopRequest
from deblur.training.tracking import Log, init_tracking
from deblur.training.validation import validate_and_sample


def train(cfg: Config) -> str:
    """Run (or resume) training. Returns "finished" or "stopped" (signal; checkpoint saved)."""
    accelerator = build_accelerator(cfg)
    stop = StopRequest(announce=accelerator.is_main_process)
    torch.backends.cudnn.benchmark = True  # fixed 64x64 shapes: let cuDNN pick its fastest kernels
    checkpoints, config_yaml = cfg.output_dir / "checkpoints", dump_config(cfg)
    # Setup that may fail on one rank runs `together`: every rank learns of a failure anywhere
    # (one report, no rank left waiting in a collective); deblur/training/failures.py.
    with together(accelerator):  # first: a second trainer on this output_dir is refused at once
        lock = claim(cfg.output_dir) if accelerator.is_main_process else None
    with together(accelerator):  # before anything is written: every split against its manifest
        check_dataset(
            cfg.data.shards,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            progress=accelerator.is_main_process,
        )
    with together(accelerator):
        prepare_output_dir(accelerator, checkpoints, config_yaml)

    gan = build_models(cfg, accelerator)
    with together(accelerator):
        train_loader = build_loader(cfg, accelerator, "train", train=True)
        if train_loader is None:
            raise InputError(f"{cfg.data.shards}: the train split is empty")
        val_loader = build_loader(cfg, accelerator, "val", train=False)
    # One owner of everything a resume restores besides Accelerate's objects (state.py).
    state = TrainState(cfg, gan, train_loader, Meter(accelerator, cfg.train.max_consecutive_skips))
    resume_or_init(cfg, accelerator, checkpoints, state, config_yaml)

    init_tracking(cfg, accelerator)
    log = Log(cfg, accelerator)
    meter = state.meter
    updates_per_step = 1 + cfg.loss.g_updates_per_step
    record = cfg.output_dir / f"batches-rank{accelerator.process_index}.jsonl" if cfg.train.record_batches else None
    feed = Feed(train_loader, updates_per_step, record)
    throughput = Throughput(updates_per_step * cfg.data.batch_size)
    progress = tqdm(
        total=cfg.train.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process
    )
    stopped = False
    while state.step < cfg.train.max_steps:
        # The steady-state step: nothing here waits for the device or builds a tensor from host
        # data; the stop flag's one host read was copied a step earlier (tests/test_host_transfers.py).
        feed.step = state.step
        meter.add(gan.step(feed))
        stopped = stop.agreed(accelerator)
        state.advance()  # the step count and the learning-rate schedules: host arithmetic
        step = state.step
        throughput.step()
        progress.update(1)
        last = step == cfg.train.max_steps

        if step % cfg.train.log_every == 0 or last:
            meter.read(step)
            scalars = interval_scalars(meter, state.lrs, feed, accelerator, *throughput.interval())
            log.scalars(scalars, step)
            progress.set_postfix(
                g=f"{scalars.get('g/loss', float('nan')):.3f}",
                d=f"{scalars.get('d/loss', float('nan')):.3f}",
                img_s=f"{scalars['perf/images_per_s']:.0f}",
            )
            throughput.restart()
            feed.wait = 0.0

        with throughput.paused():  # validation and checkpoints do not count against images/s
            if val_loader is not None and (step % cfg.train.eval_every == 0 or last):
                validate_and_sample(
                    accelerator, gan, val_loader, log, step, cfg.output_dir / "samples", cfg.train.sample_images
                )
            if stopped or step % cfg.train.checkpoint_every == 0 or last:
                meter.read(step)
                save_checkpoint(accelerator, checkpoints, state, config_yaml, keep=cfg.train.keep_checkpoints)
        if stopped:
            accelerator.print(
                f"stop signal: saved {checkpoints / step_dir_name(step)}; rerun the same command to resume"
            )
            break
    progress.close()

    if not stopped:  # the last step was checkpointed in the loop (or resumed from)
        final_outputs(cfg, accelerator, gan, log, state.step)
    log.finish()
    if lock is not None:
        lock.release()
    return "stopped" if stopped else "finished"


def prepare_output_dir(accelerator: Accelerator, checkpoints: Path, config_yaml: str) -> None:
    """Main process, once this run holds ``output_dir`` (deblur/training/lock.py): drop
    unfinished checkpoint saves of a killed run, write config.yaml."""
    if accelerator.is_main_process:
        remove_partial_saves(checkpoints)
        (checkpoints.parent / "config.yaml").write_text(config_yaml)


def resume_or_init(
    cfg: Config, accelerator: Accelerator, checkpoints: Path, state: TrainState, config_yaml: str
) -> None:
    """Restore ``state`` (and Accelerate's objects) from the newest checkpoint in ``output_dir``
    that verifies, on any number of processes (deblur/training/checkpoint.py says what carries
    over); without one, start from ``train.init_from``'s weights when it is set. A rerun of the
    same command therefore resumes its own checkpoints and never reads init_from again."""
    resumed = resume_checkpoint(accelerator, checkpoints, state)
    if resumed is None:
        if cfg.train.init_from is not None:
            with together(accelerator):  # every rank reads the files; a bad one stops all of them
                notes = init_from(cfg.train.init_from, accelerator, state.gan)
            for line in notes:
                accelerator.print(line)
        return
    if (resumed.path / "config.yaml").read_text() != config_yaml:
        accelerator.print(f"warning: the config differs from the one saved in {resumed.path}")
    for line in resumed.report:
        accelerator.print(line)
    if cfg.train.init_from is not None:
        accelerator.print(f"train.init_from ({cfg.train.init_from}) not used: resuming this run's own checkpoint")
