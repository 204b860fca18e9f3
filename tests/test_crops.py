"""Patch training (``make_loader(..., crop=True)``): every pair is one window cut from both
full-size members, both backends cut the same windows in the same order for the same seed,
evaluation windows are fixed, and a member too small for the crop is named.

The reference is independent of the loaders: each yielded crop is searched for in its sample's
full-size sharp member (decoded by PIL), and the blurred crop must be the blurred member's
pixels at the window (and mirror) found.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from deblur.loading.contract import PairOptions, RankPart, epoch_order, find_shards
from deblur.loading.crops import crop_window
from deblur.loading.loader import make_loader
from deblur.norm import denormalize
from deblur.shard.format import BLURRED, SHARP, ShardError, read_samples, split_name

SIZE, SEED, BATCH = 64, 5, 4
pytestmark = pytest.mark.timeout(300)


def full_members(shards) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (sharp, blurred)} of the train split, decoded whole by PIL."""
    out = {}
    for shard in find_shards(shards, "train"):
        for key, members in read_samples(shard.tar, (SHARP, BLURRED)):
            out[key] = tuple(
                np.asarray(Image.open(io.BytesIO(members[ext])), dtype=np.int16) for ext in (SHARP, BLURRED)
            )
    return out


def locate(crop: np.ndarray, full: np.ndarray) -> tuple[int, int, bool]:
    """(x, y, mirrored) of the window of ``full`` that ``crop`` was cut from (a search over every
    position, both ways round, by a corner patch, then checked whole)."""
    best = None
    for mirrored in (False, True):
        plain = crop[:, ::-1] if mirrored else crop
        views = sliding_window_view(full[: full.shape[0] - SIZE + 8, : full.shape[1] - SIZE + 8], (8, 8, 3))
        cost = np.abs(views[:, :, 0] - plain[:8, :8]).mean(axis=(2, 3, 4))
        y, x = np.unravel_index(np.argmin(cost), cost.shape)
        if best is None or cost[y, x] < best[0]:
            best = (cost[y, x], int(x), int(y), mirrored)
    _, x, y, mirrored = best
    window = full[y : y + SIZE, x : x + SIZE]
    assert np.abs((window[:, ::-1] if mirrored else window) - crop).max() <= 2, "no window of the member matches"
    return x, y, mirrored


def pixels(images: torch.Tensor) -> np.ndarray:
    """Normalized (B, 3, S, S) -> (B, S, S, 3) 0..255 integers."""
    return (denormalize(images) * 255).round().permute(0, 2, 3, 1).to(torch.int16).numpy()


@pytest.mark.parametrize("shuffle", [False, True])
def test_crops_cut_one_window_from_both_members_and_the_backends_agree(paired_shards, shuffle):
    runs = {}
    for backend in ("dali", "torch"):
        loader = make_loader(
            paired_shards,
            "train",
            batch_size=BATCH,
            crop=True,
            shuffle=shuffle,
            flip=True,
            seed=SEED,
            backend=backend,
            num_workers=2,
        )
        runs[backend] = [list(loader) for _ in range(2)]  # two epochs
        assert all(b.shape == (BATCH, 3, SIZE, SIZE) for epoch in runs[backend] for pair in epoch for b in pair)
    for dali_epoch, torch_epoch in zip(*runs.values()):  # the same pairs, windows and mirrors
        for dali_pair, torch_pair in zip(dali_epoch, torch_epoch, strict=True):
            for a, b in zip(dali_pair, torch_pair):
                assert (a - b).abs().max() < 1e-4

    members = full_members(paired_shards)
    part = RankPart(find_shards(paired_shards, "train"), 0, 1, BATCH)
    windows = []
    for epoch, batches in enumerate(runs["torch"]):
        order = epoch_order(part, PairOptions(SIZE, SEED, shuffle, True, crop=True), epoch)
        keys = [split_name(row[SHARP][2])[0] for _, row in order]
        blurred, sharp = (np.concatenate([pixels(pair[m]) for pair in batches]) for m in (0, 1))
        assert len(keys) == len(sharp) == len(members)  # 12 pairs, 3 full batches: nothing dropped
        seen = {}
        for key, b, s in zip(keys, blurred, sharp):
            x, y, mirrored = locate(s, members[key][0])
            window = members[key][1][y : y + SIZE, x : x + SIZE]
            assert np.abs((window[:, ::-1] if mirrored else window) - b).max() <= 2, key  # the same window
            seen[key] = (x, y, mirrored)
        windows.append(seen)
    assert windows[0].keys() == windows[1].keys() == members.keys()
    mirrored = [w[2] for epoch in windows for w in epoch.values()]
    assert any(mirrored) and not all(mirrored)
    if shuffle:  # training: a new window every epoch
        assert sum(windows[0][k][:2] != windows[1][k][:2] for k in members) >= len(members) - 1
    else:  # evaluation: each sample's one window, where crop_window puts it
        for key, (sharp_full, _) in members.items():
            h, w = sharp_full.shape[:2]
            fixed = crop_window(key, (w, h), SIZE, seed=0, epoch=0, random=False, flip=False)
            assert windows[0][key][:2] == windows[1][key][:2] == (fixed.x, fixed.y)


def test_a_member_smaller_than_the_crop_is_named(small_shards):
    with pytest.raises(ShardError, match=r"member \w+\.blur\.jpg is 64x78|is 64x78: smaller than the 80x80 crop"):
        make_loader(small_shards, "train", batch_size=2, crop=True, image_size=80, backend="torch")
