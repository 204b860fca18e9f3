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
  every epoch. The torch backend's order is a pure function of ``(seed, rank, epoch)``; DALI's
  reader draws from one seeded generator that runs on across epochs, so its order is fixed by
  ``(seed, rank)`` and the epochs read before (the loader's state carries it over a resume).
* ``flip=True``: one coin per pair; the blurred and the sharp image are mirrored together.
* ``crop=False`` (the default, CelebA's): each member is resized whole to ``image_size``.
  ``crop=True`` (patch training, real blur): each pair yields an ``image_size`` crop at full
  stored resolution, at the same position in both members, where
  :func:`deblur.loading.crops.crop_window` puts it (random per epoch with ``shuffle``, fixed per
  sample without), mirrored by its coin. In this mode the order (:func:`epoch_order`), the
  windows and the mirrors are all pure Python functions the two backends share, so **both
  backends yield the same pairs in the same order, cut at the same windows, for the same
  seed**; resize mode keeps DALI's own reader and shuffle (docs/loading.md says why).

Before ``make_loader`` returns, every image member of the rank's part is checked with
:func:`deblur.shard.check.check_jpeg` (libjpeg without a warning): DALI's decoders turn a
corrupt member into garbage pixels with nothing but an anonymous libjpeg warning, so both
backends refuse such a member the same way, up front, naming the shard and the member. With
``crop=True`` each pair's members must also be the same size and at least the crop.

``loader.state_dict()`` saves the position (epoch, batches consumed, and for DALI the pipeline's
own checkpoint); ``load_state_dict`` before iterating resumes with exactly the next batch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from deblur.loading.crops import Window, crop_window, jpeg_size
from deblur.shard.check import check_jpeg, check_members
from deblur.shard.format import (
    MANIFEST,
    PAIR_MEMBERS,
    SHARP,
    ShardError,
    ShardFile,
    index_rows,
    read_member,
    split_name,
    split_shards,
)


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

    def rows(self) -> Iterator[tuple[ShardFile, dict]]:
        """The rank's contiguous part, in stored order, as (shard, its index row).

        The rows come from the ``.idx`` files that ``find_shards`` checked against the tars."""
        first = 0
        for shard in self.shards:
            last, first_here = first + shard.samples, first
            first = last
            if last <= self.start or first_here >= self.stop:
                continue
            rows = index_rows(shard.idx)
            skip = max(0, self.start - first_here)
            take = min(last, self.stop) - first_here - skip
            for row in rows[skip : skip + take]:
                yield shard, row


SHUFFLE_BUFFER = 1024  # as the DALI reader's initial_fill


@dataclass(frozen=True)
class PairOptions:
    """What each pair looks like and how an epoch is ordered (besides the rank layout)."""

    image_size: int
    seed: int
    shuffle: bool
    flip: bool
    crop: bool = False  # an image_size window at full resolution instead of the whole image resized


# Settings added after loader states were first saved, with the value those states were made
# with: a checkpoint written before ``crop`` existed resumes as the resize mode it was.
LATER_SETTINGS = {"crop": False}


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
        saved = LATER_SETTINGS | state.get("settings", {})
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


def epoch_order(part: RankPart, pairs: PairOptions, epoch: int) -> Iterator[tuple[ShardFile, dict]]:
    """The rank's samples of one epoch, in the order they are yielded: the part in stored order,
    shuffled with a seeded buffer when ``pairs.shuffle``. A pure function of ``(seed, rank,
    epoch)``: the torch backend's order in both modes, and DALI's in crop mode."""
    samples = part.rows()
    if pairs.shuffle:
        samples = buffer_shuffle(samples, SHUFFLE_BUFFER, random.Random(derived_seed(pairs.seed, part.rank, epoch)))
    return samples


def pair_window(pairs: PairOptions, epoch: int, row: dict, sharp: bytes, where: str) -> Window:
    """Crop mode: the window of the pair at index ``row`` in ``epoch``, from the sharp member's
    stored size (its JPEG header) and key; the one rule both backends follow."""
    key = split_name(row[SHARP][2])[0]
    size = jpeg_size(sharp, where)
    options = dict(seed=pairs.seed, epoch=epoch, random=pairs.shuffle, flip=pairs.flip)
    return crop_window(key, size, pairs.image_size, **options)


def read_pair(tars: dict, files: contextlib.ExitStack, shard: ShardFile, row: dict) -> tuple[dict, dict]:
    """({ext: bytes}, {ext: "shard X member Y"}) of one sample's image members, read at its index
    offsets. ``tars`` keeps the tars opened so far (each closed with ``files``)."""
    if shard not in tars:
        tars[shard] = files.enter_context(open(shard.tar, "rb"))
    members = {ext: read_member(tars[shard], shard.tar, row[ext]) for ext in PAIR_MEMBERS}
    return members, {ext: f"shard {shard.tar} member {row[ext][2]}" for ext in PAIR_MEMBERS}


def read_members(shards: Iterable[ShardFile]) -> Iterator[tuple[ShardFile, str, bytes]]:
    """``(shard, member name, bytes)`` of every image member, in stored order, read at the
    offsets of the shard's index (the way DALI reads them, without parsing tar headers)."""
    for shard in shards:
        with shard.tar.open("rb") as tar:
            for members in index_rows(shard.idx):
                for ext in PAIR_MEMBERS:
                    yield shard, members[ext][2], read_member(tar, shard.tar, members[ext])


def part_members(part: RankPart) -> Iterator[list[tuple[str, bytes]]]:
    """The image members of the rank's part as ``(where, bytes)``, one list per shard."""
    for shard, rows in itertools.groupby(part.rows(), key=lambda item: item[0]):
        with shard.tar.open("rb") as tar:
            yield [
                (f"shard {shard.tar} member {row[ext][2]}", read_member(tar, shard.tar, row[ext]))
                for _, row in rows
                for ext in PAIR_MEMBERS
            ]


def check_part(part: RankPart, threads: int, crop: int | None = None) -> int:
    """Check every image member of the rank's part with libjpeg (see the module docstring);
    the first corrupt one, in stored order, raises a ShardError naming shard and member. With a
    ``crop`` size, each pair's members must also be of one size, at least the crop."""
    count = 0
    for members in part_members(part):
        count += check_members(members, threads)
        if crop is not None:
            check_crop_sizes(members, crop)
    return count


def check_crop_sizes(members: list[tuple[str, bytes]], crop: int) -> None:
    """Each pair of ``members`` (as :func:`part_members` lists them: blurred, then sharp) can give
    a ``crop`` x ``crop`` window at one position in both; else a ShardError naming the member."""
    for (where_blurred, blurred), (where_sharp, sharp) in zip(members[::2], members[1::2]):
        (bw, bh), (w, h) = jpeg_size(blurred, where_blurred), jpeg_size(sharp, where_sharp)
        if (bw, bh) != (w, h):
            raise ShardError(
                f"{where_blurred} is {bw}x{bh} but its sharp partner is {w}x{h}: a pair is cropped at one window"
            )
        if min(w, h) < crop:
            raise ShardError(
                f"{where_sharp} is {w}x{h}: smaller than the {crop}x{crop} crop; build the shards with a larger "
                "--store-size (or none), or train without crop"
            )


def find_undecodable(part: RankPart) -> str | None:
    """Name the first member of the rank's part that libjpeg cannot decode cleanly, or None:
    the diagnosis after DALI failed (its error names no file)."""
    for members in part_members(part):
        for where, data in members:
            try:
                check_jpeg(data, where)
            except ShardError as error:
                return str(error).removeprefix("cannot decode ")
    return None


def find_shards(shards: Path | str, split: str) -> tuple[ShardFile, ...]:
    """The split's shard files as ``manifest.json`` lists them (stored order), the manifest
    checked and each shard checked against its index (:func:`deblur.shard.format.split_shards`)."""
    root = Path(shards)
    found = split_shards(root, split)
    if not found:
        raise ShardError(f"no shards for split {split!r} in {root} ({MANIFEST} lists none)")
    if sum(s.samples for s in found) == 0:
        raise ShardError(f"split {split!r} in {root} has shards but no samples: {[str(s.tar) for s in found]}")
    return found


def derived_seed(*values: int) -> int:
    """A well-mixed non-negative 31-bit seed from several integers (seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0] & 0x7FFFFFFF)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))
