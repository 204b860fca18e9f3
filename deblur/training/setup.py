"""What a run is built from: Accelerate, the two models and their optimizers, the loaders."""

from __future__ import annotations

import inspect
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import gather_object, parse_flag_from_env, set_seed
from torch.nn.parallel import DistributedDataParallel

from deblur.loading.contract import usable_cores
from deblur.loading.loader import make_loader
from deblur.models import Discriminator, Generator
from deblur.shard.format import manifest_split
from deblur.training.config import Config
from deblur.training.ema import Ema
from deblur.training.gan import GanStep, make_optimizer
from deblur.training.hardware import resolve_compile, resolve_precision, resolve_threads
from deblur.training.launcher import Launch, detect, srun_environment
from deblur.training.tracking import resolve_wandb_mode


class _DdpKwargs(DistributedDataParallelKwargs):
    """DDP without the per-forward buffer broadcast. torch 2.13 renamed ``broadcast_buffers``
    to ``forward_sync_buffers`` (the old name warns on every process); Accelerate 1.15 only
    passes the old one, hence this handler (set as ``accelerator.ddp_handler``)."""

    def to_kwargs(self) -> dict[str, Any]:
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            return {"forward_sync_buffers": False}
        return {"broadcast_buffers": False}


@dataclass(frozen=True)
class RunLayout:
    """Where the run's processes are and what each may use: logged at start, in the W&B config."""

    processes: int
    nodes: int
    cores: int  # this process's share of the usable cores (the loader's default workers)
    threads: int  # compute threads (torch.set_num_threads)
    threads_why: str


class RunAccelerator(Accelerator):
    """Accelerate, plus how the run was launched and laid out. Prints once per run: Accelerate's
    print is once per node, so a multi-node run's merged log repeated every line per node."""

    launch: Launch
    layout: RunLayout

    def print(self, *args, **kwargs) -> None:
        if self.is_main_process:
            print(*args, **kwargs, flush=True)


def build_accelerator(cfg: Config) -> RunAccelerator:
    """Accelerate for however the run was launched (deblur.training.launcher), with the precision,
    compute threads and W&B mode resolved as deblur/training/hardware.py says; logs each choice."""
    launch = detect()
    launched_threads = os.environ.get("OMP_NUM_THREADS")  # the launcher's, or the user's
    # srun starting one process per task: Slurm's layout, in the variables torch reads.
    os.environ.update(srun_environment(os.environ))
    launch.refuse_fewer_processes(int(os.environ.get("WORLD_SIZE", "1")))
    # Without cpu=True Accelerate joins CPU processes into one run (gloo) only when told with
    # ACCELERATE_USE_CPU, and otherwise starts each as a separate run of one process.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    # With OMP_NUM_THREADS set (to anything), Accelerate's CPU setup leaves the threads alone
    # instead of setting and warning about its own; measure_layout decides them below.
    os.environ.setdefault("OMP_NUM_THREADS", str(launch.threads()[0] if launch.threads() else 1))
    device = PartialState(cpu=cpu).device
    precision, why = resolve_precision(cfg.train.mixed_precision, device, launch.mixed_precision())
    wandb_mode, wandb_why = resolve_wandb_mode(cfg.wandb.mode)
    accelerator = RunAccelerator(
        cpu=cpu,
        mixed_precision=precision,
        dynamo_backend="no",  # train.compile compiles the models in place (build_models)
        log_with="wandb" if wandb_mode != "disabled" else None,
        project_dir=str(cfg.output_dir),
    )
    launch.refuse_fewer_processes(accelerator.num_processes)
    accelerator.launch = launch
    # No buffer broadcast at each forward: it copies rank 0's BatchNorm buffers into every
    # replica in place, which is what breaks a BN module used twice before one backward on
    # CUDA. D's running statistics are never used (it always runs in train mode), so each rank
    # keeping its own is harmless. See deblur/training/gan.py for the full argument.
    accelerator.ddp_handler = _DdpKwargs()
    accelerator.layout = layout = measure_layout(accelerator, cfg.train.threads, launch)
    torch.set_num_threads(layout.threads)
    for note in launch.notes:
        accelerator.print(f"note: {note}")
    accelerator.print(f"processes: {layout.processes} (nodes {layout.nodes}), started by {launch.launcher}")
    accelerator.print(f"precision: {precision} ({why})")
    replaced = ""
    if launched_threads not in (None, str(layout.threads)) and launch.threads() is None:
        replaced = f"; replaces OMP_NUM_THREADS={launched_threads} set by {launch.launcher}"
    accelerator.print(f"threads: {layout.threads} per process ({layout.threads_why}{replaced})")
    accelerator.print(f"wandb: {wandb_mode} ({wandb_why})")
    return accelerator


def measure_layout(accelerator: Accelerator, setting: int | None, launch: Launch) -> RunLayout:
    """Collective: every process's node and the cores it may run on (its CPU affinity, which
    Slurm's and taskset's binding set) -> the number of nodes and this process's share."""
    node = (socket.gethostname(), os.environ.get("GROUP_RANK", ""))
    mine = os.sched_getaffinity(0)
    everyone = gather_object([(node, sorted(mine))]) if accelerator.num_processes > 1 else [(node, sorted(mine))]
    sharing = sum(1 for other, cores in everyone if other == node and mine & set(cores))
    threads, why = resolve_threads(setting, len(mine), sharing, launch.threads())
    nodes = len({other for other, _ in everyone})
    return RunLayout(accelerator.num_processes, nodes, max(1, len(mine) // sharing), threads, why)


def build_models(cfg: Config, accelerator: Accelerator) -> GanStep:
    """G, D and their optimizers, prepared for this run: channels_last and compiled as the
    config says (both in place, so state-dict keys and checkpoints are the same either way), and
    the EMA of G (``train.ema_decay``), a copy of the initial G that is never compiled."""
    set_seed(cfg.seed)  # the same seed on every rank: identical initial replicas
    generator = Generator(residual=cfg.model.residual)
    discriminator = Discriminator()
    launch = getattr(accelerator, "launch", None)
    compiled, why = resolve_compile(cfg.train.compile, accelerator.device, launch and launch.dynamo_backend())
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
    gan = GanStep(accelerator, generator, discriminator, g_optimizer, d_optimizer, cfg.loss, cfg.optim, update_mode)
    if cfg.train.ema_decay > 0:  # on the device, in G's memory format; updated after every G update
        gan.ema = Ema(accelerator.unwrap_model(generator), cfg.train.ema_decay)
        gan.g_update_hooks.append(gan.ema.update)
    return gan


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
    cores = accelerator.layout.cores if isinstance(accelerator, RunAccelerator) else usable_cores()
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
        crop=cfg.data.crop,
        backend=cfg.data.loader,
        device=accelerator.device,
        num_workers=cfg.data.workers or cores,
        drop_last=train,
        decode_threads=cfg.data.decode_threads,
        hw_decoder_load=cfg.data.hw_decoder_load,
    )
