"""Sample grids a person can read: one labelled row per kind of image, enlarged."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.utils import make_grid

from deblur.norm import denormalize

LABEL_WIDTH = 190
PADDING = 4


def labelled_grid(rows: dict[str, torch.Tensor], scale: int = 3) -> Image.Image:
    """One row per entry (label -> (N, 3, H, W) images in [0, 1], N the same for all), each
    image enlarged ``scale`` times with nearest-neighbour (pixels stay visible as pixels), the
    label written left of its row."""
    images = torch.cat(list(rows.values()))
    columns = next(iter(rows.values())).shape[0]
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=columns, padding=PADDING, pad_value=1.0)
    pixels = grid.mul(255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    canvas = Image.new("RGB", (LABEL_WIDTH + picture.width, picture.height), "white")
    canvas.paste(picture, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=20)
    row_height = images.shape[-2] + PADDING
    for i, label in enumerate(rows):
        draw.text((8, PADDING + i * row_height + row_height // 2), label, fill="black", font=font, anchor="lm")
    return canvas


@torch.no_grad()
def save_samples(accelerator: Accelerator, generators: dict[str, nn.Module], batch, count: int, path: Path) -> None:
    """The sample grid: rows blurred | restored by each of ``generators`` (label -> unwrapped
    module) | sharp, labelled, each image enlarged 3x."""
    blurred, sharp = (t[:count] for t in batch)
    # Unwrapped: this runs on the main process only, and a DDP forward on one rank alone must
    # never be in a position to wait for the others.
    with accelerator.autocast():
        restored = {f"restored ({label})": generator(blurred) for label, generator in generators.items()}
    images = {"blurred (input)": blurred, **restored, "sharp (target)": sharp}
    rows = {name: denormalize(t.float()).clamp(0, 1).cpu() for name, t in images.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, scale=3).save(path)
