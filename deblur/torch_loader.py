"""``backend="torch"``: webdataset + a torch DataLoader, the reference for the DALI backend.

Same epoch definition as deblur.data (rank's contiguous part of the stored order, buffer
shuffle, N//W//B full batches or, with drop_last=False, the whole part with a smaller last
batch, one flip per pair). Its order is a pure function of ``(seed, rank, epoch)``, which gives
both multi-worker loading and resuming:

* every DataLoader worker streams the rank's whole part in the same order (reading tar bytes is
  cheap) but decodes only the batches ``b`` with ``b % workers == worker``; the DataLoader
  collects workers round-robin, so batches arrive in order ``0, 1, 2, ...``;
* resuming at batch ``k`` re-derives the epoch's order and skips the first ``k`` batches
  without decoding them.

Workers send uint8 images; conversion to float and normalization happen on the target device.
"""

from __future__ import annotations

import io
import os
import random
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from deblur.data import MEMBERS, PairOptions, Position, RankPart, ShardError, derived_seed
from deblur.norm import normalize

SHUFFLE_BUFFER = 1024  # as the DALI reader's initial_fill


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream with a buffer of ``size`` items (webdataset/DALI-style local shuffle)."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def decode_member(data: bytes, image_size: int, where: str) -> np.ndarray:
    """JPEG bytes -> (S, S, 3) uint8, resized with PIL's antialiased bilinear (triangle) filter."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # No draft() (DCT-domain downscale): ~1.6x faster, but it moves this reference
            # backend away from DALI's full decode (3-4% of values off by > 0.05 instead of 0.2%).
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb.resize((image_size, image_size), Image.BILINEAR))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ShardError(f"cannot decode {where}: {error}") from error


class PairStream(IterableDataset):
    """One epoch of one rank's uint8 ``(blurred, sharp)`` batches, from batch ``start_batch``."""

    def __init__(self, part: RankPart, pairs: PairOptions, *, epoch: int, start_batch: int):
        self.part = part
        self.pairs = pairs
        self.epoch = epoch
        self.start_batch = start_batch

    def stored_samples(self) -> Iterator[tuple[str, dict]]:
        """The rank's contiguous part, in stored order, as (shard path, webdataset sample)."""
        first = 0
        for shard in self.part.shards:
            last, first_here = first + shard.samples, first
            first = last
            if last <= self.part.start or first_here >= self.part.stop:
                continue
            skip = max(0, self.part.start - first_here)
            take = min(last, self.part.stop) - first_here - skip
            # The rank split is done above at sample level, so no node/worker splitting here.
            samples = wds.WebDataset([str(shard.tar)], shardshuffle=False, nodesplitter=None,
                                     workersplitter=None, empty_check=False).slice(skip, skip + take)
            count = 0
            try:
                for sample in samples:
                    count += 1
                    yield str(shard.tar), sample
            except ShardError:
                raise
            except Exception as error:  # tarfile/webdataset errors: name the shard
                raise ShardError(f"cannot read shard {shard.tar}: {error!r}") from error
            if count != take:
                raise ShardError(f"shard {shard.tar} yielded {count} samples, its index promises {take}")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch_size, n_batches = self.part.batch_size, self.part.batches_per_epoch
        samples = self.stored_samples()
        if self.pairs.shuffle:
            rng = random.Random(derived_seed(self.pairs.seed, self.part.rank, self.epoch))
            samples = buffer_shuffle(samples, SHUFFLE_BUFFER, rng)
        pending = []
        try:
            for position, sample in enumerate(samples):
                batch = position // batch_size
                if batch >= n_batches:
                    break
                if batch >= self.start_batch and (batch - self.start_batch) % workers == worker:
                    pending.append(sample)
                    if len(pending) == self.part.batch_length(batch):
                        yield self.decode_batch(pending, batch)
                        pending = []
        except ShardError as error:
            # Sent as data, not raised: a worker that raised was only stopped by the DataLoader's
            # finalizer after a 5 s join timeout; the main process raises it instead (and the
            # message, naming the shard, stays short).
            yield error

    def decode_batch(self, samples: list[tuple[str, dict]], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = []
        for shard, sample in samples:
            members = []
            for ext in MEMBERS:
                where = f"shard {shard} member {sample['__key__']}.{ext}"
                if ext not in sample:
                    raise ShardError(f"missing {where}")
                members.append(decode_member(sample[ext], self.pairs.image_size, where))
            pairs.append(members)
        # (B, 2, S, S, 3) -> (B, 2, 3, S, S)
        images = torch.from_numpy(np.stack([np.stack(p) for p in pairs])).permute(0, 1, 4, 2, 3)
        if self.pairs.flip:
            coins = torch.Generator().manual_seed(derived_seed(self.pairs.seed, self.part.rank, self.epoch, batch))
            mirror = torch.rand(len(samples), generator=coins) < 0.5  # one coin per pair
            images[mirror] = images[mirror].flip(-1)
        return images[:, 0].contiguous(), images[:, 1].contiguous()


def leave_launcher_process_group(worker_id: int) -> None:
    """DataLoader worker init: take the worker out of the rank's process group.

    ``accelerate launch`` forwards SIGTERM to each rank's whole process group (and a terminal's
    Ctrl-C reaches its foreground group); a worker killed by it would crash the rank before the
    trainer's save-on-signal can run. In a session of its own the worker gets neither, while the
    signals aimed at it alone still work: the DataLoader's and multiprocessing's shutdown
    ``terminate()`` it (ignoring SIGTERM instead would make that shutdown wait forever for a
    loader left mid-epoch at exit), and it exits by itself when its parent dies.
    """
    os.setsid()


class TorchPairLoader(Position):
    backend = "torch"

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(self.device, non_blocking=True).float().div_(255))

    def __iter__(self):
        if len(self) == 0:  # an empty part (drop_last=False, fewer samples than ranks)
            self.epoch += 1
            return
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        stream = PairStream(self.part, self.pairs, epoch=self.epoch, start_batch=self.batch)
        batches = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                             pin_memory=self.device.type == "cuda",
                             prefetch_factor=4 if self.num_workers else None,
                             worker_init_fn=leave_launcher_process_group)
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
