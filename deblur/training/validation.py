"""Validation during training: PSNR/SSIM of the generator over a whole split, on every rank.

The per-image scores and their averaging are :mod:`deblur.metrics`' (``score_sums``,
``mean_scores``), the same ones ``python -m deblur.evaluate`` uses.

What is scored (:func:`scored_generators`): the generator the run's outputs use, logged as
``val/*`` (the EMA of G when ``train.ema_decay`` > 0, else G itself), and with an EMA also the
trained G, as ``val_raw/*``; both in one pass over the split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from deblur.metrics import mean_scores, score_sums
from deblur.norm import denormalize
from deblur.training.checkpoint import step_dir_name
from deblur.training.gan import GanStep
from deblur.training.samples import save_samples
from deblur.training.tracking import Log


@torch.no_grad()
def restoration_sums(
    accelerator: Accelerator, generator: nn.Module, blurred: torch.Tensor, sharp: torch.Tensor
) -> torch.Tensor:
    """Sums over one batch of [PSNR restored, SSIM restored, PSNR blurred, SSIM blurred, count].

    Sums (not means) so that batches and ranks of different sizes combine exactly.
    """
    with accelerator.autocast():
        restored = generator(blurred)
    restored01 = denormalize(restored.float()).clamp(0, 1)
    blurred01 = denormalize(blurred.float()).clamp(0, 1)
    sharp01 = denormalize(sharp.float()).clamp(0, 1)
    count = torch.tensor([float(sharp.shape[0])], device=sharp.device)
    return torch.cat([score_sums(restored01, sharp01), score_sums(blurred01, sharp01), count])


def summarize(sums: torch.Tensor) -> dict[str, float]:
    """Turn all-reduced :func:`restoration_sums` into means (NaN when no image was seen)."""
    total = sums.double().cpu()
    count = int(total[4].item())
    restored, blurred = mean_scores(total[0:2], count), mean_scores(total[2:4], count)
    return {
        "psnr_restored": restored["psnr"],
        "ssim_restored": restored["ssim"],
        "psnr_blurred": blurred["psnr"],
        "ssim_blurred": blurred["ssim"],
        "images": count,
    }


def scored_generators(accelerator: Accelerator, gan: GanStep) -> list[tuple[str, str, nn.Module]]:
    """(log-key suffix, label, unwrapped generator) of what is scored: first the generator the
    outputs use ("", the EMA when there is one), then the trained G beside it ("_raw")."""
    raw = accelerator.unwrap_model(gan.generator)
    return [("", "G", raw)] if gan.ema is None else [("", "EMA", gan.ema.module), ("_raw", "raw G", raw)]


def validate(
    accelerator: Accelerator, generators: list[nn.Module], loader
) -> tuple[list[dict[str, float]], tuple[torch.Tensor, ...] | None]:
    """PSNR/SSIM of restored (by each of ``generators``, unwrapped) and of blurred images over
    the whole split (all ranks), plus this rank's first batch (None when its part of the split
    is empty).

    Ranks may run different numbers of batches here (the loaders' drop_last=False), so nothing
    inside the loop may be a collective. The generators run unwrapped: a DDP forward under
    no_grad with forward_sync_buffers=False issues none either (torch's DistributedDataParallel.
    _pre_forward/_post_forward only sync with gradients enabled or buffers broadcast), but the
    plain module makes that evident. The one collective, the reduce, comes after the loop, and
    every rank reaches it, one that had no batch included.
    """
    modes = [g.training for g in generators]
    for generator in generators:
        generator.eval()
    sums = torch.zeros(len(generators), 5, device=accelerator.device, dtype=torch.float64)
    first = None
    for blurred, sharp in loader:
        first = first or (blurred, sharp)
        for i, generator in enumerate(generators):
            sums[i] += restoration_sums(accelerator, generator, blurred, sharp).double()
    for generator, mode in zip(generators, modes):
        generator.train(mode)
    return [summarize(row) for row in accelerator.reduce(sums, reduction="sum")], first


def validate_and_sample(
    accelerator: Accelerator, gan: GanStep, loader, log: Log, step: int, samples_dir: Path, sample_images: int
) -> None:
    """Every ``train.eval_every`` steps: log ``val/*`` (and ``val_raw/*``) scores, and write
    (and log) the sample grid of the main process's first validation batch."""
    generators = scored_generators(accelerator, gan)
    scores, first = validate(accelerator, [generator for _, _, generator in generators], loader)
    log.scalars(prefixed("val", generators, scores), step)
    if accelerator.is_main_process and first is not None:
        sample_path = samples_dir / f"{step_dir_name(step)}.png"
        save_samples(accelerator, {label: g for _, label, g in generators}, first, sample_images, sample_path)
        log.image("samples", sample_path, step)


def prefixed(split: str, generators: list[tuple[str, str, nn.Module]], scores: list[dict]) -> dict[str, float]:
    """``{split}{suffix}/{key}`` -> value of every generator's scores (``val/psnr_restored``,
    ``val_raw/psnr_restored``, ...)."""
    return {
        f"{split}{suffix}/{k}": v for (suffix, _, _), metrics in zip(generators, scores) for k, v in metrics.items()
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line of :func:`summarize`'s output."""
    if not metrics["images"]:
        return "no images"
    return (
        f"{metrics['images']} images: "
        f"restored PSNR {metrics['psnr_restored']:.2f} dB, SSIM {metrics['ssim_restored']:.3f}; "
        f"blurred input PSNR {metrics['psnr_blurred']:.2f} dB, SSIM {metrics['ssim_blurred']:.3f}"
    )
