"""What the loop measures: training statistics with skip counting, and throughput per interval."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from accelerate import Accelerator

from deblur.errors import Fault
from deblur.training.failures import every_rank
from deblur.training.feed import Feed
from deblur.training.gan import D_STATS, G_STATS, StepStats


class NonFiniteUpdates(Fault):
    """Too many updates in a row were skipped as non-finite: the run cannot go on (exit 1)."""


class Meter:
    """Training statistics and skip counters.

    Steps hand in their statistics as device tensors, not yet averaged over ranks (:meth:`add`
    only keeps them: no work per step). :meth:`read` is collective (every rank calls it at the same
    step): it sums the interval's statistics on the device, skipped updates left out, averages the
    sums over the ranks in one all-reduce, and moves them with the skip flags (the same on every
    rank) to the host in one transfer; then it counts skipped updates and stops the run after
    ``max_consecutive_skips`` in a row. The loop reads once per logging interval and before a
    checkpoint, so the host waits for the device only then.
    """

    def __init__(
        self, accelerator: Accelerator, max_consecutive_skips: int, skipped_total: int = 0, consecutive_skips: int = 0
    ) -> None:
        self.accelerator = accelerator
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_total = skipped_total
        self.consecutive_skips = consecutive_skips
        self._steps: list[StepStats] = []
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)  # updates summed, per kind ("d", "g")

    def add(self, stats: StepStats) -> None:
        self._steps.append(stats)

    def read(self, step: int) -> None:
        if not self._steps:
            return
        d, g = torch.cat([s.d for s in self._steps]), torch.cat([s.g for s in self._steps])
        steps, self._steps = len(self._steps), []
        kept = [torch.where(rows[:, :1] != 0, 0.0, rows[:, 1:]).sum(0) for rows in (d, g)]
        means = self.accelerator.reduce(torch.cat(kept), reduction="mean")  # the interval's one collective
        flags = torch.cat([d[:, :1], g[:, 0].view(steps, -1)], 1).flatten()  # update order: D, G, G, ...
        host = torch.cat([means, flags]).cpu().tolist()
        names, skipped = D_STATS + G_STATS, host[len(D_STATS) + len(G_STATS) :]
        for name, value in zip(names, host):
            self._sums[name] += value
        updates_per_step = len(skipped) // steps
        for i, flag in enumerate(skipped):
            kind = "d" if i % updates_per_step == 0 else "g"
            if not flag:
                self._counts[kind] += 1
                self.consecutive_skips = 0
                continue
            self.skipped_total += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise every_rank(  # every rank reads the same flags, so every rank stops here
                    NonFiniteUpdates(
                        f"by step {step}: {self.consecutive_skips} updates in a row had a non-finite loss or gradients "
                        f"(train.max_consecutive_skips={self.max_consecutive_skips}). "
                        "Lower the learning rates or use bf16 instead of fp16."
                    )
                )

    def counters(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips}

    def load_counters(self, counters: dict[str, int]) -> None:
        """Restore :meth:`counters` (from a checkpoint's trainer.json)."""
        self.skipped_total, self.consecutive_skips = counters["skipped_total"], counters["consecutive_skips"]

    def summary(self) -> dict[str, float]:
        """Means over the updates (and ranks) read since the last summary, skipped updates left
        out, plus the skip counters."""
        scalars = {
            name: self._sums[name] / self._counts[kind]
            for kind, names in (("d", D_STATS), ("g", G_STATS))
            if self._counts[kind]
            for name in names
        }
        self._sums.clear()
        self._counts.clear()
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
    meter: Meter, lrs: dict[str, float], feed: Feed, accelerator: Accelerator, images: int, elapsed: float
) -> dict[str, float]:
    """Everything logged every ``train.log_every`` steps; ``lrs``: the learning rates of the
    interval's last step (TrainState.lrs); ``images`` were consumed by this rank in ``elapsed``
    seconds of training (validation and checkpoints not counted)."""
    per_process = images / elapsed
    scalars = {
        **meter.summary(),
        **{f"lr/{name}": lr for name, lr in lrs.items()},
        "perf/images_per_s": per_process * accelerator.num_processes,
        "perf/images_per_s_per_process": per_process,
        "perf/data_wait_fraction": min(1.0, feed.wait / elapsed),
    }
    if accelerator.device.type == "cuda":
        scalars["perf/gpu_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return scalars
