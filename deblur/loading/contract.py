"""The loader contract: what ``make_loader``'s DALI and torch backends both yield.

Both backends follow one definition of what an epoch is, so that they are interchangeable and
a test can compare them:

* The split's samples, in **stored order**, are the shards in the order ``manifest.json`` lists
  them (by name: ``train-000000.tar``, ``train-000001.tar``, ...) and, inside each shard, the
  members in tar order (the order of the ``.idx`` lines). Call that list ``0 .. N-1``.
* Rank ``r`` of ``W`` owns the contiguous part ``[floor(N*r/W), floor(N*(r+1)/W))``: exactly
  how DALI's readers cut a dataset with ``shard_id``/``num_shards`` (its ``start_index``), and
  the ranks' parts are disjoint and cover every sample.
* Each rank reads only its part (``stick_to_shard``: the part does not rotate between epochs;
  the builder shuffled the samples globally, so every part is a random subset).
* ``drop_last=True`` (the default, for training): every rank yields
  ``len(loader) = (N // W) // batch_size`` full batches per epoch, the same number on every
  rank so DDP ranks never wait on each other. The remainder (fewer than a batch, plus the one
  extra sample a longer part may have) is dropped: **last-batch policy DROP**.
* ``drop_last=False`` (for evaluation): every rank yields its whole part, in
  ``len(loader) = ceil(part / batch_size)`` batches, the last one smaller when the part is not
  a multiple of the batch size: **last-batch policy PARTIAL**. Across ranks every sample is
  yielded exactly once per epoch, but ranks may differ by one batch (parts differ by up to one
  sample), and with fewer samples than ranks some ranks have an empty part and yield nothing:
  whatever runs per batch must not be a collective.
* ``shuffle=True``: the order inside the rank's part is shuffled with a buffer (DALI reader's
  ``initial_fill`` semantics; the torch backend does the same with a seeded buffer); it differs
  every epoch and is fully determined by ``(seed, rank, epoch)``.
* ``flip=True``: one coin per pair; the blurred and the sharp image are mirrored together.

``loader.state_dict()`` saves the position (epoch, batches consumed, and for DALI the pipeline's
own checkpoint); ``load_state_dict`` before iterating resumes with exactly the next batch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from deblur.shard.format import (
    MANIFEST,
    PAIR_MEMBERS,
    SPLITS,
    ShardError,
    index_path,
    index_rows,
    manifest_split,
    read_index,
)


@dataclass(frozen=True)
class ShardFile:
    tar: Path
    idx: Path
    samples: int


@dataclass(frozen=True)
class RankPart:
    """The split's shards in stored order and the contiguous sample range one rank owns."""

    shards: tuple[ShardFile, ...]
    rank: int
    world_size: int
    batch_size: int
    drop_last: bool = True

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def start(self) -> int:
        return self.total * self.rank // self.world_size

    @property
    def stop(self) -> int:
        return self.total * (self.rank + 1) // self.world_size

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            # The shortest part has N // W samples; every rank stops there (DROP policy).
            return (self.total // self.world_size) // self.batch_size
        return -(-self.size // self.batch_size)  # ceil: the whole part (PARTIAL policy)

    def batch_length(self, batch: int) -> int:
        """Samples in batch ``batch`` of an epoch: the batch size, except a PARTIAL last batch."""
        return min(self.batch_size, self.size - batch * self.batch_size)


@dataclass(frozen=True)
class PairOptions:
    """What each pair looks like and how an epoch is ordered (besides the rank layout)."""

    image_size: int
    seed: int
    shuffle: bool
    flip: bool


class Position:
    """A loader's settings, and its position: epoch and batches consumed in it.

    The base of both backends' loaders: restoring a position saved under different settings
    (another split, batch size, rank layout, seed, last-batch policy) would silently yield other
    batches, so it is refused, naming the differing keys.
    """

    backend = ""  # set by each backend's subclass

    def __init__(self, part: RankPart, pairs: PairOptions, *, device: torch.device, num_workers: int):
        self.part = part
        self.pairs = pairs
        self.device = device
        self.num_workers = num_workers
        self.epoch = 0
        self.batch = 0
        self.settings = {
            "backend": self.backend,
            "shards": [s.tar.name for s in part.shards],
            "samples": part.total,
            "rank": part.rank,
            "world_size": part.world_size,
            "batch_size": part.batch_size,
            "drop_last": part.drop_last,
            **asdict(pairs),
        }

    def __len__(self) -> int:
        return self.part.batches_per_epoch

    def position(self) -> dict:
        return {"settings": self.settings, "epoch": self.epoch, "batch": self.batch}

    def restore_position(self, state: dict) -> None:
        saved = state.get("settings", {})
        differing = sorted(k for k in self.settings.keys() | saved.keys() if saved.get(k) != self.settings.get(k))
        if differing:
            raise ValueError(
                f"loader state was saved with other settings: {differing} differ "
                f"(saved {[saved.get(k) for k in differing]}, "
                f"now {[self.settings.get(k) for k in differing]})"
            )
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"loader state batch {state['batch']} is outside an epoch of {len(self)} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class PairLoader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def read_members(shards: Iterable[ShardFile]) -> Iterator[tuple[ShardFile, str, bytes]]:
    """``(shard, member name, bytes)`` of every image member, in stored order, read at the
    offsets of the shard's index (the way DALI reads them, without parsing tar headers)."""
    for shard in shards:
        with shard.tar.open("rb") as tar:
            for members in index_rows(shard.idx):
                for ext in PAIR_MEMBERS:
                    offset, size, name = members[ext]
                    tar.seek(offset)
                    yield shard, name, tar.read(size)


def find_undecodable(part: RankPart) -> str | None:
    """Name the first shard member PIL cannot decode, or None: the diagnosis after a failure.

    DALI reports a failed decode without the file; this scan (only run on the error path)
    turns that into "shard X, member Y".
    """
    for shard, name, data in read_members(part.shards):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return f"shard {shard.tar} member {name} ({error})"
    return None


def find_shards(shards: Path | str, split: str) -> tuple[ShardFile, ...]:
    """The split's shard files as ``manifest.json`` lists them (stored order), each checked
    against its index."""
    root = Path(shards)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist")
    try:
        tars, _ = manifest_split(root, split)
    except ValueError as error:  # no manifest, or a shard it lists is missing
        raise ShardError(str(error)) from error
    if not tars:
        raise ShardError(f"no shards for split {split!r} in {root} ({MANIFEST} lists none)")
    found = tuple(ShardFile(tar, index_path(tar), read_index(tar)) for tar in tars)
    if sum(s.samples for s in found) == 0:
        raise ShardError(f"split {split!r} in {root} has shards but no samples: {[str(t) for t in tars]}")
    return found


def derived_seed(*values: int) -> int:
    """A well-mixed non-negative 31-bit seed from several integers (seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0] & 0x7FFFFFFF)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))
