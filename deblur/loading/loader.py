"""``make_loader``: batches of (blurred, sharp) pairs of one split, from the DALI or the torch
backend. What an epoch is, for both, is in :mod:`deblur.loading.contract`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from deblur.device import resolve_device
from deblur.loading.contract import PairLoader, PairOptions, RankPart, check_part, find_shards, usable_cores
from deblur.shard.format import ShardError

Backend = Literal["dali", "torch"]


def make_loader(
    shards: Path | str,
    split: str,
    *,
    batch_size: int,
    image_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    flip: bool = True,
    crop: bool = False,
    backend: Backend = "dali",
    device: torch.device | str | None = None,
    num_workers: int | None = None,
    drop_last: bool = True,
    decode_threads: int | None = None,
    hw_decoder_load: float | None = None,
) -> PairLoader:
    """Batches of ``(blurred, sharp)`` normalized float32 (B, 3, S, S) tensors on ``device``.

    ``drop_last=True`` (training): ``(N // W) // batch_size`` full batches on every rank.
    ``drop_last=False`` (evaluation): the rank's whole part, the last batch possibly smaller;
    ``len(loader)`` may differ by one between ranks, and is 0 on a rank whose part is empty
    (a split with fewer samples than ranks). See the module docstring.

    ``device=None`` is the process's current CUDA device when it has one, else the CPU; it is
    also what selects GPU ("mixed") JPEG decoding in the DALI backend. ``num_workers``: the
    cores the loader may keep busy: torch DataLoader worker processes, or DALI CPU threads (the
    DALI backend runs one thread more, see deblur.loading.dali_backend); None = this process's usable
    cores (pass cores // local ranks when several ranks share a machine).

    DALI only: ``decode_threads`` is the pipeline's thread count (None = ``num_workers + 1``);
    ``hw_decoder_load`` the share of JPEGs the GPU's hardware decoder takes when decoding on
    the GPU (None = chosen from ``decode_threads``, see
    ``deblur.loading.dali_graph.default_hw_decoder_load``).

    ``crop=True`` (patch training): each pair is an ``image_size`` window of the stored
    members, at the same position in both, instead of the whole image resized; random per epoch
    with ``shuffle``, fixed per sample without (:mod:`deblur.loading.crops`). Both backends then
    yield the same pairs, windows and mirrors in the same order for the same seed; DALI decodes
    only the window (``fn.decoders.image_slice``, on the GPU when there is one).

    Batches have channels_last strides (shape still (B, 3, S, S)), from either backend.

    Before it returns, every image member of the rank's part is checked with libjpeg on
    ``num_workers`` threads (deblur.loading.contract): a corrupt member is a ShardError naming
    the shard and the member, the same for both backends.
    """
    if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
    if decode_threads is not None and decode_threads < 1:
        raise ValueError(f"decode_threads must be >= 1, got {decode_threads}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    part = RankPart(find_shards(shards, split), rank, world_size, batch_size, drop_last)
    if drop_last and part.batches_per_epoch == 0:
        raise ShardError(
            f"split {split!r} in {shards} has {part.total} samples: fewer than one batch of "
            f"{batch_size} per rank for world_size {world_size}"
        )
    if backend not in ("dali", "torch"):
        raise ValueError(f"backend must be 'dali' or 'torch', got {backend!r}")
    pairs = PairOptions(image_size=image_size, seed=seed, shuffle=shuffle, flip=flip, crop=crop)
    runtime = dict(device=resolve_device(device), num_workers=num_workers or usable_cores())
    check_part(part, threads=runtime["num_workers"], crop=image_size if crop else None)
    if backend == "dali":
        from deblur.loading.dali_backend import DaliCropLoader, DaliPairLoader

        dali = DaliCropLoader if crop else DaliPairLoader
        return dali(part, pairs, decode_threads=decode_threads, hw_decoder_load=hw_decoder_load, **runtime)
    from deblur.loading.torch_backend import TorchPairLoader

    return TorchPairLoader(part, pairs, **runtime)
