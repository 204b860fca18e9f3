"""One GAN step: one discriminator update, then ``g_updates_per_step`` generator updates.

Each update consumes its own fresh (blurred, sharp) batch from the loader, so one step reads
``1 + g_updates_per_step`` batches per process:

- D update: restored = G(blurred) without gradients; D sees ONE batch ``cat([sharp, restored])``
  and is trained with BCE-with-logits towards 1 for sharp and 0 for restored.
- G update: restored = G(blurred) with gradients; loss = ssim_weight * (1 - SSIM(restored, sharp))
  + adv_weight * BCE(D(restored), 1) + l1_weight * mean|restored - sharp| (the L1 term is ours,
  see LossConfig; l1_weight=0 is the paper's loss). SSIM is pytorch-msssim's on images mapped back to [0, 1],
  in float32, data_range=1. D again sees ``cat([sharp, restored])`` and only the restored half's
  logits enter the loss.

Why one concatenated D forward (in both updates):
- BatchNorm: D's batch statistics are always those of a half-real, half-restored batch, so D
  normalizes restored images the same way when it is trained and when it grades G.
- DDP: a BatchNorm module wrapped in DDP and called twice before one backward fails on CUDA
  with an in-place modification error (DDP re-broadcasts the BN buffers at each forward; CPU
  does not catch it). One forward per backward cannot hit it. The trainer also wraps both
  models without the per-forward buffer broadcast (``forward_sync_buffers=False``, formerly
  ``broadcast_buffers=False``; deblur/training/setup.py): D's running statistics are never used (D always runs
  in training mode), so there is nothing worth broadcasting.
- One forward and one gradient all-reduce per D update instead of two.

Why D is called unwrapped and frozen in the G update: G's loss needs gradients *through* D but
not *for* D's weights. Calling the DDP wrapper would all-reduce D gradients nobody uses, and
toggling requires_grad on a DDP-wrapped module's parameters between its own forward and backward
confuses DDP's reducer. Calling ``accelerator.unwrap_model(D)`` with requires_grad off skips
both: no D weight gradients are computed, no DDP hooks fire, and only G's optimizer steps.

Non-finite losses: every update all-reduces its loss (and the logged statistics) before its
optimizer step. The mean is non-finite on every rank as soon as it is on one, so all ranks skip
the same update together. The skip happens on the device (fused Adam's ``found_inf`` flag), so
no update waits for the host to look at its loss; the trainer reads the statistics, skip flags
included, a whole logging interval at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pytorch_msssim import ssim
from torch import nn

from deblur.norm import denormalize
from deblur.training.config import LossConfig, OptimConfig


def ssim_loss(restored: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
    """1 - mean SSIM of normalized-space images, measured on [0, 1] images in float32."""
    return 1 - ssim(denormalize(restored.float()), denormalize(sharp.float()), data_range=1.0, size_average=True)


def l1_loss(restored: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of normalized-space images, measured on [0, 1] images in float32."""
    return (denormalize(restored.float()) - denormalize(sharp.float())).abs().mean()


def bce_towards(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BCE-with-logits of every logit towards the 'real' (1) or 'restored' (0) label, in float32."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


D_STATS = ("d/loss", "d/prob_real", "d/prob_restored")
G_STATS = ("g/loss", "g/ssim_loss", "g/adv_loss", "g/l1_loss")


@dataclass(frozen=True)
class UpdateResult:
    """Rank-averaged statistics of one update, on the host; ``skipped`` when its loss was
    non-finite on any rank."""

    kind: str  # "d" or "g"
    skipped: bool
    stats: dict[str, float]


@dataclass(frozen=True)
class StepStats:
    """One or more steps' statistics, still on the device: for each update, a flag (1 = skipped)
    followed by its D_STATS or G_STATS. Reading them costs one host transfer, so the trainer
    gathers many steps (:meth:`concat`) before it :meth:`read`-s them."""

    values: torch.Tensor  # 1-D, float32
    kinds: tuple[str, ...]  # "d" / "g" per update, in order

    @staticmethod
    def concat(parts: list[StepStats]) -> StepStats:
        return StepStats(torch.cat([p.values for p in parts]), tuple(k for p in parts for k in p.kinds))

    def read(self) -> list[UpdateResult]:
        host = self.values.cpu().tolist()
        results, at = [], 0
        for kind in self.kinds:
            names = D_STATS if kind == "d" else G_STATS
            row = host[at : at + 1 + len(names)]
            at += 1 + len(names)
            results.append(UpdateResult(kind, row[0] != 0, dict(zip(names, row[1:]))))
        return results


@contextmanager
def frozen(module: nn.Module):
    """Turn off gradients for ``module``'s weights (inputs still get gradients through it)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's AcceleratedOptimizer wrapper (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class GanStep:
    """The update rules and their schedule. Models and optimizers must already be
    ``accelerator.prepare``-d; the optimizers must be fused Adam (:func:`make_optimizer`), whose
    kernel can skip an update on a device-side flag."""

    def __init__(
        self,
        accelerator: Accelerator,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        loss: LossConfig,
        optim: OptimConfig,
    ) -> None:
        self.accelerator = accelerator
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.loss = loss
        self.optim = optim

    def step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """One GAN step: a D update, then ``g_updates_per_step`` G updates, each on
        ``next(batches)``. Nothing in it waits for the device."""
        parts = [self.d_update(*next(batches))]
        parts += [self.g_update(*next(batches)) for _ in range(self.loss.g_updates_per_step)]
        return StepStats.concat(parts)

    def _agree(self, stats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce (mean) the update's statistics, loss first. Returns (the statistics with a
        leading skip flag, the flag as fused Adam's ``found_inf``): non-finite on any rank makes
        the mean non-finite on every rank, so all of them skip together."""
        values = self.accelerator.reduce(torch.stack([v.detach().float().reshape(()) for v in stats]), reduction="mean")
        found_inf = (~torch.isfinite(values[0])).float()
        return torch.cat([found_inf.reshape(1), values]), found_inf

    def _apply(
        self, loss: torch.Tensor, found_inf: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Backward and optimizer step; the fused kernel leaves weights and Adam state untouched
        (step count included) when ``found_inf`` is 1. Deciding on the device instead of with
        ``if loss.isfinite():`` spares a host wait per update. Under fp16 the grad scaler sets
        ``found_inf`` itself from the gradients, which a non-finite loss makes non-finite too."""
        self.accelerator.backward(loss)
        if self.optim.grad_clip is not None:
            # Unscale (fp16) only this optimizer's gradients: accelerator.clip_grad_norm_ would
            # unscale every prepared optimizer, including the one that is not stepping now.
            self.accelerator.unscale_gradients(optimizer=optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.optim.grad_clip)
        inner = _torch_optimizer(optimizer)
        inner.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            inner.__dict__.pop("found_inf", None)
        optimizer.zero_grad(set_to_none=True)

    def d_update(self, blurred: torch.Tensor, sharp: torch.Tensor) -> StepStats:
        n = sharp.shape[0]
        with torch.no_grad(), self.accelerator.autocast():
            restored = self.generator(blurred)
        with self.accelerator.autocast():
            logits = self.discriminator(torch.cat([sharp, restored.to(sharp.dtype)])).float()
        real_logits, fake_logits = logits[:n], logits[n:]
        # Mean of the two halves' BCE: real towards 1, restored towards 0.
        loss = 0.5 * (bce_towards(real_logits, real=True) + bce_towards(fake_logits, real=False))
        values, found_inf = self._agree([loss, torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()])
        self._apply(loss, found_inf, self.discriminator, self.d_optimizer)
        return StepStats(values, ("d",))

    def g_update(self, blurred: torch.Tensor, sharp: torch.Tensor) -> StepStats:
        n = sharp.shape[0]
        critic = self.accelerator.unwrap_model(self.discriminator)
        # The graph is built while D is frozen, so backward computes no D weight gradients.
        with frozen(critic), self.accelerator.autocast():
            restored = self.generator(blurred)
            fake_logits = critic(torch.cat([sharp, restored.to(sharp.dtype)]))[n:].float()
        ssim_term = ssim_loss(restored, sharp)
        adv_term = bce_towards(fake_logits, real=True)
        l1_term = l1_loss(restored, sharp)
        loss = self.loss.ssim_weight * ssim_term + self.loss.adv_weight * adv_term + self.loss.l1_weight * l1_term
        values, found_inf = self._agree([loss, ssim_term, adv_term, l1_term])
        self._apply(loss, found_inf, self.generator, self.g_optimizer)
        return StepStats(values, ("g",))


def make_optimizer(model: nn.Module, lr: float, optim: OptimConfig) -> torch.optim.Adam:
    """Adam with the fused kernel (CUDA and CPU alike): one kernel for all parameters, and it
    takes the skip flag on the device. Its state dict is the same as the other implementations',
    so checkpoints load either way."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(optim.beta1, optim.beta2), fused=True)
