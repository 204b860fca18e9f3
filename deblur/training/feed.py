"""The training batches: endless across epochs, timed, and optionally recorded."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch


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
                "the training loader yields no batches: "
                "too few training samples for this batch size and number of processes"
            )


def record_batch(path: Path, step: int, update: int, epoch: int, sharp: torch.Tensor) -> None:
    """Diagnostic (train.record_batches): hashes of the images this rank consumed."""
    hashes = [hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest()[:16] for img in sharp]
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "update": update, "epoch": epoch, "sharp": hashes}) + "\n")
