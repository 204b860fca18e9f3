"""Fast in-process checks of the trainer's building blocks (the DDP runs are in test_train.py)."""

from __future__ import annotations

import pytest
import torch

from deblur.models import Discriminator
from deblur.norm import normalize
from deblur.training.checkpoint import complete_checkpoints, remove_partial_saves, step_dir_name
from deblur.training.gan import bce_towards, frozen, restoration_losses
from deblur.training.validation import summarize


def make_checkpoint(root, step):
    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "trainer.json").write_text("{}")
    return path


def newest(checkpoints):
    found = complete_checkpoints(checkpoints)
    return found[-1][1] if found else None


def test_newest_checkpoint_ignores_partial_saves_and_set_aside_ones(tmp_path):
    assert newest(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 100)
    latest = make_checkpoint(tmp_path, 200)
    (tmp_path / ".tmp-step-0000400").mkdir()  # a save that never finished
    (tmp_path / "corrupt-step-0000300").mkdir()  # set aside as damaged
    assert newest(tmp_path) == latest
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [100, 200]
    remove_partial_saves(tmp_path)
    assert not (tmp_path / ".tmp-step-0000400").exists() and latest.exists()
    assert (tmp_path / "corrupt-step-0000300").exists()


def test_step_dirs_sort_numerically_past_seven_digits(tmp_path):
    make_checkpoint(tmp_path, 9_999_999)
    big = make_checkpoint(tmp_path, 10_000_000)
    assert newest(tmp_path) == big


def test_restoration_losses_are_zero_for_identical_images_and_grow_with_blur():
    unit = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sharp = normalize(unit)
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, 1, 2, count_include_pad=False)
    assert all(term.item() < 1e-6 for term in restoration_losses(sharp, sharp))
    ssim_term, l1_term = restoration_losses(blurred, sharp)
    assert ssim_term.item() > 0.1
    # L1 is measured on [0, 1] images, not in normalized units
    expected = (torch.nn.functional.avg_pool2d(unit, 5, 1, 2, count_include_pad=False) - unit).abs().mean()
    assert l1_term.item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(t.dtype == torch.float32 for t in restoration_losses(sharp.half(), sharp))  # float32 whatever the input


def test_bce_towards_labels():
    logits = torch.tensor([10.0, -10.0])
    assert bce_towards(logits[:1], real=True) < 1e-3 and bce_towards(logits[1:], real=False) < 1e-3
    assert bce_towards(logits[:1], real=False) > 5


def test_frozen_blocks_weight_gradients_but_not_input_gradients():
    d = Discriminator()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with frozen(d):
        d(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())  # restored afterwards


def test_summarize_means_and_empty_split():
    sums = torch.tensor([60.0, 1.5, 45.0, 1.2, 3.0])
    assert summarize(sums) == pytest.approx(
        {"psnr_restored": 20.0, "ssim_restored": 0.5, "psnr_blurred": 15.0, "ssim_blurred": 0.4, "images": 3}
    )
    empty = summarize(torch.zeros(5))
    assert empty["images"] == 0 and empty["psnr_restored"] != empty["psnr_restored"]  # NaN
