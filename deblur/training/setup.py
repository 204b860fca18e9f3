"""What a run is built from: Accelerate, the two models and their optimizers, the loaders."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from torch.nn.parallel import DistributedDataParallel

from deblur.loading.contract import usable_cores
from deblur.loading.loader import make_loader
from deblur.models import Discriminator, Generator
from deblur.shard.format import manifest_split
from deblur.training.config import Config
from deblur.training.gan import GanStep, make_optimizer
from deblur.training.hardware import resolve_compile, resolve_precision


class _DdpKwargs(DistributedDataParallelKwargs):
    """DDP without the per-forward buffer broadcast. torch 2.13 renamed ``broadcast_buffers``
    to ``forward_sync_buffers`` (the old name warns on every process); Accelerate 1.15 only
    passes the old one, hence this handler (set as ``accelerator.ddp_handler``)."""

    def to_kwargs(self) -> dict[str, Any]:
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            return {"forward_sync_buffers": False}
        return {"broadcast_buffers": False}


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerate with the precision ``train.mixed_precision`` resolves to on this device."""
    # The process group and device, before the precision is chosen; `cpu` as Accelerator reads
    # it (a PartialState made without it ignores ACCELERATE_USE_CPU and sees one process).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision, why = resolve_precision(cfg.train.mixed_precision, device)
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with="wandb" if cfg.wandb.mode != "disabled" else None,
        project_dir=str(cfg.output_dir),
    )
    # No buffer broadcast at each forward: it copies rank 0's BatchNorm buffers into every
    # replica in place, which is what breaks a BN module used twice before one backward on
    # CUDA. D's running statistics are never used (it always runs in train mode), so each rank
    # keeping its own is harmless. See deblur/training/gan.py for the full argument.
    accelerator.ddp_handler = _DdpKwargs()
    accelerator.print(f"precision: {precision} ({why})")
    return accelerator


def build_models(cfg: Config, accelerator: Accelerator) -> GanStep:
    """G, D and their optimizers, prepared for this run: channels_last and compiled as the
    config says (both in place, so state-dict keys and checkpoints are the same either way)."""
    set_seed(cfg.seed)  # the same seed on every rank: identical initial replicas
    generator = Generator(residual=cfg.model.residual)
    discriminator = Discriminator()
    compiled, why = resolve_compile(cfg.train.compile, accelerator.device)
    scope, mode = cfg.train.compile_scope, cfg.train.compile_mode
    for model in (generator, discriminator):
        if cfg.train.channels_last:
            # Before DDP wraps the model: its gradient buckets take the parameters' layout.
            model.to(memory_format=torch.channels_last)
        if compiled and scope == "models":
            model.compile(mode=mode)
    accelerator.print(
        f"compile: {f'on, {scope}, mode {mode}' if compiled else 'off'} ({why}); "
        f"memory format: {'channels_last' if cfg.train.channels_last else 'contiguous (NCHW)'}"
    )
    g_optimizer = make_optimizer(generator, cfg.optim.g_lr, cfg.optim)
    d_optimizer = make_optimizer(discriminator, cfg.optim.d_lr, cfg.optim)
    # Order matters for checkpoints: model.safetensors is G, model_1.safetensors is D.
    generator, discriminator, g_optimizer, d_optimizer = accelerator.prepare(
        generator, discriminator, g_optimizer, d_optimizer
    )
    update_mode = mode if compiled and scope == "update" else None
    return GanStep(accelerator, generator, discriminator, g_optimizer, d_optimizer, cfg.loss, cfg.optim, update_mode)


def build_loader(cfg: Config, accelerator: Accelerator, split: str, train: bool):
    """The DALI/torch loader for this rank, or None for an empty split. Not passed to prepare():
    each rank reads its own part of the shards already.

    Training drops the remainder (equal batch counts keep the DDP ranks in step). Validation
    (``drop_last=False``) reads every image of the split exactly once across the ranks, at the
    training batch size with a smaller last batch, so ranks may run different numbers of
    batches, and a rank whose part is empty (fewer images than processes) runs none; see
    :func:`deblur.training.validation.validate`. Metrics record the count of images measured."""
    if manifest_split(cfg.data.shards, split)[1] == 0:
        return None
    return make_loader(
        cfg.data.shards,
        split,
        batch_size=cfg.data.batch_size,
        image_size=cfg.data.image_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.seed,
        shuffle=train,
        flip=cfg.data.flip and train,
        backend=cfg.data.loader,
        device=accelerator.device,
        num_workers=cfg.data.workers or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))),
        drop_last=train,
        decode_threads=cfg.data.decode_threads,
        hw_decoder_load=cfg.data.hw_decoder_load,
    )
