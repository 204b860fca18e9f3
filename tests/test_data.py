"""make_loader: shapes, epoch/rank semantics, backend agreement, flips and resuming.

Samples are identified by content: a single-rank, unshuffled, unflipped pass with batch size 1
lists every sample of the split in stored order, and each backend is deterministic, so any
later batch row equals exactly one of those references.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deblur.errors import InputError
from deblur.loading.contract import find_shards
from deblur.loading.loader import make_loader
from deblur.norm import denormalize

ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ["dali", "torch"]
pytestmark = pytest.mark.timeout(300)


def load(shards, backend, **options):
    options.setdefault("batch_size", 4)
    return make_loader(shards, "train", backend=backend, num_workers=2, **options)


@pytest.fixture(scope="module")
def references(tiny_shards):
    """backend -> (N, 2, 3, 64, 64): every train pair, stored order, no flip."""
    out = {}
    for backend in BACKENDS:
        loader = load(tiny_shards, backend, batch_size=1, shuffle=False, flip=False)
        out[backend] = torch.cat([torch.stack([b, s], 1) for b, s in loader])
    return out


def sample_ids(batches, reference) -> list[int]:
    """Index in the reference of every sharp image in ``batches`` (exact match required)."""
    flat = reference[:, 1].flatten(1)
    ids = []
    for _, sharp in batches:
        for image in sharp.flatten(1):
            hits = (flat == image).all(1).nonzero().flatten().tolist()
            assert len(hits) == 1, "a yielded sample matches no (or several) reference samples"
            ids.append(hits[0])
    return ids


def test_reference_covers_split(tiny_shards, references):
    total = sum(s.samples for s in find_shards(tiny_shards, "train"))
    for reference in references.values():
        assert reference.shape == (total, 2, 3, 64, 64)
        assert len({tuple(x.flatten()[:64].tolist()) for x in reference[:, 1]}) == total


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_normalized_pairs(tiny_shards, backend):
    loader = load(tiny_shards, backend, batch_size=3, image_size=32)
    total = sum(s.samples for s in find_shards(tiny_shards, "train"))
    batches = list(loader)
    assert len(batches) == len(loader) == total // 3
    for blurred, sharp in batches:
        assert blurred.shape == sharp.shape == (3, 3, 32, 32)
        assert blurred.dtype == sharp.dtype == torch.float32 and blurred.device.type == "cpu"
        unit = denormalize(torch.stack([blurred, sharp]))
        assert unit.min() > -0.01 and unit.max() < 1.01 and unit.std() > 0.05
        # blurring removes high frequencies: the blurred member has smaller horizontal gradients
        assert blurred.diff(dim=-1).abs().mean() < sharp.diff(dim=-1).abs().mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flip", [False, True])
def test_batches_are_channels_last_without_a_copy(tiny_shards, backend, flip):
    """The models run channels_last: batches arrive in that layout, as views (a dense NCHW batch
    copied per step would cost a pass over every batch)."""
    for blurred, sharp in itertools.islice(load(tiny_shards, backend, batch_size=3, flip=flip), 2):
        for images in (blurred, sharp):
            assert images.shape == (3, 3, 64, 64)
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert not images.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_read_disjoint_contiguous_parts(tiny_shards, references, backend, shuffle):
    world, batch = 3, 2
    total = len(references[backend])
    seen = []
    for rank in range(world):
        loader = load(
            tiny_shards, backend, batch_size=batch, rank=rank, world_size=world, shuffle=shuffle, flip=False, seed=5
        )
        assert len(loader) == (total // world) // batch
        epochs = [sample_ids(loader, references[backend]) for _ in range(2)]
        part = set(range(total * rank // world, total * (rank + 1) // world))
        for ids in epochs:
            assert len(ids) == len(loader) * batch and len(set(ids)) == len(ids)  # once each
            assert set(ids) <= part  # only this rank's contiguous part (DALI's shard_id cut)
        if shuffle:
            assert epochs[0] != epochs[1]  # a new order every epoch
        else:
            assert epochs[0] == epochs[1] == sorted(part)[: len(epochs[0])]
        seen.append(set(epochs[0]))
    assert not any(a & b for a, b in itertools.combinations(seen, 2))
    # everything but a remainder smaller than a batch (+1 for uneven parts) per rank is read
    assert total - len(set().union(*seen)) <= world * batch


@pytest.mark.parametrize("rank", [0, 1])
def test_backends_yield_same_pairs_in_same_order(tiny_shards, rank):
    runs = [
        list(load(tiny_shards, backend, batch_size=4, rank=rank, world_size=2, shuffle=False, flip=False))
        for backend in BACKENDS
    ]
    assert len(runs[0]) == len(runs[1]) > 0
    assert_backends_agree(*runs)


def assert_backends_agree(dali_batches, torch_batches) -> None:
    assert len(dali_batches) == len(torch_batches)
    for dali_pair, torch_pair in zip(dali_batches, torch_batches):
        for a, b in zip(dali_pair, torch_pair):
            assert a.shape == b.shape
            diff = (a - b).abs()
            # Two JPEG decoders (DALI's nvImageCodec vs PIL) and two resize implementations:
            # measured mean 0.002, max 0.23 (13/255 at a chroma edge), 0.2% of values > 0.05;
            # a different image or a flip differs by ~0.5 on average.
            assert diff.mean() < 0.01 and diff.max() < 0.35 and (diff > 0.05).float().mean() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_is_shared_by_both_members(tiny_shards, references, backend):
    reference = references[backend]
    flipped_pairs = same_pairs = 0
    for blurred, sharp in load(tiny_shards, backend, batch_size=4, shuffle=False, flip=True, seed=1):
        for b, s in zip(blurred, sharp):
            matches = [
                (i, f)
                for i in range(len(reference))
                for f in (False, True)
                if torch.equal(reference[i, 1].flip(-1) if f else reference[i, 1], s)
            ]
            assert len(matches) == 1
            index, flipped = matches[0]
            expected = reference[index, 0].flip(-1) if flipped else reference[index, 0]
            assert torch.equal(b, expected), "the blurred member was not mirrored with its sharp twin"
            flipped_pairs += flipped
            same_pairs += not flipped
    assert flipped_pairs > 0 and same_pairs > 0


@pytest.mark.parametrize("backend", BACKENDS)
# crop=True (patch training): mid-epoch, and at the end of the second epoch
@pytest.mark.parametrize("consumed, crop", [(0, False), (3, False), (5, False), (12, False), (3, True), (10, True)])
def test_resume_continues_with_the_next_batch(tiny_shards, backend, consumed, crop):
    options = dict(batch_size=2, rank=1, world_size=2, shuffle=True, flip=True, seed=7, crop=crop)
    uninterrupted = load(tiny_shards, backend, **options)
    per_epoch = len(uninterrupted)
    expected = [pair for _ in range(3) for pair in uninterrupted]
    assert consumed < len(expected)

    first = load(tiny_shards, backend, **options)
    got = []
    while len(got) < consumed:  # may stop mid-epoch or exactly at an epoch's end
        got += itertools.islice(first, consumed - len(got))
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    # a loader that has handed out an epoch's last batch stays in that epoch until asked again
    at_epoch_end = consumed and consumed % per_epoch == 0
    position = (consumed // per_epoch - 1, per_epoch) if at_epoch_end else divmod(consumed, per_epoch)
    assert (state["epoch"], state["batch"]) == position

    resumed = load(tiny_shards, backend, **options)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got += list(resumed)
    assert len(got) == len(expected)
    for (b0, s0), (b1, s1) in zip(expected, got):
        assert torch.equal(b0, b1) and torch.equal(s0, s1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_from_other_settings_is_refused(tiny_shards, backend):
    state = load(tiny_shards, backend, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        load(tiny_shards, backend, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="crop"):
        load(tiny_shards, backend, batch_size=4, crop=True).load_state_dict(state)
    # a state saved before ``crop`` existed is resize mode's, and resumes as such
    del state["settings"]["crop"]
    load(tiny_shards, backend, batch_size=4).load_state_dict(state)


def test_bad_arguments_are_refused(tiny_shards):
    with pytest.raises(ValueError, match="backend"):
        make_loader(tiny_shards, "train", batch_size=2, backend="tf")
    with pytest.raises(ValueError, match="rank"):
        make_loader(tiny_shards, "train", batch_size=2, rank=2, world_size=2)
    with pytest.raises(InputError, match="split must be one of train, val, test, got 'training'"):
        make_loader(tiny_shards, "training", batch_size=2)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        make_loader(tiny_shards, "train", batch_size=2, hw_decoder_load=1.5)


def test_dali_decoder_settings_reach_the_loader(tiny_shards):
    from deblur.loading.dali_graph import default_hw_decoder_load

    loader = make_loader(tiny_shards, "train", batch_size=2, num_workers=2)
    assert (loader.decode_threads, loader.hw_decoder_load) == (3, 1.0)  # workers + 1; few threads
    loader = make_loader(tiny_shards, "train", batch_size=2, decode_threads=16, hw_decoder_load=0.3)
    assert (loader.decode_threads, loader.hw_decoder_load) == (16, 0.3)
    assert [default_hw_decoder_load(n) for n in (2, 4, 8, 12, 16)] == [1.0, 1.0, 0.65, 0.0, 0.0]
    assert len(list(loader)) == len(loader) > 0  # the CPU decoder runs with those settings


# drop_last=False (evaluation): every sample of the split, once, in possibly smaller last batches.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shuffle", [False, True])
# world 5, batch 4 over 22 samples: parts 4, 4, 5, 4, 5; ranks 0, 1, 3 are the case where DALI's
# PARTIAL iterator ends the epoch with an empty batch (see deblur/loading/dali_backend.py).
@pytest.mark.parametrize("world, batch", [(1, 4), (2, 4), (5, 4)])
def test_partial_yields_every_sample_once(tiny_shards, references, backend, shuffle, world, batch):
    reference = references[backend]
    total = len(reference)
    seen = []
    for rank in range(world):
        loader = load(
            tiny_shards,
            backend,
            batch_size=batch,
            rank=rank,
            world_size=world,
            shuffle=shuffle,
            flip=False,
            seed=3,
            drop_last=False,
        )
        part = list(range(total * rank // world, total * (rank + 1) // world))
        sizes = [min(batch, len(part) - start) for start in range(0, len(part), batch)]
        epochs = []
        for _ in range(2):
            batches = list(loader)
            assert [len(sharp) for _, sharp in batches] == sizes and len(loader) == len(sizes)
            assert all(len(blurred) == len(sharp) for blurred, sharp in batches)
            epochs.append(sample_ids(batches, reference))
        for ids in epochs:
            assert (sorted(ids) if shuffle else ids) == part  # the whole part, in stored order unshuffled
        if shuffle and len(part) > batch:
            assert epochs[0] != epochs[1]  # a new order every epoch
        seen += epochs[0]
    assert sorted(seen) == list(range(total))


@pytest.mark.parametrize("rank", [0, 1])
def test_backends_agree_with_partial_batches(tiny_shards, rank):
    runs = [
        list(
            load(
                tiny_shards, backend, batch_size=4, rank=rank, world_size=2, shuffle=False, flip=False, drop_last=False
            )
        )
        for backend in BACKENDS
    ]
    assert [len(sharp) for _, sharp in runs[0]] == [4, 4, 3]  # 22 samples: parts of 11
    assert_backends_agree(*runs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_with_fewer_samples_than_ranks(tiny_shards, backend):
    """Empty parts yield no batch (and build no DALI reader); the others one sample each."""
    total = sum(s.samples for s in find_shards(tiny_shards, "val"))
    world = total + 2
    reference = torch.cat(
        [
            sharp
            for _, sharp in make_loader(
                tiny_shards, "val", batch_size=1, shuffle=False, flip=False, backend=backend, num_workers=1
            )
        ]
    )
    seen = []
    for rank in range(world):
        loader = make_loader(
            tiny_shards,
            "val",
            batch_size=2,
            rank=rank,
            world_size=world,
            shuffle=False,
            flip=False,
            backend=backend,
            num_workers=1,
            drop_last=False,
        )
        part = list(range(total * rank // world, total * (rank + 1) // world))
        assert len(loader) == len(part)
        for _ in range(2):
            ids = sample_ids(list(loader), torch.stack([reference, reference], 1))
            assert ids == part
        seen += ids
    assert sorted(seen) == list(range(total))


@pytest.mark.parametrize("backend", BACKENDS)
# (world, rank, consumed): mid-epoch before the partial batch, mid second epoch, and at the end
# of an epoch whose DALI reader still holds the empty all-padding batch.
@pytest.mark.parametrize("world, rank, consumed", [(2, 1, 2), (2, 1, 4), (5, 0, 1), (5, 0, 2)])
def test_partial_resume_continues_with_the_next_batch(tiny_shards, backend, world, rank, consumed):
    options = dict(batch_size=4, rank=rank, world_size=world, shuffle=True, flip=True, seed=7, drop_last=False)
    uninterrupted = load(tiny_shards, backend, **options)
    expected = [pair for _ in range(3) for pair in uninterrupted]
    first = load(tiny_shards, backend, **options)
    got = []
    while len(got) < consumed:
        got += itertools.islice(first, consumed - len(got))
    resumed = load(tiny_shards, backend, **options)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    while len(got) < len(expected):
        got += list(resumed)
    assert [len(s) for _, s in got] == [len(s) for _, s in expected]
    assert all(torch.equal(b0, b1) and torch.equal(s0, s1) for (b0, s0), (b1, s1) in zip(expected, got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_from_other_last_batch_policy_is_refused(tiny_shards, backend):
    state = load(tiny_shards, backend, drop_last=True).state_dict()
    with pytest.raises(ValueError, match="drop_last"):
        load(tiny_shards, backend, drop_last=False).load_state_dict(state)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_process_that_leaves_a_loader_mid_epoch_exits(tiny_shards, backend):
    # The torch backend's workers must still stop when the process exits with an epoch
    # half-read (multiprocessing's exit handler terminates and then joins them).
    script = (
        "import sys; from deblur.loading.loader import make_loader\n"
        f"loader = make_loader(sys.argv[1], 'train', batch_size=2, backend={backend!r}, num_workers=2)\n"
        "batches = iter(loader); next(batches); print('one batch read')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_shards)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "one batch read" in done.stdout, done.stderr[-2000:]


def test_torch_workers_leave_stop_signals_to_the_trainer_but_obey_their_parent(tiny_shards):
    # Slurm signals every process of a step; a DataLoader worker that died of it would crash
    # the rank before the trainer could save. Its parent's SIGTERM (the DataLoader's shutdown)
    # must still end it.
    import psutil

    loader = make_loader(tiny_shards, "train", batch_size=2, backend="torch", num_workers=1)
    before = set(psutil.Process().children())  # e.g. the shard builder's forkserver
    batches = iter(loader)
    next(batches)
    (worker,) = set(psutil.Process().children()) - before
    for name in ("USR1", "INT", "TERM"):  # sent by another process, as Slurm's are
        subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    next(batches)  # still served
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    worker.terminate()  # from this process, its parent
    deadline = time.monotonic() + 10
    while worker.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the worker ignored its parent's SIGTERM"
        time.sleep(0.05)
    ended = os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT)  # not reaped: the DataLoader's to do
    assert (ended.si_code, ended.si_status) == (os.CLD_EXITED, 0)  # a clean exit, not death by the signal
