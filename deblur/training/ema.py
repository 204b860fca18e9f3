"""The exponential moving average (EMA) of the generator's weights: ``train.ema_decay``.

After every G update (it is one of :attr:`deblur.training.gan.GanStep.g_update_hooks`)::

    decay = min(ema_decay, (1 + n) / (10 + n))        n = the EMA updates made before this one
    ema   = decay * ema + (1 - decay) * weights

The warm-up (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, timm's ``ModelEmaV3``
with ``use_warmup``) makes the EMA an average over roughly the last tenth of the updates until
``ema_decay`` is reached (after ~9,000 updates for 0.999), so a run of a few hundred updates is
not stuck near its initial weights; BasicSR's plain 0.999 would still hold 64 % of the initial
weights after 450 updates.

The EMA is a second :class:`deblur.models.Generator`, kept in float32 (whatever the training
precision) on the training device, in G's memory format, never trained and never compiled
(validation runs it a few times per run). The update is one ``torch._foreach_lerp_`` with a
Python-float weight: no tensor from host data, no read of a device value, no collective. Every
rank keeps its own copy; DDP keeps G the same on every rank, so the copies stay identical
(the final replica check hashes them too). A skipped (non-finite) update leaves G unchanged and
the EMA still takes its step towards it, as the EMAs of timm and BasicSR do when a loss scaler
skips: it averages G's trajectory, standing still included.

Its state is the tensors (``ema.safetensors`` in every checkpoint, under the manifest) and the
update count (trainer.json); both are the same on every rank, so any number of processes resumes
it exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from deblur.models import Generator

WARMUP_OFFSET = 10  # decay(n) = (1 + n) / (WARMUP_OFFSET + n) until ema_decay


def ema_decay_at(updates: int, decay: float) -> float:
    """The decay of the EMA update that follows ``updates`` earlier ones."""
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class Ema:
    """The EMA of a generator. ``generator``: the unwrapped, not yet compiled training G (its
    architecture and current weights are copied)."""

    def __init__(self, generator: Generator, decay: float, updates: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = updates
        self.module = Generator(residual=generator.residual)
        self.module.requires_grad_(False).eval()
        self.module.to(device=next(generator.parameters()).device, dtype=torch.float32)
        if next(generator.parameters()).is_contiguous(memory_format=torch.channels_last):
            self.module.to(memory_format=torch.channels_last)
        self.copy_from(generator)

    def update(self, generator: nn.Module, skipped: torch.Tensor | None = None) -> None:
        """One EMA step towards ``generator``'s weights (an UpdateHook; ``skipped`` unused, see
        the module doc). Stays on the device."""
        weight = 1.0 - ema_decay_at(self.updates, self.decay)
        sources = [p.detach() for p in generator.parameters()]
        if sources[0].dtype != torch.float32:  # weights kept in a lower precision: average in fp32
            sources = [p.float() for p in sources]
        torch._foreach_lerp_(list(self.module.parameters()), sources, weight)
        buffers = list(self.module.buffers())
        if buffers:  # (the Generator has none; a model with BatchNorm would carry its statistics)
            torch._foreach_copy_(buffers, [b.detach() for b in generator.buffers()])
        self.updates += 1

    @torch.no_grad()
    def copy_from(self, generator: nn.Module) -> None:
        """Set the EMA to ``generator``'s weights (a fresh start, or weights from train.init_from)."""
        self.module.load_state_dict(generator.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA's tensors (float32), by the Generator's parameter names."""
        return self.module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(tensors)
        self.updates = updates
