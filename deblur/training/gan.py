"""One GAN step: one discriminator update, then ``g_updates_per_step`` generator updates.

Each update consumes its own fresh (blurred, sharp) batch from the loader, so one step reads
``1 + g_updates_per_step`` batches per process:

- D update: restored = G(blurred) without gradients; D sees ONE batch ``cat([sharp, restored])``
  and is trained with BCE-with-logits towards 1 for sharp and 0 for restored.
- G update: restored = G(blurred) with gradients; loss = ssim_weight * (1 - SSIM(restored, sharp))
  + adv_weight * BCE(D(restored), 1) + l1_weight * mean|restored - sharp| (the L1 term is ours,
  see LossConfig; l1_weight=0 is the paper's loss). SSIM and L1 are measured on images mapped back
  to [0, 1] (each image once), in float32; SSIM is deblur.metrics' (pytorch-msssim, data_range=1).
  D again sees ``cat([sharp, restored])`` and only the restored half's logits enter the loss.

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

Nothing in a step waits for the device or talks to the other ranks beyond DDP's gradient
all-reduce (tests/test_host_transfers.py keeps it so):
- Non-finite updates are skipped on the device: an update is skipped when the gradients DDP
  averaged are not finite (their norm is computed anyway, for clipping and the log). They are the
  same on every rank, so every rank skips the same updates without a collective of its own, and
  a non-finite loss on any rank counts too: it is multiplied into the backward (``loss *
  gate``, the gate 1 or NaN) so that its gradients, and so the average, are NaN. The verdict is
  fused Adam's ``found_inf`` flag, which makes the kernel leave weights and Adam state untouched;
  under fp16 the grad scaler computes the same verdict from the same gradients (and backs off).
- Statistics stay on the device, per rank, and :class:`deblur.training.meter.Meter` averages
  them over ranks once per logging interval.
- Constants (normalization, the SSIM window) are made once per device (deblur.norm,
  deblur.metrics), before anything compiled can trace them.

Autocast: Accelerate's ``prepare`` runs each model's forward under autocast and returns float32,
so the losses run outside it, in float32.

Compilation: ``compile_mode`` (``train.compile_scope: update``) compiles each update's forward
passes and losses as one function, so inductor fuses the loss's many small kernels with the
models' last layers; backward is compiled with it, the gradient norm and the fused optimizer
step stay eager. A DDP-wrapped model is a graph break (DDP's forward runs eagerly and its module
is compiled on its own, split at bucket boundaries by torch's DDPOptimizer), so under DDP the
losses and the frozen critic still form one graph. ``reduce-overhead`` (CUDA graphs) marks a new
step before every update and copies the graphs' outputs out at once, as CUDA-graph trees require.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from deblur import metrics, norm
from deblur.norm import denormalize
from deblur.training.config import LossConfig, OptimConfig
from deblur.training.ema import Ema


def restoration_losses(restored: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - mean SSIM, mean absolute error) of normalized-space images, both measured on [0, 1]
    images in float32; each image is mapped back to [0, 1] once."""
    restored01, sharp01 = denormalize(restored.float()), denormalize(sharp.float())
    return 1 - metrics.ssim(restored01, sharp01).mean(), (restored01 - sharp01).abs().mean()


def bce_towards(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BCE-with-logits of every logit towards the 'real' (1) or 'restored' (0) label, in float32."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


D_STATS = ("d/loss", "d/prob_real", "d/prob_restored", "d/grad_norm")
G_STATS = ("g/loss", "g/ssim_loss", "g/adv_loss", "g/l1_loss", "g/grad_norm")

# A per-G-update hook: (the unwrapped generator, the update's skip flag: a 0-dim float32 device
# tensor, 1 = skipped). Called after the optimizer step, e.g. for an EMA of the weights. It must
# stay on the device: no .item(), no Python branch on a tensor, no tensor built from host data.
UpdateHook = Callable[[nn.Module, torch.Tensor], None]


@dataclass(frozen=True)
class StepStats:
    """One step's statistics, still on the device and not yet averaged over ranks: one row per
    update, its skip flag (1 = skipped; the same on every rank) followed by D_STATS or G_STATS.
    :class:`deblur.training.meter.Meter` collects them and reads a whole interval at once."""

    d: torch.Tensor  # (1, 1 + len(D_STATS)), float32
    g: torch.Tensor  # (g_updates_per_step, 1 + len(G_STATS)), float32


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
    kernel can skip an update on a device-side flag.

    ``compile_mode``: None (eager updates; the models may be compiled on their own) or a
    torch.compile mode ("default", "max-autotune-no-cudagraphs", "reduce-overhead") for each
    update's forward passes and losses. ``g_update_hooks`` run after every G update (UpdateHook).
    ``ema``: the EMA of G (deblur.training.ema) that :func:`deblur.training.setup.build_models`
    attaches with its update among the hooks; None when ``train.ema_decay`` is 0.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        loss: LossConfig,
        optim: OptimConfig,
        compile_mode: str | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.generator = generator
        self.discriminator = discriminator
        self.critic = accelerator.unwrap_model(discriminator)  # D as G's loss sees it (module doc)
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.loss = loss
        self.optim = optim
        self.g_update_hooks: list[UpdateHook] = []
        self.ema: Ema | None = None
        # The constants the losses use, made now so that no update builds them (and nothing
        # compiled traces their creation).
        norm.constants(accelerator.device)
        metrics.ssim_window(accelerator.device)
        self.compile_mode = compile_mode
        self._d_forward, self._g_forward = self.d_forward, self.g_forward
        if compile_mode is not None:
            self._d_forward = torch.compile(self.d_forward, mode=compile_mode)
            self._g_forward = torch.compile(self.g_forward, mode=compile_mode)

    def step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """One GAN step: a D update, then ``g_updates_per_step`` G updates, each on
        ``next(batches)``. Nothing in it waits for the device."""
        d = self.d_update(*next(batches))
        g = [self.g_update(*next(batches)) for _ in range(self.loss.g_updates_per_step)]
        return StepStats(d.unsqueeze(0), torch.stack(g))

    def d_forward(self, blurred: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's loss and its statistics (without the gradient norm)."""
        n = sharp.shape[0]
        with torch.no_grad():
            restored = self.generator(blurred)
        logits = self.discriminator(torch.cat([sharp, restored.to(sharp.dtype)])).float()
        real_logits, fake_logits = logits[:n], logits[n:]
        # Mean of the two halves' BCE: real towards 1, restored towards 0.
        loss = 0.5 * (bce_towards(real_logits, real=True) + bce_towards(fake_logits, real=False))
        stats = torch.stack([loss, torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean()])
        return loss, stats.detach()

    def g_forward(self, blurred: torch.Tensor, sharp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G's loss and its statistics (without the gradient norm); D must be frozen."""
        n = sharp.shape[0]
        restored = self.generator(blurred)
        fake_logits = self.critic(torch.cat([sharp, restored.to(sharp.dtype)]))[n:].float()
        ssim_term, l1_term = restoration_losses(restored, sharp)
        adv_term = bce_towards(fake_logits, real=True)
        loss = self.loss.ssim_weight * ssim_term + self.loss.adv_weight * adv_term + self.loss.l1_weight * l1_term
        return loss, torch.stack([loss, ssim_term, adv_term, l1_term]).detach()

    def d_update(self, blurred: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
        """One D update; returns its statistics row (skip flag, D_STATS) on the device."""
        self._new_graph_step()
        loss, stats = self._d_forward(blurred, sharp)
        return self._apply(loss, stats, self.d_optimizer)[0]

    def g_update(self, blurred: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
        """One G update; returns its statistics row (skip flag, G_STATS) on the device."""
        self._new_graph_step()
        # The graph is built while D is frozen, so backward computes no D weight gradients.
        with frozen(self.critic):
            loss, stats = self._g_forward(blurred, sharp)
        row, found_inf = self._apply(loss, stats, self.g_optimizer)
        if self.g_update_hooks:
            generator = self.accelerator.unwrap_model(self.generator)
            for hook in self.g_update_hooks:
                hook(generator, found_inf)
        return row

    def _new_graph_step(self) -> None:
        # CUDA-graph trees (reduce-overhead) reuse their output memory at every replay; marking
        # each update as a new step says the previous update's outputs are no longer read.
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _apply(
        self, loss: torch.Tensor, stats: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward and optimizer step, skipped on the device when the update is not finite (see
        the module doc). Returns (the statistics row: skip flag, ``stats``, gradient norm; the
        skip flag as fused Adam's ``found_inf``)."""
        # 1, or NaN when the loss is not finite: x * 1 leaves every gradient exact, x * NaN makes
        # all of them NaN, on this rank and, through DDP's average, on every rank.
        gate = 1 + 0 * loss.detach()
        self.accelerator.backward(loss * gate)
        self.accelerator.unscale_gradients(optimizer=optimizer)  # fp16: true gradients (else a no-op)
        inner = _torch_optimizer(optimizer)
        params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.optim.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.optim.grad_clip, grad_norm)
        found_inf = (~torch.isfinite(grad_norm)).float()
        inner.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            inner.__dict__.pop("found_inf", None)
        optimizer.zero_grad(set_to_none=True)
        return torch.cat([found_inf.reshape(1), stats.float(), grad_norm.reshape(1).float()]), found_inf


def make_optimizer(model: nn.Module, lr: float, optim: OptimConfig) -> torch.optim.Adam:
    """Adam with the fused kernel (CUDA and CPU alike): one kernel for all parameters, and it
    takes the skip flag on the device. Its state dict is the same as the other implementations',
    so checkpoints load either way."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(optim.beta1, optim.beta2), fused=True)
