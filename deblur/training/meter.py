"""What the loop measures: training statistics with skip counting, and throughput per interval."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from accelerate import Accelerator

from deblur.training.feed import Feed
from deblur.training.gan import GanStep, StepStats


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


class Throughput:
    """Images per second over one logging interval, leaving out the time spent in
    :meth:`paused` blocks (validation, checkpoints)."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.paused_s = time.perf_counter(), 0, 0.0

    def step(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - start

    def interval(self) -> tuple[int, float]:
        """(images this rank consumed, seconds of training) since the last restart."""
        return self.steps * self.images_per_step, time.perf_counter() - self.start - self.paused_s


def interval_scalars(
    gan: GanStep, meter: Meter, feed: Feed, accelerator: Accelerator, images: int, elapsed: float
) -> dict[str, float]:
    """Everything logged every ``train.log_every`` steps; ``images`` were consumed by this rank
    in ``elapsed`` seconds of training (validation and checkpoints not counted)."""
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
