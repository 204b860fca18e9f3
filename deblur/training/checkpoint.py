"""Verified, durable, rotating training checkpoints under ``output_dir/checkpoints/``.

Layout of one complete checkpoint, ``checkpoints/step-0001000/``:

    model.safetensors, model_1.safetensors   generator, discriminator (Accelerate save_state)
    optimizer.bin, optimizer_1.bin           their Adam states
    scaler.pt                                fp16 loss scaler (fp16 runs only)
    random_states_<rank>.pkl                 Python/NumPy/torch RNG states, one per rank
    loader-rank<rank>.json                   each rank's training loader position
    ema.safetensors                          the EMA of the generator (train.ema_decay > 0)
    config.yaml                              the resolved config of the run
    trainer.json                             the run's state (deblur/training/state.py: step, skip
                                             counters, EMA update count, learning-rate schedules),
                                             number of processes
    manifest.json                            size and sha256 of every file above; written last

What is not Accelerate's comes from one object, the run's :class:`~deblur.training.state.TrainState`
(trainer.json, its safetensors files, its loader's per-rank position), and is restored into it.

A save goes to ``checkpoints/.tmp-step-0001000`` first; when every rank has written its part,
the main process hashes and fsyncs each file, writes the manifest, fsyncs the folder, renames it
to ``step-0001000`` and fsyncs ``checkpoints/``. ``rename`` within one directory is atomic and
the data is on disk before it, so a folder named ``step-*`` is complete even after a crash of
the machine, and a kill mid-save leaves the previous ones intact. Leftover ``.tmp-*`` folders
are deleted at the next start (only by the trainer holding ``output_dir``'s lock,
deblur/training/lock.py). The checkpoint folder must be on a filesystem all ranks share. A save
that fails on any rank (disk full, any write error) fails on every rank after the stage it
failed in: the partial ``.tmp-*`` is removed, older checkpoints stay as they were, and all ranks
raise one Fault naming the rank, the reason and the space left.

Resuming verifies the newest ``step-*`` against its manifest before any state is loaded. One
that does not verify (a file missing, cut short or changed) is reported by file name and set
aside as ``corrupt-step-*`` (renamed, never deleted; rotation and resuming ignore it), and the
next older one is tried. A checkpoint written by another number of processes resumes models,
optimizers, scaler, EMA, schedules and counters exactly; each rank restarts the data at the beginning of the
epoch the run was in (see :func:`relayout_loader_state`). One whose training data settings
differ (batch size, loader, flip, seed, the train split) is refused, naming the config keys
(:func:`check_resumable`).

``python -m deblur.checkpoint RUN_DIR`` lists the checkpoints and whether each verifies.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from deblur.errors import DeblurError, Fault, InputError, free_space
from deblur.files import sha256_file, write_atomic
from deblur.training.failures import agree, every_rank

STEP_DIR = re.compile(r"^step-(\d{7,})$")
TRAINER_STATE = "trainer.json"
MANIFEST = "manifest.json"
SET_ASIDE = "corrupt-"  # prefix of damaged checkpoints; STEP_DIR does not match it


class CheckpointError(InputError, RuntimeError):
    """Checkpoints exist but none can be resumed from."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def loader_state_name(rank: int) -> str:
    return f"loader-rank{rank}.json"


def complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, path) of every published checkpoint (``step-*``), oldest first.

    Published means complete when written; :func:`verify_checkpoint` says whether it still is."""
    if not checkpoints.is_dir():
        return []
    found = []
    for path in checkpoints.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partial_saves(checkpoints: Path) -> None:
    """Delete ``.tmp-*`` folders left by a save that was killed. Main process only."""
    if checkpoints.is_dir():
        for path in checkpoints.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, record its size and sha256 in ``manifest.json``
    (itself flushed), then flush the folder's entries.

    The main process flushes the files every rank wrote: on a local filesystem fsync acts on the
    file whoever wrote it; on NFS a writer's close() already sent its data to the server. sha256
    rather than blake2b: 1.3 GB/s against 0.8 on the development CPU (SHA extensions)."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        fsync_path(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1).encode())
    fsync_path(folder)


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with a checkpoint, each problem naming its file; [] when every file the
    manifest lists is there with its size and sha256. Nothing is loaded or changed."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: (int(r["bytes"]), str(r["sha256"])) for name, r in files.items()}
    except FileNotFoundError:
        return [f"{MANIFEST} is missing"]
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError, bad UTF-8 are ValueErrors
        return [f"{MANIFEST} is unreadable ({error!r})"]
    problems = []
    for name, (size, digest) in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {MANIFEST} says {size}")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its sha256 in {MANIFEST}")
    return problems


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to ``corrupt-<name>`` (``-2``, ``-3``... if taken). Main process only."""
    target, n = folder.with_name(SET_ASIDE + folder.name), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{SET_ASIDE}{folder.name}-{n}")
    folder.rename(target)
    fsync_path(folder.parent)
    return target


def choose_checkpoint(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """Main process only: the newest checkpoint that verifies (None for a fresh run) and what was
    done on the way. Every newer one that does not verify is set aside.

    Raises CheckpointError when checkpoints were found (now or set aside by an earlier start)
    but none verifies: starting over silently would throw the run away."""
    notes = []
    for _, path in reversed(complete_checkpoints(checkpoints)):
        problems = verify_checkpoint(path)
        if not problems:
            if notes:
                notes.append(f"resuming from {path}, the newest checkpoint that verifies")
            return path, notes
        aside = set_aside(path)
        notes.append(f"checkpoint {path} is damaged: {'; '.join(problems)}; set aside as {aside.name}")
    set_aside_before = sorted(p.name for p in checkpoints.glob(SET_ASIDE + "*")) if checkpoints.is_dir() else []
    if set_aside_before:
        raise CheckpointError(
            "\n  ".join([f"no checkpoint in {checkpoints} verifies:", *notes])
            + f"\nDamaged checkpoints kept there (nothing was deleted): {', '.join(set_aside_before)}. "
            f"To start over from step 0, move them out of {checkpoints} or use another output_dir; "
            f"`python -m deblur.checkpoint {checkpoints}` lists them"
        )
    return None, notes


def state_digest(models: list[dict[str, torch.Tensor]], optimizers: list[dict]) -> str:
    """sha256 over model state dicts and optimizer state dicts (keys, dtypes, shapes, bytes,
    hyperparameters): equal for the state in memory and the same state loaded from files."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    feed([models, optimizers])
    return digest.hexdigest()


class RunState(Protocol):
    """What checkpoints save of the run besides Accelerate's objects (TrainState is the one)."""

    step: int
    loader: Any  # the training loader: state_dict() / load_state_dict() of this rank's position

    def state_dict(self) -> dict[str, Any]: ...  # JSON, the same on every rank: trainer.json
    def tensor_files(self) -> dict[str, dict[str, torch.Tensor]]: ...  # the same on every rank
    def load_state_dict(self, state: dict[str, Any], folder: Path) -> list[str]: ...  # notes


def save_checkpoint(accelerator: Accelerator, checkpoints: Path, state: RunState, config_yaml: str, keep: int) -> Path:
    """Collective: every rank must call it at the same step; saves Accelerate's objects and
    ``state`` at ``state.step``. Returns the final folder.

    A failure on any rank (disk full, any write error) is agreed by all ranks after each stage,
    so no rank is left waiting: the partial ``.tmp-step-*`` is removed, every checkpoint saved
    before is left as it was, and every rank raises the same Fault saying what failed, on which
    rank, and how much space is left."""
    step = state.step
    final = checkpoints / step_dir_name(step)
    tmp = checkpoints / f".tmp-{final.name}"
    needed = max((mib(path) * 2**20 for _, path in complete_checkpoints(checkpoints)[-1:]), default=64 * 2**20)

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_part() -> None:
        accelerator.save_state(str(tmp))
        (tmp / loader_state_name(accelerator.process_index)).write_text(json.dumps(state.loader.state_dict()))

    def publish() -> None:
        (tmp / "config.yaml").write_text(config_yaml)
        for name, tensors in state.tensor_files().items():
            save_file(tensors, str(tmp / name))
        trainer = {**state.state_dict(), "world_size": accelerator.num_processes}
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer, indent=1))
        write_manifest(tmp)
        if final.exists():
            raise FileExistsError(f"{final} already exists; a step is never saved twice")
        os.replace(tmp, final)
        for folder in (checkpoints, checkpoints.parent):  # the rename, and checkpoints/ of a first save
            fsync_path(folder)
        for _, old in complete_checkpoints(checkpoints)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    # The main process makes the folder, every rank writes its part, the main process publishes;
    # each stage ends with all ranks agreeing that it succeeded everywhere (also their barrier).
    for stage, on_every_rank in ((start, False), (write_part, True), (publish, False)):
        failure = None
        if on_every_rank or accelerator.is_main_process:
            try:
                stage()
            except Exception as error:
                failure = Fault(describe_write_failure(error, checkpoints, needed))
        try:
            agree(accelerator, failure)
        except DeblurError as agreed:
            if accelerator.is_main_process and not final.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            saved = complete_checkpoints(checkpoints)
            before = f"the newest is {saved[-1][1].name}" if saved else "there is none yet"
            raise every_rank(
                Fault(
                    f"checkpoint {final.name} not saved: {agreed}; its partial folder {tmp.name} was removed, "
                    f"the checkpoints saved before are untouched ({before})"
                )
            ) from agreed
    return final


def describe_write_failure(error: BaseException, folder: Path, needed: float) -> str:
    """One line for an error raised while writing a checkpoint, with the space left on its disk.

    torch.save reports a failed write without its errno ("unexpected pos ...", "file write
    failed"), so one that fails while less space is left than a checkpoint needs (the size of
    the newest one) counts as disk full."""
    text = " ".join(str(error).split())
    code = getattr(error, "errno", None)
    if code == errno.EDQUOT or "Disk quota exceeded" in text:
        return f"disk quota exceeded ({free_space(folder)})"
    usage = None
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists()))
    if (
        code == errno.ENOSPC
        or "No space left on device" in text
        or (not isinstance(error, OSError) and usage is not None and usage.free < needed)
    ):
        return f"disk full ({free_space(folder)})"
    if isinstance(error, OSError):
        return f"{error.filename or folder}: {error.strerror or text} ({free_space(folder)})"
    return f"{type(error).__name__}: {text} ({free_space(folder)})"


def agree_on_checkpoint(accelerator: Accelerator, checkpoints: Path) -> Path | None:
    """Collective: the main process chooses (verifying, setting damaged ones aside) and every
    rank gets its choice, so all resume from the same folder or all raise the same error."""
    choice: list[Any] = [None, [], None]  # path, notes, error
    if accelerator.is_main_process:
        try:
            path, notes = choose_checkpoint(checkpoints)
            choice = [None if path is None else str(path), notes, None]
        except CheckpointError as error:
            choice = [None, [], str(error)]
    path, notes, error = broadcast_object_list(choice)
    for note in notes:
        accelerator.print(note)
    if error is not None:
        raise every_rank(CheckpointError(error))
    return None if path is None else Path(path)


# The training loader's settings that a checkpoint's data position depends on, and the config
# keys they come from (rank and world_size may change: see relayout_loader_state).
SETTING_KEYS = {
    "batch_size": "data.batch_size",
    "backend": "data.loader",
    "flip": "data.flip",
    "image_size": "data.image_size",
    "seed": "seed",
    "samples": "data.shards",
    "shards": "data.shards",
}


def check_resumable(saved: dict[str, Any], fresh: dict[str, Any], path: Path) -> None:
    """Refuse, naming the config keys, to resume a checkpoint whose training loader had other
    settings than this run's (the same on every rank, so every rank raises it alike)."""
    differing = []
    for name, key in SETTING_KEYS.items():
        if saved.get(name) == fresh.get(name) or any(key == seen for seen, _ in differing):
            continue
        if key == "data.shards":
            here, there = (f"{s['samples']} train samples in {len(s['shards'])} shards" for s in (fresh, saved))
        else:
            here, there = (json.dumps(s.get(name)) for s in (fresh, saved))
        differing.append((key, f"{key}: {here} here, {there} in the checkpoint"))
    if differing:
        raise every_rank(
            CheckpointError(
                f"{path} was trained with other settings: {'; '.join(text for _, text in differing)}; "
                "resume with the checkpoint's values, or train in another output_dir"
            )
        )


def relayout_loader_state(saved: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """A training loader position for a new rank layout: batch 0 of the epoch the saved run was in.

    ``saved``: rank 0's state of the old layout (all ranks of a training loader are at the same
    epoch and batch); ``fresh``: ``state_dict()`` of this rank's new, unused loader (for DALI it
    carries no pipeline state, so the pipeline starts fresh). Samples are cut into other parts
    under another number of processes, so no position maps one-to-one; restarting the epoch
    repeats what the ranks had read of it rather than skip what they had not. An epoch that was
    read to its end is not repeated. Settings other than the layout must still match; the
    loader's ``load_state_dict`` refuses the state otherwise, naming the keys."""
    epoch = saved["epoch"] + (saved["batch"] >= epoch_batches(saved["settings"]))
    layout = {key: fresh["settings"][key] for key in ("rank", "world_size")}
    return {**fresh, "settings": {**saved["settings"], **layout}, "epoch": epoch, "batch": 0}


def epoch_batches(settings: dict[str, Any]) -> int:
    """Batches per rank and epoch of a training loader with these settings: deblur.loading.contract's DROP
    policy, ``(N // W) // B``."""
    return (settings["samples"] // settings["world_size"]) // settings["batch_size"]


@dataclass
class Resume:
    """The checkpoint a run resumed from, and what was kept and what was not."""

    path: Path
    report: list[str] = field(default_factory=list)  # the main process prints it


def resume_checkpoint(accelerator: Accelerator, checkpoints: Path, state: RunState) -> Resume | None:
    """Collective: pick the newest checkpoint that verifies, load models, optimizers, scaler and
    RNG states into the prepared objects and everything else into ``state`` (its loader not yet
    used); None for a fresh run (``state`` untouched)."""
    path = agree_on_checkpoint(accelerator, checkpoints)
    if path is None:
        return None
    fresh_loader_state = state.loader.state_dict()
    check_resumable(
        json.loads((path / loader_state_name(0)).read_text())["settings"], fresh_loader_state["settings"], path
    )
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    accelerator.load_state(str(path))  # optimizer states are whole on every rank: any count loads them
    notes = state.load_state_dict(trainer_state, path)
    # The digest of exactly what was written (Accelerate's prepared models in its file order,
    # then the state's tensor files, and the optimizers), for comparing a resumed state with
    # the checkpoint's files.
    models = [accelerator.get_state_dict(m) for m in accelerator._models] + list(state.tensor_files().values())
    digest = state_digest(models, [o.state_dict() for o in accelerator._optimizers])
    step, saved_processes, processes = trainer_state["step"], trainer_state["world_size"], accelerator.num_processes
    what = "models, EMA and optimizers" if len(models) > len(accelerator._models) else "models and optimizers"
    report = [f"resumed from {path} at step {step}; {what} sha256 {digest}", *notes]
    rank = accelerator.process_index
    if saved_processes == processes:
        state.loader.load_state_dict(json.loads((path / loader_state_name(rank)).read_text()))
        return Resume(path, report)
    saved = json.loads((path / loader_state_name(0)).read_text())
    loader_state = relayout_loader_state(saved, fresh_loader_state)
    state.loader.load_state_dict(loader_state)
    again = (
        "that epoch had been read to its end"
        if loader_state["epoch"] > saved["epoch"]
        else "what the ranks had read of it is read again"
    )
    if loader_state["settings"]["backend"] == "dali" and not loader_state["settings"].get("crop"):
        # (The crop loader's order is a function of seed and epoch, deblur.loading.contract.epoch_order.)
        again += "; the DALI pipeline restarts from its seed, so its shuffle is not an uninterrupted run's"
    report += [
        f"the checkpoint was written by {plural(saved_processes, 'process')}, this run has {processes}; kept "
        "exactly: generator, discriminator, both optimizers, the EMA, the learning-rate schedules, the loss "
        "scaler (fp16 runs), step and skip counters",
        f"data position not kept: the ranks were at batch {saved['batch']} of {epoch_batches(saved['settings'])} "
        f"in epoch {saved['epoch']}; every rank now starts epoch {loader_state['epoch']} at batch 0 of its new part "
        f"({again})",
        f"RNG states: {ranks(0, min(saved_processes, processes) - 1)} restored from random_states_<rank>.pkl; "
        + (
            f"those of {ranks(processes, saved_processes - 1)} not used"
            if saved_processes > processes
            else f"none saved for {ranks(saved_processes, processes - 1)}, seeded as at a fresh start"
        ),
    ]
    return Resume(path, report)


def ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def describe(checkpoints: Path) -> tuple[list[str], bool]:
    """Lines listing every checkpoint (step, processes, size, verifies?), and whether the newest verifies."""
    lines, newest_ok = [f"{'checkpoint':<24} {'step':>9} {'procs':>5} {'size':>10}  status"], False
    for step, path in complete_checkpoints(checkpoints):
        problems = verify_checkpoint(path)
        try:
            processes = str(json.loads((path / TRAINER_STATE).read_text())["world_size"])
        except (OSError, ValueError, KeyError):
            processes = "?"
        newest_ok = not problems
        status = "ok" if newest_ok else "DAMAGED: " + "; ".join(problems)
        lines.append(f"{path.name:<24} {step:>9} {processes:>5} {mib(path):>7.1f}MiB  {status}")
    for path in sorted(checkpoints.glob(SET_ASIDE + "*")) if checkpoints.is_dir() else []:
        lines.append(f"{path.name:<24} {'':>9} {'':>5} {mib(path):>7.1f}MiB  set aside as damaged")
    if len(lines) == 1:
        lines.append(f"no checkpoints in {checkpoints}")
    return lines, newest_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deblur.checkpoint",
        description="List a run's checkpoints with step, number of processes, size and whether each verifies "
        "against its manifest. Exit status 1 when the newest does not verify or there is none.",
    )
    parser.add_argument("path", type=Path, help="a run's output_dir, or its checkpoints/ folder")
    args = parser.parse_args(argv)
    checkpoints = args.path / "checkpoints" if (args.path / "checkpoints").is_dir() else args.path
    if not checkpoints.is_dir():
        parser.error(f"{args.path} is not a folder")
    lines, newest_ok = describe(checkpoints)
    print("\n".join(lines))
    return 0 if newest_ok else 1


if __name__ == "__main__":
    sys.exit(main())
