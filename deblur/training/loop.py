"""The training loop: ``accelerate launch launch/train.py --config configs/ddp.yaml [key=value ...]``.

Read top to bottom: set up Accelerate, models, optimizers and the per-rank loaders; resume from
the newest checkpoint in ``output_dir`` that verifies; then repeat GAN steps (see deblur/training/gan.py),
logging, evaluating, checkpointing, until ``train.max_steps`` or a stop signal; finally write
``generator.safetensors`` and ``metrics.json`` (test split).

Determinism: every rank seeds the same way before building the models, so all replicas start
identical (DDP would broadcast rank 0's weights anyway); the training step itself draws no
random numbers, and the loaders are seeded and resumable, so a resumed run replays exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from deblur.training.checkpoint import remove_partial_saves, resume_checkpoint, save_checkpoint, step_dir_name
from deblur.training.config import Config, dump_config
from deblur.loading.contract import usable_cores
from deblur.shard.format import manifest_split
from deblur.loading.loader import make_loader
from deblur.training.gan import GanStep, StepStats, make_optimizer, restoration_sums, summarize
from deblur.training.hardware import resolve_compile, resolve_precision
from deblur.models import Discriminator, Generator
from deblur.norm import denormalize
from deblur.training.samples import labelled_grid
from deblur.weights import save_generator


class StopRequest:
    """SIGTERM/SIGINT only set a flag; the loop acts on it at a step boundary.

    A second signal aborts at once (e.g. Ctrl-C twice when a rank hangs), without saving.
    """

    def __init__(self) -> None:
        self.requested = False
        self._pending: DeviceToHost | None = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: aborting without saving")
        self.requested = True

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank at the same step once any rank got a signal.

        Called once per step. The all-reduce of this call's flag is read at the next call, so
        the host never waits for the device here; ranks still agree, since each reads the same
        reduction, and a stop comes one step later."""
        previous, flag = self._pending, torch.tensor([float(self.requested)], device=accelerator.device)
        self._pending = DeviceToHost(accelerator.reduce(flag, reduction="sum"))
        return previous is not None and previous.get().item() > 0


class DeviceToHost:
    """A device tensor's copy to the host, started now and waited for only in :meth:`get`."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.host = tensor.detach().to("cpu", non_blocking=True)
        self.ready = None
        if tensor.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def get(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host


class Meter:
    """Training statistics and skip counters.

    Steps hand in their statistics as device tensors (:meth:`add`); :meth:`read` moves all of
    them to the host in one transfer, counts skipped updates and stops the run after
    ``max_consecutive_skips`` in a row. Reading once per logging interval (and before a
    checkpoint) instead of once per update keeps the host from waiting for the device.
    """

    def __init__(self, max_consecutive_skips: int, skipped_total: int = 0, consecutive_skips: int = 0) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_total = skipped_total
        self.consecutive_skips = consecutive_skips
        self._device: list[StepStats] = []
        self._values: dict[str, list[float]] = defaultdict(list)

    def add(self, stats: StepStats) -> None:
        self._device.append(stats)

    def read(self, step: int) -> None:
        if not self._device:
            return
        results = StepStats.concat(self._device).read()
        self._device.clear()
        for result in results:
            if not result.skipped:
                self.consecutive_skips = 0
                for key, value in result.stats.items():
                    self._values[key].append(value)
                continue
            self.skipped_total += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise FloatingPointError(
                    f"by step {step}: {self.consecutive_skips} updates in a row had a non-finite loss "
                    f"(train.max_consecutive_skips={self.max_consecutive_skips}); last stats {result.stats}. "
                    "Lower the learning rates or use bf16 instead of fp16."
                )

    def counters(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips}

    def summary(self) -> dict[str, float]:
        """Means of what was read since the last summary, plus the skip counters."""
        scalars = {key: sum(v) / len(v) for key, v in self._values.items() if v}
        self._values.clear()
        return {**scalars, "skips/total": self.skipped_total, "skips/consecutive": self.consecutive_skips}


class Feed:
    """The training batches, endlessly, timing how long the loop waits for each and, with
    ``train.record_batches``, writing a hash of every image this rank consumed."""

    def __init__(self, loader, updates_per_step: int, record_path: Path | None) -> None:
        self.batches = endless(loader)
        self.batches_per_epoch = len(loader)
        self.updates_per_step = updates_per_step
        self.record_path = record_path
        self.wait = 0.0
        self.step = 0  # the trainer sets it before each step, for the records
        self._update = 0

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        blurred, sharp = next(self.batches)
        self.wait += time.perf_counter() - start
        if self.record_path is not None:
            update = self._update % self.updates_per_step
            epoch = (self.step * self.updates_per_step + update) // self.batches_per_epoch
            record_batch(self.record_path, self.step, update, epoch, sharp)
        self._update += 1
        return blurred, sharp


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
    for model in (generator, discriminator):
        if cfg.train.channels_last:
            # Before DDP wraps the model: its gradient buckets take the parameters' layout.
            model.to(memory_format=torch.channels_last)
        if compiled:
            model.compile()
    accelerator.print(f"compile: {'on' if compiled else 'off'} ({why}); "
                      f"memory format: {'channels_last' if cfg.train.channels_last else 'contiguous (NCHW)'}")
    g_optimizer = make_optimizer(generator, cfg.optim.g_lr, cfg.optim)
    d_optimizer = make_optimizer(discriminator, cfg.optim.d_lr, cfg.optim)
    # Order matters for checkpoints: model.safetensors is G, model_1.safetensors is D.
    generator, discriminator, g_optimizer, d_optimizer = accelerator.prepare(
        generator, discriminator, g_optimizer, d_optimizer
    )
    return GanStep(accelerator, generator, discriminator, g_optimizer, d_optimizer, cfg.loss, cfg.optim)


def build_loader(cfg: Config, accelerator: Accelerator, split: str, train: bool):
    """The DALI/torch loader for this rank, or None for an empty split. Not passed to prepare():
    each rank reads its own part of the shards already.

    Training drops the remainder (equal batch counts keep the DDP ranks in step). Evaluation
    (``drop_last=False``) reads every image of the split exactly once across the ranks, at the
    training batch size with a smaller last batch, so ranks may run different numbers of
    batches, and a rank whose part is empty (fewer images than processes) runs none; see
    :func:`evaluate`. Metrics record the count of images measured."""
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


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epoch boundaries (each new iteration of the loader is its next epoch)."""
    empty_passes = 0
    while True:
        empty_passes += 1
        for batch in loader:
            empty_passes = 0
            yield batch
        # One empty pass is allowed: a loader resumed exactly at the end of an epoch.
        if empty_passes >= 2:
            raise RuntimeError(
                "the training loader yields no batches: too few training samples for this batch size and number of processes"
            )


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
        "mixed_precision": resolve_precision(cfg.train.mixed_precision, accelerator.device)[0],
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


def evaluate(accelerator: Accelerator, gan: GanStep, loader) -> tuple[dict[str, float], tuple[torch.Tensor, ...] | None]:
    """PSNR/SSIM of restored and of blurred images over the whole split (all ranks), plus this
    rank's first batch (None when its part of the split is empty).

    Ranks may run different numbers of batches here (the loaders' drop_last=False), so nothing
    inside the loop may be a collective. The generator runs unwrapped: a DDP forward under
    no_grad with broadcast_buffers=False issues none either (torch's DistributedDataParallel.
    _pre_forward/_post_forward only sync with gradients enabled or buffers broadcast), but the
    plain module makes that evident. The one collective, the reduce, comes after the loop, and
    every rank reaches it, one that had no batch included.
    """
    gan.generator.eval()
    generator = accelerator.unwrap_model(gan.generator)
    sums = torch.zeros(5, device=accelerator.device, dtype=torch.float64)
    first = None
    for blurred, sharp in loader:
        first = first or (blurred, sharp)
        sums += restoration_sums(accelerator, generator, blurred, sharp).double()
    gan.generator.train()
    return summarize(accelerator.reduce(sums, reduction="sum")), first


@torch.no_grad()
def save_samples(accelerator: Accelerator, gan: GanStep, batch, count: int, path: Path) -> None:
    """The sample grid: rows blurred | restored | sharp, labelled, each image enlarged 3x."""
    blurred, sharp = (t[:count] for t in batch)
    # Unwrapped: this runs on the main process only, and a DDP forward on one rank alone must
    # never be in a position to wait for the others.
    with accelerator.autocast():
        restored = accelerator.unwrap_model(gan.generator)(blurred)
    rows = {name: denormalize(t.float()).clamp(0, 1).cpu() for name, t in
            (("blurred (input)", blurred), ("restored (G)", restored), ("sharp (target)", sharp))}
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, scale=3).save(path)


def replica_fingerprints(accelerator: Accelerator, gan: GanStep) -> list[str]:
    """sha256 of each rank's G and D parameters: DDP keeps them bitwise identical, and a
    mismatch means the replicas diverged (buffers are left out: D's BN statistics are per rank)."""
    digest = hashlib.sha256()
    for model in (gan.generator, gan.discriminator):
        for p in accelerator.unwrap_model(model).parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    from accelerate.utils import gather_object

    return gather_object([digest.hexdigest()])


def record_batch(path: Path, step: int, update: int, epoch: int, sharp: torch.Tensor) -> None:
    """Diagnostic (train.record_batches): hashes of the images this rank consumed."""
    hashes = [hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest()[:16] for img in sharp]
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "update": update, "epoch": epoch, "sharp": hashes}) + "\n")


def write_final_outputs(cfg: Config, accelerator: Accelerator, gan: GanStep, step: int, test_metrics: dict, fingerprints: list[str]) -> None:
    if not accelerator.is_main_process:
        return
    save_generator(
        accelerator.unwrap_model(gan.generator),
        cfg.output_dir / "generator.safetensors",
        extra_metadata={"format": "deblur-generator", "normalization": "imagenet", "step": str(step)},
    )
    metrics = {
        "split": "test",
        "step": step,
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in test_metrics.items()},
        "replica_param_sha256": fingerprints,
    }
    (cfg.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


def interval_scalars(gan: GanStep, meter: Meter, feed: Feed, accelerator: Accelerator, images: int, elapsed: float) -> dict[str, float]:
    """Everything logged every ``train.log_every`` steps; ``images`` were consumed by this rank
    in ``elapsed`` seconds of training (evaluation and checkpoints not counted)."""
    per_process = images / elapsed
    scalars = {
        **meter.summary(),
        "lr/generator": gan.g_optimizer.param_groups[0]["lr"],
        "lr/discriminator": gan.d_optimizer.param_groups[0]["lr"],
        "perf/images_per_s": per_process * accelerator.num_processes,
        "perf/images_per_s_per_process": per_process,
        "perf/data_wait_fraction": min(1.0, feed.wait / elapsed),
    }
    if accelerator.device.type == "cuda":
        scalars["perf/gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return scalars


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line of :func:`summarize`'s output."""
    if not metrics["images"]:
        return "no images"
    return (f"{metrics['images']} images: restored PSNR {metrics['psnr_restored']:.2f} dB, SSIM {metrics['ssim_restored']:.3f}; "
            f"blurred input PSNR {metrics['psnr_blurred']:.2f} dB, SSIM {metrics['ssim_blurred']:.3f}")


def train(cfg: Config) -> str:
    """Run (or resume) training. Returns "finished" or "stopped" (signal; checkpoint saved)."""
    accelerator = build_accelerator(cfg)
    stop = StopRequest()
    torch.backends.cudnn.benchmark = True  # fixed 64x64 shapes: let cuDNN pick its fastest kernels
    out = cfg.output_dir
    checkpoints = out / "checkpoints"
    config_yaml = dump_config(cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(checkpoints)
        (out / "config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()

    gan = build_models(cfg, accelerator)
    train_loader = build_loader(cfg, accelerator, "train", train=True)
    if train_loader is None:
        raise ValueError(f"{cfg.data.shards}: the train split is empty")
    val_loader = build_loader(cfg, accelerator, "val", train=False)

    # Resume: the same command continues from the newest checkpoint that verifies, on any
    # number of processes (deblur/training/checkpoint.py says what carries over).
    step, counters = 0, {}
    resumed = resume_checkpoint(accelerator, checkpoints, train_loader.state_dict())
    if resumed is not None:
        train_loader.load_state_dict(resumed.loader_state)
        step = resumed.trainer_state["step"]
        counters = {k: resumed.trainer_state[k] for k in ("skipped_total", "consecutive_skips")}
        if (resumed.path / "config.yaml").read_text() != config_yaml:
            accelerator.print(f"warning: the config differs from the one saved in {resumed.path}")
        for line in resumed.report:
            accelerator.print(line)

    init_tracking(cfg, accelerator)
    log = Log(cfg, accelerator)
    meter = Meter(cfg.train.max_consecutive_skips, **counters)
    updates_per_step = 1 + cfg.loss.g_updates_per_step
    record = out / f"batches-rank{accelerator.process_index}.jsonl" if cfg.train.record_batches else None
    feed = Feed(train_loader, updates_per_step, record)

    def checkpoint() -> None:
        meter.read(step)
        save_checkpoint(accelerator, checkpoints, step, train_loader.state_dict(), meter.counters(), config_yaml,
                        keep=cfg.train.keep_checkpoints)

    progress = tqdm(total=cfg.train.max_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    # Throughput intervals leave out time spent evaluating and checkpointing (`paused`).
    interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
    stopped = False
    while step < cfg.train.max_steps:
        feed.step = step
        meter.add(gan.step(feed))
        step += 1
        interval_steps += 1
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            meter.read(step)
            images = interval_steps * updates_per_step * cfg.data.batch_size
            scalars = interval_scalars(gan, meter, feed, accelerator, images, time.perf_counter() - interval_start - paused)
            log.scalars(scalars, step)
            progress.set_postfix(g=f"{scalars.get('g/loss', float('nan')):.3f}", d=f"{scalars.get('d/loss', float('nan')):.3f}",
                                 img_s=f"{scalars['perf/images_per_s']:.0f}")
            interval_start, interval_steps, paused, feed.wait = time.perf_counter(), 0, 0.0, 0.0

        pause_start = time.perf_counter()
        if val_loader is not None and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
            metrics, first = evaluate(accelerator, gan, val_loader)
            log.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
            if accelerator.is_main_process and first is not None:
                sample_path = out / "samples" / f"{step_dir_name(step)}.png"
                save_samples(accelerator, gan, first, cfg.train.sample_images, sample_path)
                log.image("samples", sample_path, step)

        stopped = stop.agreed(accelerator)
        if stopped or step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            checkpoint()
        if stopped:
            accelerator.print(f"stop signal: saved {checkpoints / step_dir_name(step)}; rerun the same command to resume")
            break
        paused += time.perf_counter() - pause_start
    progress.close()

    if not stopped:  # the last step was checkpointed in the loop (or resumed from)
        test_loader = build_loader(cfg, accelerator, "test", train=False)
        test_metrics = evaluate(accelerator, gan, test_loader)[0] if test_loader is not None else summarize(torch.zeros(5))
        fingerprints = replica_fingerprints(accelerator, gan)
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"replicas diverged: parameter hashes per rank {fingerprints}")
        write_final_outputs(cfg, accelerator, gan, step, test_metrics, fingerprints)
        if test_metrics["images"]:
            log.scalars({f"test/{k}": v for k, v in test_metrics.items()}, step)
        else:
            accelerator.print("warning: no test images; metrics.json holds no test metrics")
        accelerator.print(f"done: {out / 'generator.safetensors'}; test split, {format_metrics(test_metrics)}")
    accelerator.end_training()
    return "stopped" if stopped else "finished"
