"""``backend="torch"``: a torch DataLoader over the shards' indexes, the reference for DALI.

Same epoch definition as deblur.loading.contract (rank's contiguous part of the stored order, buffer
shuffle, N//W//B full batches or, with drop_last=False, the whole part with a smaller last
batch, one flip per pair). Its order is a pure function of ``(seed, rank, epoch)``, which gives
both multi-worker loading and resuming:

* every DataLoader worker derives the rank's whole order from the ``.idx`` files (no bytes
  read) but reads and decodes only the batches ``b`` with ``b % workers == worker``; the
  DataLoader collects workers round-robin, so batches arrive in order ``0, 1, 2, ...``;
* resuming at batch ``k`` re-derives the epoch's order and skips the first ``k`` batches
  without reading them.

Members are read at their index offsets, as DALI reads them: streaming the tars through
webdataset made every worker parse every tar header of the part (with 16 workers, 16 times),
which cost more than the decoding. Workers fill one HWC batch per member and send it permuted
to (B, 3, S, S): channels_last strides without a copy, the layout the models run in. For a GPU
they send uint8 and the GPU converts and normalizes; for the CPU they normalize themselves
(see PairStream). Either way the layout is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from deblur.loading.contract import (
    PairOptions,
    Position,
    RankPart,
    ShardFile,
    derived_seed,
    epoch_order,
    pair_window,
    read_pair,
)
from deblur.loading.decode import decode_crop, decode_resized
from deblur.norm import normalize
from deblur.shard.format import PAIR_MEMBERS, SHARP, ShardError


class PairStream(IterableDataset):
    """One epoch of one rank's uint8 ``(blurred, sharp)`` batches, from batch ``start_batch``."""

    def __init__(self, part: RankPart, pairs: PairOptions, *, epoch: int, start_batch: int, normalize: bool = False):
        self.part = part
        self.pairs = pairs
        self.epoch = epoch
        self.start_batch = start_batch
        # For a CPU target: normalize in the worker (one thread, in parallel with the other
        # batches) rather than in the trainer's process, whose intra-op thread pool made this
        # small elementwise pass 10x dearer on busy cores (6.4 vs 0.6 ms per 64-pair member).
        # For a GPU, uint8 crosses the bus (4x fewer bytes) and the GPU converts it.
        self.normalize = normalize

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch_size, n_batches = self.part.batch_size, self.part.batches_per_epoch
        samples = epoch_order(self.part, self.pairs, self.epoch)
        pending = []
        with contextlib.ExitStack() as files:
            tars: dict[ShardFile, io.BufferedReader] = {}
            try:
                for position, sample in enumerate(samples):
                    batch = position // batch_size
                    if batch >= n_batches:
                        break
                    if batch >= self.start_batch and (batch - self.start_batch) % workers == worker:
                        pending.append(sample)
                        if len(pending) == self.part.batch_length(batch):
                            yield self.decode_batch(pending, batch, tars, files)
                            pending = []
            except ShardError as error:
                # Sent as data, not raised: a worker that raised was only stopped by the
                # DataLoader's finalizer after a 5 s join timeout; the main process raises it
                # instead (and the message, naming the shard, stays short).
                yield error

    def decode_batch(
        self, samples: list[tuple[ShardFile, dict]], batch: int, tars: dict, files: contextlib.ExitStack
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(blurred, sharp) (B, 3, S, S) with channels_last strides: uint8, or normalized float32
        with ``normalize``.

        Each image is resized straight into its slot of one (member, B, S, S, 3) tensor,
        mirrored on the way in: no stacking, transposing or flipping pass over the batch.
        """
        size = self.pairs.image_size
        out = torch.empty((len(PAIR_MEMBERS), len(samples), size, size, 3), dtype=torch.uint8)
        mirror = [False] * len(samples)
        if self.pairs.flip and not self.pairs.crop:  # crop mode: each window carries its coin
            coins = torch.Generator().manual_seed(derived_seed(self.pairs.seed, self.part.rank, self.epoch, batch))
            mirror = (torch.rand(len(samples), generator=coins) < 0.5).tolist()  # one coin per pair
        for i, (shard, row) in enumerate(samples):
            members, where = read_pair(tars, files, shard, row)
            if self.pairs.crop:
                window = pair_window(self.pairs, self.epoch, row, members[SHARP], where[SHARP])
                mirror[i] = window.mirror
            for m, ext in enumerate(PAIR_MEMBERS):
                if self.pairs.crop:
                    image = decode_crop(members[ext], window.x, window.y, size, where[ext])
                else:
                    image = decode_resized(members[ext], size, where[ext])
                out[m, i] = (image.flip(-1) if mirror[i] else image).permute(1, 2, 0)
        images = out.permute(0, 1, 4, 2, 3)  # (2, B, 3, S, S), channels_last
        if self.normalize:
            images = normalize(images, max_value=255)  # keeps the layout
        return images[0], images[1]


def shield_worker(worker_id: int) -> None:
    """DataLoader worker init: leave the stop signals to the trainer.

    Signals meant for the trainer reach its workers too: ``accelerate launch`` forwards SIGTERM
    to each rank's whole process group, a terminal's Ctrl-C reaches its foreground group, and
    Slurm signals every process of a job step (SIGTERM on preemption or ``scancel``, the SIGUSR1
    of launch/slurm.sbatch before the time limit). A worker killed by one crashes the rank before
    the trainer's save-on-signal can run. So the worker

    - starts a session of its own (out of the launcher's and the terminal's process groups);
    - ignores SIGINT and SIGUSR1;
    - ends on SIGTERM only when its parent sent it: the DataLoader's and multiprocessing's
      shutdown ``terminate()`` their workers, which must keep working (ignoring SIGTERM outright
      would make that shutdown wait forever for a loader left mid-epoch at exit). torch's own
      worker handler exits quietly on its parent's SIGTERM but dies on anyone else's; here
      SIGTERM is blocked and a thread reads each one with its sender (``sigwaitinfo``).

    It still exits by itself when its parent dies (torch's worker watchdog).
    """
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    # Blocked before any other thread starts, so every thread of the worker inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def exit_on_parents_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=exit_on_parents_sigterm, daemon=True, name="parent-sigterm").start()


class TorchPairLoader(Position):
    backend = "torch"

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        # memory_format: a no-op for the workers' channels_last batches, kept explicit so pinning
        # can never hand the models another layout.
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        if images.is_floating_point():  # normalized by the worker (CPU target)
            return images
        return normalize(images, max_value=255)

    def __iter__(self):
        if len(self) == 0:  # an empty part (drop_last=False, fewer samples than ranks)
            self.epoch += 1
            return
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        stream = PairStream(
            self.part, self.pairs, epoch=self.epoch, start_batch=self.batch, normalize=self.device.type == "cpu"
        )
        batches = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=shield_worker,
        )
        for item in batches:
            if isinstance(item, ShardError):
                raise ShardError(*item.args)
            blurred, sharp = item
            self.batch += 1
            yield self._to_model(blurred), self._to_model(sharp)
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return self.position()

    def load_state_dict(self, state: dict) -> None:
        self.restore_position(state)
