"""Validation during training: PSNR/SSIM of the generator over a whole split, on every rank.

The per-image scores and their averaging are :mod:`deblur.metrics`' (``score_sums``,
``mean_scores``), the same ones ``python -m deblur.evaluate`` uses.
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


def validate(
    accelerator: Accelerator, gan: GanStep, loader
) -> tuple[dict[str, float], tuple[torch.Tensor, ...] | None]:
    """PSNR/SSIM of restored and of blurred images over the whole split (all ranks), plus this
    rank's first batch (None when its part of the split is empty).

    Ranks may run different numbers of batches here (the loaders' drop_last=False), so nothing
    inside the loop may be a collective. The generator runs unwrapped: a DDP forward under
    no_grad with forward_sync_buffers=False issues none either (torch's DistributedDataParallel.
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


def validate_and_sample(
    accelerator: Accelerator, gan: GanStep, loader, log: Log, step: int, samples_dir: Path, sample_images: int
) -> None:
    """Every ``train.eval_every`` steps: log ``val/*`` scores, and write (and log) the sample
    grid of the main process's first validation batch."""
    metrics, first = validate(accelerator, gan, loader)
    log.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
    if accelerator.is_main_process and first is not None:
        sample_path = samples_dir / f"{step_dir_name(step)}.png"
        save_samples(accelerator, gan, first, sample_images, sample_path)
        log.image("samples", sample_path, step)


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable line of :func:`summarize`'s output."""
    if not metrics["images"]:
        return "no images"
    return (
        f"{metrics['images']} images: "
        f"restored PSNR {metrics['psnr_restored']:.2f} dB, SSIM {metrics['ssim_restored']:.3f}; "
        f"blurred input PSNR {metrics['psnr_blurred']:.2f} dB, SSIM {metrics['ssim_blurred']:.3f}"
    )
