"""Checkpoint integrity, durability, fallback and relayout, in-process (the DDP runs are in test_train.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deblur.errors import Fault, free_space
from deblur.loading.loader import make_loader
from deblur.training import checkpoint as ckpt
from deblur.training.failures import is_every_rank


class OneProcess:
    """The part of Accelerator that save_checkpoint uses, for one process writing small files."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        save_file({"w": torch.arange(64.0)}, Path(folder) / "model.safetensors")
        torch.save({"state": {0: {"step": torch.tensor(3.0)}}}, Path(folder) / "optimizer.bin")
        (Path(folder) / "random_states_0.pkl").write_bytes(os.urandom(100))


class Position:
    """A training loader's position, as checkpoints save it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"settings": {}, "epoch": 0, "batch": self.step}


class RunState:
    """The run's state as save_checkpoint takes it (deblur.training.state.TrainState's interface)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.loader = Position(step)

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_total": 0, "consecutive_skips": 0}

    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ema.safetensors": {"w": torch.full((8,), float(self.step))}}


def save(checkpoints: Path, step: int, keep: int = 5) -> Path:
    return ckpt.save_checkpoint(OneProcess(), checkpoints, RunState(step), "seed: 0\n", keep=keep)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by path relative to it, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_save_is_flushed_before_it_is_published_and_lists_every_file(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    final = checkpoints / ckpt.step_dir_name(10)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, final.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert save(checkpoints, 10) == final
    manifest = json.loads((final / ckpt.MANIFEST).read_text())["files"]
    assert sorted(manifest) == sorted(p.name for p in final.iterdir() if p.name != ckpt.MANIFEST)
    assert manifest["trainer.json"]["bytes"] == (final / "trainer.json").stat().st_size
    # The run state's own files are under the same manifest, and trainer.json is its state_dict.
    assert torch.equal(load_file(final / "ema.safetensors")["w"], torch.full((8,), 10.0))
    trainer = json.loads((final / "trainer.json").read_text())
    assert trainer == {"step": 10, "skipped_total": 0, "consecutive_skips": 0, "world_size": 1}
    assert json.loads((final / "loader-rank0.json").read_text())["batch"] == 10
    # Every file, the manifest and the folder reach the disk before the rename; the parent after it.
    before_rename = {name for name, published in synced if not published}
    assert set(manifest) | {ckpt.MANIFEST + ".partial", ".tmp-step-0000010"} <= before_rename
    assert ("checkpoints", True) in synced and (tmp_path.name, True) in synced
    assert ckpt.verify_checkpoint(final) == []


@pytest.mark.parametrize(
    "damage, expected",
    [
        (truncate, "model.safetensors has"),
        (flip_a_byte, "model.safetensors does not match its sha256"),
        (Path.unlink, "model.safetensors is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_chosen(tmp_path, damage, expected):
    checkpoints = tmp_path / "checkpoints"
    previous = save(checkpoints, 10)
    newest = save(checkpoints, 20)
    damage(newest / "model.safetensors")
    kept = snapshot(newest)

    chosen, notes = ckpt.choose_checkpoint(checkpoints)

    assert chosen == previous
    assert expected in notes[0] and str(newest) in notes[0]
    assert notes[0].endswith("set aside as corrupt-step-0000020")
    assert notes[1] == f"resuming from {previous}, the newest checkpoint that verifies"
    aside = checkpoints / "corrupt-step-0000020"
    assert not newest.exists() and snapshot(aside) == kept  # renamed, nothing changed or deleted
    # Rotation and resuming ignore it: the next save at step 20 is a new folder, keep=1 leaves it.
    save(checkpoints, 20, keep=1)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["corrupt-step-0000020", "step-0000020"]
    assert ckpt.choose_checkpoint(checkpoints) == (checkpoints / "step-0000020", [])


def test_the_message_gives_sizes_of_a_truncated_file(tmp_path):
    path = save(tmp_path, 10)
    size = (path / "model.safetensors").stat().st_size
    truncate(path / "model.safetensors")
    assert ckpt.verify_checkpoint(path) == [f"model.safetensors has {size // 2} bytes, manifest.json says {size}"]


def test_with_no_checkpoint_that_verifies_the_error_names_them_and_nothing_is_deleted(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (10, 20):
        save(checkpoints, step)
    (checkpoints / "step-0000010" / ckpt.MANIFEST).unlink()
    flip_a_byte(checkpoints / "step-0000020" / "optimizer.bin")
    before = sorted(snapshot(checkpoints).values())

    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.choose_checkpoint(checkpoints)
    message = str(error.value)
    assert "no checkpoint in" in message and "optimizer.bin does not match" in message
    assert "manifest.json is missing" in message and "nothing was deleted" in message
    assert sorted(snapshot(checkpoints).values()) == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["corrupt-step-0000010", "corrupt-step-0000020"]
    # Rerunning does not quietly start over from step 0 either.
    with pytest.raises(ckpt.CheckpointError, match="corrupt-step-0000010"):
        ckpt.choose_checkpoint(checkpoints)


def test_a_fresh_run_has_nothing_to_choose(tmp_path):
    assert ckpt.choose_checkpoint(tmp_path / "checkpoints") == (None, [])


def test_setting_aside_the_same_step_twice_keeps_both(tmp_path):
    first = ckpt.set_aside(save(tmp_path, 10))
    second = ckpt.set_aside(save(tmp_path, 10))
    assert (first.name, second.name) == ("corrupt-step-0000010", "corrupt-step-0000010-2")


def test_an_unreadable_manifest_is_reported(tmp_path):
    path = save(tmp_path, 10)
    (path / ckpt.MANIFEST).write_text("{not json")
    assert ckpt.verify_checkpoint(path)[0].startswith("manifest.json is unreadable")


def test_inspector_lists_checkpoints_and_fails_when_the_newest_does_not_verify(tmp_path, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    save(checkpoints, 10)
    newest = save(checkpoints, 20)
    assert ckpt.main([str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["step-0000010", "10", "1"] and lines[1].endswith("ok")
    truncate(newest / "random_states_0.pkl")
    assert ckpt.main([str(checkpoints)]) == 1
    assert "DAMAGED: random_states_0.pkl has 50 bytes" in capsys.readouterr().out.splitlines()[2]
    assert ckpt.main([str(tmp_path)]) == 1  # no checkpoints at all
    assert "no checkpoints in" in capsys.readouterr().out


def test_state_digest_matches_the_same_state_read_back_from_files(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters(), betas=(0.5, 0.999))
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.bin")
    in_memory = ckpt.state_digest([model.state_dict()], [optimizer.state_dict()])
    from_files = ckpt.state_digest(
        [load_file(tmp_path / "model.safetensors")], [torch.load(tmp_path / "optimizer.bin")]
    )
    assert in_memory == from_files
    with torch.no_grad():
        model[0].bias[0] += 1e-6
    assert ckpt.state_digest([model.state_dict()], [optimizer.state_dict()]) != in_memory


def test_a_loader_position_moves_to_the_start_of_its_epoch_under_a_new_layout(tiny_shards):
    def loader(rank: int, world_size: int, batch_size: int = 2):
        return make_loader(
            tiny_shards,
            "train",
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            backend="torch",
            device="cpu",
            num_workers=1,
            flip=False,
        )

    old = loader(0, 2)
    saved = {**old.state_dict(), "epoch": 3, "batch": 2}
    for rank in (0, 1, 2):
        new = loader(rank, 3)
        new.load_state_dict(ckpt.relayout_loader_state(saved, new.state_dict()))
        assert (new.epoch, new.batch, new.part.world_size) == (3, 0, 3)
    # An epoch that was read to its end is not repeated.
    done = {**saved, "batch": len(old)}
    assert ckpt.relayout_loader_state(done, loader(0, 1).state_dict())["epoch"] == 4
    # Other settings must still match; the loader names what differs.
    with pytest.raises(ValueError, match="batch_size"):
        other = loader(0, 1, batch_size=3)
        other.load_state_dict(ckpt.relayout_loader_state(saved, other.state_dict()))


def test_bench_times_durable_and_unsynced_saves(tmp_path):
    # A subprocess: the bench creates an Accelerator, whose state is per process.
    cmd = [sys.executable, "-m", "deblur.bench", "checkpoint", "--repeat", "1", "--dir", str(tmp_path)]
    proc = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "checkpoint" and 100 < result["size_mib"] < 125  # G + D + Adam + EMA
    assert result["median_ms"]["durable"] > 0 and result["median_ms"]["no fsync"] > 0 and result["verify_ms"] > 0
    assert list(tmp_path.iterdir()) == []  # its checkpoints are removed


@pytest.mark.parametrize("stage", ["models", "manifest"])
def test_disk_full_while_saving_removes_the_partial_save_and_leaves_the_others(tmp_path, monkeypatch, stage):
    # ENOSPC in the middle of a rank's part (Accelerate's save_state), or while the main process
    # publishes (the manifest): one Fault that says so with the space left, the partial
    # .tmp-step-* gone, the older checkpoints untouched and still verifying.
    checkpoints = tmp_path / "checkpoints"
    older = [save(checkpoints, step) for step in (10, 20)]
    before = snapshot(checkpoints)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(checkpoints / ".tmp-step-0000030" / "x"))

    if stage == "models":
        monkeypatch.setattr(OneProcess, "save_state", disk_full)
    else:
        monkeypatch.setattr(ckpt, "write_manifest", disk_full)
    with pytest.raises(Fault) as error:
        save(checkpoints, 30)

    message = str(error.value)
    assert message.startswith(f"checkpoint step-0000030 not saved: disk full ({free_space(checkpoints)}); ")
    assert message.endswith(
        "its partial folder .tmp-step-0000030 was removed, the checkpoints saved before are untouched "
        "(the newest is step-0000020)"
    )
    assert error.value.exit_code == 1 and is_every_rank(error.value)  # every rank raises it: one report
    assert snapshot(checkpoints) == before and all(ckpt.verify_checkpoint(p) == [] for p in older)


def test_a_failed_torch_save_on_a_full_disk_counts_as_disk_full(tmp_path):
    # torch.save loses the errno ("unexpected pos ..."): less space than a checkpoint needs says it.
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert ckpt.describe_write_failure(error, tmp_path, needed=2**60).startswith("disk full (")
    assert ckpt.describe_write_failure(error, tmp_path, needed=0).startswith("RuntimeError: [enforce fail")
