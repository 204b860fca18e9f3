"""The trainer end to end: 2-process DDP on CPU (gloo) over the real loader and tiny shards.

Every run goes through the real entry point, exactly as a user starts it (no
ACCELERATE_USE_CPU, no thread settings: tests/runner.py):
    accelerate launch --multi_gpu --num_processes 2 launch/train.py --config ...
Runs are tiny (batch 2 per process, 12 steps) so the whole file takes a couple of minutes. The
resume-on-another-size test also launches one process (``--num_processes 1``); the checkpoint
tests start from copies of the reference run's checkpoints to stay short.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from runner import (
    CHECKPOINT_EVERY,
    STEPS,
    accelerate_launch,
    clean_env,
    error_lines,
    finish,
    kill_all,
    launch,
    tiny_run,
    trainers,
    wait_for,
)
from safetensors import safe_open
from safetensors.torch import load_file

from deblur.models import Discriminator, Generator
from deblur.shard.build import build_shards
from deblur.shard.format import manifest_split
from deblur.shard.settings import BuildSettings
from deblur.training.checkpoint import state_digest, verify_checkpoint
from deblur.training.config import load_config
from deblur.training.schedule import lr_factor


def start(
    shards: Path, out: Path, *overrides: str, processes: int = 2, flags: tuple[str, ...] = (), **env: str | None
) -> subprocess.Popen:
    """Start a CPU run through accelerate launch (2 processes unless told; ``flags``: more of its
    flags), as a user would: no ACCELERATE_USE_CPU, no thread settings. Output goes to
    out/../<out.name>.log (appended)."""
    cmd = [*accelerate_launch(processes, *flags), *tiny_run(shards, out, *overrides)]
    return launch(cmd, out, clean_env(**env))


def run(shards: Path, out: Path, *overrides: str, processes: int = 2, **env: str | None) -> str:
    proc = start(shards, out, *overrides, processes=processes, **env)
    text = finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    return text


def batches(out: Path, rank: int) -> dict[tuple[int, int], dict]:
    """(step, update) -> record; a replayed step (after SIGKILL) overwrites its first record."""
    rows = [json.loads(line) for line in (out / f"batches-rank{rank}.jsonl").read_text().splitlines()]
    return {(r["step"], r["update"]): r for r in rows}


def generator_weights(out: Path, name: str = "generator.safetensors") -> dict[str, torch.Tensor]:
    return load_file(out / name)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


FINAL_WEIGHTS = ("generator.safetensors", "generator_raw.safetensors", "discriminator.safetensors")


def assert_same_outputs(out: Path, reference: Path) -> None:
    """The same final weights (EMA, raw G, D) and, at every step both logged, the same learning
    rates: a resumed run continued the EMA and the schedules exactly."""
    for name in FINAL_WEIGHTS:
        assert_same_weights(generator_weights(out, name), generator_weights(reference, name))
    here, there = learning_rates(out), learning_rates(reference)
    assert here and all(here[step] == there[step] for step in here), (here, there)


def learning_rates(out: Path) -> dict[int, tuple[float, float]]:
    """step -> (G's, D's learning rate of that step), from log.jsonl (a replayed step: its last row)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: (r["lr/generator"], r["lr/discriminator"]) for r in rows if "lr/generator" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards) -> Path:
    """One uninterrupted run that the other tests compare against."""
    out = tmp_path_factory.mktemp("train") / "reference"
    run(tiny_shards, out, "wandb.mode=offline")  # exercises the W&B tracker without a network
    return out


def test_run_writes_its_outputs(reference, tiny_shards):
    metrics = json.loads((reference / "metrics.json").read_text())
    # Evaluation measures every image, none dropped to even out the ranks' batches.
    assert metrics["step"] == STEPS and metrics["images"] == manifest_split(tiny_shards, "test")[1]
    val_rows = [r for r in map(json.loads, (reference / "log.jsonl").read_text().splitlines()) if "val/images" in r]
    # 10 val images, 2 processes, batch 2: parts of 5, so a dropped remainder would leave 8.
    assert [r["val/images"] for r in val_rows] == [manifest_split(tiny_shards, "val")[1]] == [10]
    for key in ("psnr_restored", "ssim_restored", "psnr_blurred", "ssim_blurred"):
        assert metrics[key] is not None and metrics[key] == metrics[key]
    assert 10 < metrics["psnr_blurred"] < 40 and 0 < metrics["ssim_blurred"] < 1

    with safe_open(reference / "generator.safetensors", framework="pt") as f:
        assert f.metadata()["residual"] == "true" and f.metadata()["image_size"] == "64"
        # The EMA of G (on by default), its 3 updates per step counted; the raw G beside it.
        assert f.metadata()["weights"] == "ema" and f.metadata()["ema_updates"] == str(3 * STEPS)
    with safe_open(reference / "generator_raw.safetensors", framework="pt") as f:
        assert f.metadata()["weights"] == "raw" and f.metadata()["step"] == str(STEPS)
    generator = Generator(residual=True)
    generator.load_state_dict(generator_weights(reference))  # strict: every key, right shapes
    generator.load_state_dict(generator_weights(reference, "generator_raw.safetensors"))
    Discriminator().load_state_dict(generator_weights(reference, "discriminator.safetensors"))
    assert metrics["weights"] == "ema" and metrics["raw"]["images"] == metrics["images"]
    assert metrics["raw"]["psnr_restored"] != metrics["psnr_restored"]  # two generators, each scored
    assert [r["val_raw/images"] for r in val_rows] == [10]
    # The learning rates of every step: warm-up (2 steps), then cosine decay, G's and D's alike.
    lrs = learning_rates(reference)
    base = load_config(reference / "config.yaml").optim
    for step, (g_lr, d_lr) in lrs.items():
        factor = lr_factor(step - 1, "cosine", 2, STEPS)
        assert g_lr == pytest.approx(base.g_lr * factor) and d_lr == pytest.approx(base.d_lr * factor), step

    cfg = load_config(reference / "config.yaml")
    assert cfg.train.max_steps == STEPS and cfg.output_dir == reference
    # keep_checkpoints=2: only the last two survive; each one complete.
    kept = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert kept == [f"step-{STEPS - CHECKPOINT_EVERY:07d}", f"step-{STEPS:07d}"]
    last = reference / "checkpoints" / f"step-{STEPS:07d}"
    for name in (
        "model.safetensors",
        "model_1.safetensors",
        "optimizer.bin",
        "optimizer_1.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "loader-rank0.json",
        "loader-rank1.json",
        "ema.safetensors",
        "config.yaml",
        "trainer.json",
    ):
        assert (last / name).is_file(), name
    trainer = json.loads((last / "trainer.json").read_text())
    assert trainer["step"] == STEPS and trainer["ema"] == {"decay": 0.999, "updates": 3 * STEPS}
    assert trainer["lr_schedules"]["generator"]["last_epoch"] == STEPS
    assert_same_weights(load_file(last / "ema.safetensors"), generator_weights(reference))
    assert (reference / "samples" / f"step-{STEPS:07d}.png").is_file()
    log = (reference.parent / f"{reference.name}.log").read_text()
    assert "precision: " in log and "compile: off" in log  # the choices are logged, with reasons
    # CPU DDP without ACCELERATE_USE_CPU; each process takes its share of the 2 cores although
    # accelerate launch set OMP_NUM_THREADS=1; W&B's mode as configured.
    assert "processes: 2 (nodes 1), started by accelerate launch" in log
    assert f"threads: {max(1, len(os.sched_getaffinity(0)) // 2)} per process (auto: " in log
    assert "wandb: offline (wandb.mode=offline in the config)" in log
    assert "Warning" not in log, log  # no FutureWarning/UserWarning spam (e.g. DDP's broadcast_buffers)
    assert "done: " in log and "restored PSNR" in log and "{" not in log.split("done: ")[1].splitlines()[0]


def test_wandb_run_lives_in_the_output_dir(reference):
    runs = list((reference / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # main process only
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    assert b"max_consecutive_skips" in records[0].read_bytes()  # the resolved config is in the run
    assert b"resolved" in records[0].read_bytes()  # with what auto chose
    assert b"processes" in records[0].read_bytes() and b"nodes" in records[0].read_bytes()
    assert list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))  # the sample grid


def test_replicas_hold_identical_parameters(reference):
    hashes = json.loads((reference / "metrics.json").read_text())["replica_param_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]


def test_ranks_see_disjoint_data(reference):
    rank0, rank1 = batches(reference, 0), batches(reference, 1)
    assert len(rank0) == len(rank1) == STEPS * 4  # 1 D + 3 G updates per step
    epochs = {r["epoch"] for r in rank0.values()}
    assert len(epochs) >= 2  # the run crosses epoch boundaries
    for epoch in epochs:
        seen = [[h for r in records.values() if r["epoch"] == epoch for h in r["sharp"]] for records in (rank0, rank1)]
        assert len(set(seen[0])) == len(seen[0]) and len(set(seen[1])) == len(seen[1])  # no repeats in an epoch
        assert not set(seen[0]) & set(seen[1])


def test_losses_fall_when_overfitting(tiny_photo_folder, tmp_path):
    # Four training pairs, two per rank and batch: every update sees the same images, so the
    # SSIM loss must fall steadily and D must learn to tell restored from sharp.
    shards = tmp_path / "four"
    manifest = build_shards(
        BuildSettings(
            src=tiny_photo_folder,
            out=shards,
            val_fraction=0.05,
            test_fraction=0,
            shard_size=8,
            workers=1,
            limit=5,
            progress=False,
        )
    )
    # The hash split of these five keys puts one in val: fewer val images than processes.
    assert [manifest["splits"][s]["samples"] for s in ("train", "val", "test")] == [4, 1, 0]
    out = tmp_path / "overfit"
    run(shards, out, "train.max_steps=15", "optim.g_lr=1e-3", "train.checkpoint_every=100")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "g/ssim_loss" in r]
    assert len(train_rows) == 15
    ssim_loss = [r["g/ssim_loss"] for r in train_rows]
    d_loss = [r["d/loss"] for r in train_rows]
    assert sum(ssim_loss[-3:]) / 3 < 0.8 * ssim_loss[0], ssim_loss
    assert sum(d_loss[-3:]) / 3 < 0.5 * d_loss[0], d_loss
    assert all(r["skips/total"] == 0 for r in train_rows)
    assert all(r["perf/images_per_s"] > 0 and 0 <= r["perf/data_wait_fraction"] <= 1 for r in train_rows)
    # One val image for two processes: rank 0 has no batch yet joins the reduce (no hang), and
    # the image is measured at both evaluations (steps 12 and 15).
    assert [r["val/images"] for r in rows if "val/images" in r] == [1, 1]
    # No test split: metrics.json says so instead of inventing numbers.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 0 and metrics["psnr_restored"] is None


def test_sigterm_saves_a_checkpoint_and_the_rerun_matches(reference, tiny_shards, tmp_path):
    # What a cluster delivers: Slurm signals every process of the job step (the workers, W&B's
    # service process...), then the launcher forwards its own copy to each worker half a second
    # later. One request: save and stop; W&B's service dying with the rest ends nothing.
    out = tmp_path / "sigterm"
    proc = start(tiny_shards, out, "wandb.mode=offline")
    wait_for(out / "checkpoints" / f"step-{CHECKPOINT_EVERY:07d}", proc)
    assert len(trainers(proc)) == 2
    for process in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both workers
    log = finish(proc, out)
    assert "stop signal: saved" in log and "aborting" not in log, log[-3000:]
    assert log.count("SIGTERM: saving a checkpoint at the next step") == 1  # the main process says it once
    assert "internal error" not in log and not error_lines(log)
    assert not (out / "generator.safetensors").exists()  # stopped early, not finished
    saved = sorted((out / "checkpoints").iterdir())
    assert all(p.name.startswith("step-") for p in saved)  # nothing half-written is visible
    stopped_at = json.loads((saved[-1] / "trainer.json").read_text())["step"]
    assert CHECKPOINT_EVERY <= stopped_at < STEPS

    log = run(tiny_shards, out, "wandb.mode=offline")
    assert f"resumed from {saved[-1]} at step {stopped_at}" in log
    assert_same_outputs(out, reference)
    for rank in (0, 1):
        assert batches(out, rank) == batches(reference, rank)
    # One W&B run across the restart: each attempt's offline folder carries the saved run id,
    # and `wandb sync <all of them>` uploads them in order into that run (tracking.py).
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)


def test_sigterm_with_the_torch_loader_saves_too(tiny_shards, tmp_path):
    # Slurm signals every process of the step, the DataLoader worker processes too (SIGTERM on
    # preemption, SIGUSR1 before the time limit): they must leave it to the trainer instead of
    # dying and crashing the rank before it can save. Then the launcher forwards its own copy.
    out = tmp_path / "sigterm-torch"
    proc = start(tiny_shards, out, "data.loader=torch", "data.workers=2", flags=("--mixed_precision", "no"))
    wait_for(out / "checkpoints" / f"step-{CHECKPOINT_EVERY:07d}", proc)
    for signum in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):
        workers = []
        while not workers:  # the torch backend starts its workers afresh every epoch
            workers = [p for trainer in trainers(proc) for p in trainer.children(recursive=True)]
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.send_signal(signum)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    log = finish(proc, out)
    assert "stop signal: saved" in log and "killed by signal" not in log, log[-4000:]
    # The launcher's flag is the user's choice: it wins over auto, and the log says so.
    assert "precision: no (accelerate launch --mixed_precision no" in log
    saved = sorted((out / "checkpoints").iterdir())
    assert (saved[-1] / "trainer.json").is_file() and (saved[-1] / "loader-rank1.json").is_file()


def test_sigkill_after_a_checkpoint_then_rerun_matches(reference, tiny_shards, tmp_path):
    out = tmp_path / "sigkill"
    proc = start(tiny_shards, out)
    wait_for(out / "checkpoints" / f"step-{CHECKPOINT_EVERY:07d}", proc)
    kill_all(proc)
    log = run(tiny_shards, out)
    assert "resumed from" in log
    assert_same_outputs(out, reference)
    for rank in (0, 1):
        assert batches(out, rank) == batches(reference, rank)


def test_non_finite_losses_stop_every_rank_with_a_clear_error(tiny_shards, tmp_path):
    # An absurd learning rate blows the generator up after its first update; from then on
    # every loss is non-finite, all ranks skip together, and the run stops after 3 in a row.
    out = tmp_path / "nan"
    proc = start(tiny_shards, out, "optim.g_lr=1e30", "train.max_consecutive_skips=3")
    log = finish(proc, out)
    assert proc.returncode != 0
    # Every rank stops on the same agreed verdict: one line, printed by the main process.
    [line] = error_lines(log)
    assert line.startswith("error: by step") and "3 updates in a row had a non-finite loss" in line, log[-3000:]
    assert "train.max_consecutive_skips=3" in log and "internal error" not in log


def saved_state_digest(checkpoint: Path) -> str:
    """The digest of the models, the EMA and the optimizers as stored in a checkpoint's files."""
    models = [load_file(checkpoint / name) for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors")]
    optimizers = [torch.load(checkpoint / name) for name in ("optimizer.bin", "optimizer_1.bin")]
    return state_digest(models, optimizers)


def test_a_damaged_checkpoint_is_set_aside_and_the_run_replays_from_the_previous_one(reference, tiny_shards, tmp_path):
    # What a node crash can leave on a filesystem that never got the data: the newest
    # checkpoint's weights cut short. The rerun names the file, keeps it aside, and resumes
    # from the one before, replaying the same batches to the same weights.
    out = tmp_path / "damaged"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / f"step-{STEPS:07d}"
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    log = run(tiny_shards, out)
    assert f"checkpoint {newest} is damaged: model.safetensors has 1000 bytes" in log
    assert f"set aside as corrupt-step-{STEPS:07d}" in log
    previous = out / "checkpoints" / f"step-{STEPS - CHECKPOINT_EVERY:07d}"
    assert f"resumed from {previous} at step {STEPS - CHECKPOINT_EVERY}" in log
    assert (out / "checkpoints" / f"corrupt-step-{STEPS:07d}" / "model.safetensors").stat().st_size == 1000
    assert verify_checkpoint(newest) == []  # saved again by the resumed run
    assert_same_outputs(out, reference)
    for rank in (0, 1):
        replayed = batches(out, rank)
        assert replayed == {key: batches(reference, rank)[key] for key in replayed}


def test_resume_on_one_process_then_on_two(reference, tiny_shards, tmp_path):
    # A 2-process checkpoint resumed by 1 process, whose checkpoint is then resumed by 2: the
    # models and optimizers loaded are the saved ones (digest logged at resume = digest of the
    # files), the data restarts at the start of the epoch, and both runs train to the end.
    out = tmp_path / "resized"
    start_step = STEPS - CHECKPOINT_EVERY
    two = reference / "checkpoints" / f"step-{start_step:07d}"
    shutil.copytree(two, out / "checkpoints" / two.name)
    loader = json.loads((two / "loader-rank0.json").read_text())

    log = run(tiny_shards, out, processes=1)
    assert (
        f"resumed from {out / 'checkpoints' / two.name} at step {start_step}; "
        f"models, EMA and optimizers sha256 {saved_state_digest(two)}" in log
    )
    assert "written by 2 processes, this run has 1" in log
    per_rank = loader["settings"]["samples"] // 2 // 2  # two ranks, batch 2
    assert (
        f"the ranks were at batch {loader['batch']} of {per_rank} in epoch {loader['epoch']}; "
        f"every rank now starts epoch {loader['epoch']} at batch 0" in log
    )
    assert "RNG states: rank 0 restored from random_states_<rank>.pkl; those of rank 1 not used" in log
    one = out / "checkpoints" / f"step-{STEPS:07d}"
    assert json.loads((one / "trainer.json").read_text())["world_size"] == 1
    assert json.loads((out / "metrics.json").read_text())["step"] == STEPS
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "g/loss" in r] == list(range(start_step + 1, STEPS + 1))
    # The schedules continue on one process as on two: the same rate at every step.
    assert learning_rates(out) == {step: learning_rates(reference)[step] for step in range(start_step + 1, STEPS + 1)}
    trainer = json.loads((one / "trainer.json").read_text())
    assert trainer["ema"]["updates"] == 3 * STEPS  # the EMA continued from its count

    log = run(tiny_shards, out, f"train.max_steps={STEPS + CHECKPOINT_EVERY}")
    assert f"resumed from {one} at step {STEPS}; models, EMA and optimizers sha256 {saved_state_digest(one)}" in log
    assert "written by 1 process, this run has 2" in log
    assert "none saved for rank 1, seeded as at a fresh start" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == STEPS + CHECKPOINT_EVERY
    assert metrics["replica_param_sha256"][0] == metrics["replica_param_sha256"][1]


def test_init_from_a_run_starts_at_step_0_from_its_weights_and_a_rerun_resumes_instead(
    reference, tiny_shards, tmp_path
):
    # Fine-tuning from the reference run's output_dir at a negligible learning rate (Adam moves a
    # weight by about lr per update): the new run's G and D are the reference's final ones.
    out = tmp_path / "finetune"
    still = ("optim.g_lr=1e-12", "optim.d_lr=1e-12", "train.checkpoint_every=1", "train.eval_every=100")
    log = run_one_process(tiny_shards, out, f"train.init_from={reference}", "train.max_steps=1", *still)
    assert (
        f"initialized from {reference / 'generator.safetensors'} (generator and its EMA) and "
        f"{reference / 'discriminator.safetensors'} (discriminator): weights only, new optimizers, step 0" in log
    )
    assert "resumed from" not in log
    trainer = json.loads((out / "checkpoints" / "step-0000001" / "trainer.json").read_text())
    assert trainer["step"] == 1 and trainer["ema"]["updates"] == 3  # step 0, EMA and schedules anew
    for name in ("generator.safetensors", "generator_raw.safetensors"):  # G and its EMA started at the EMA
        assert_same_weights(generator_weights(out, name), generator_weights(reference))
    d_weights = {k for k in Discriminator().state_dict() if k.endswith(("weight", "bias"))}  # not BN statistics
    d_out, d_reference = (generator_weights(run, "discriminator.safetensors") for run in (out, reference))
    assert_same_weights({k: d_out[k] for k in d_weights}, {k: d_reference[k] for k in d_weights})

    log = run_one_process(tiny_shards, out, f"train.init_from={reference}", "train.max_steps=2", *still)
    assert f"resumed from {out / 'checkpoints' / 'step-0000001'} at step 1" in log
    assert f"train.init_from ({reference}) not used: resuming this run's own checkpoint" in log
    assert "initialized from" not in log


def test_with_no_checkpoint_that_verifies_every_rank_stops_with_one_clear_error(reference, tiny_shards, tmp_path):
    out = tmp_path / "none-verifies"
    saved = reference / "checkpoints" / f"step-{STEPS:07d}"
    shutil.copytree(saved, out / "checkpoints" / saved.name)
    damaged = bytearray((saved / "optimizer.bin").read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    (out / "checkpoints" / saved.name / "optimizer.bin").write_bytes(damaged)
    proc = start(tiny_shards, out)
    log = finish(proc, out)
    assert proc.returncode != 0
    [line] = error_lines(log)
    assert line.startswith(f"error: no checkpoint in {out / 'checkpoints'} verifies")
    assert "optimizer.bin does not match its sha256 in manifest.json" in log
    aside = out / "checkpoints" / f"corrupt-step-{STEPS:07d}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [aside.name]  # nothing deleted
    assert (aside / "optimizer.bin").read_bytes() == damaged
    assert not (out / "log.jsonl").exists()  # no step was trained


def run_one_process(shards: Path, out: Path, *overrides: str) -> str:
    """A 1-process run; returns only what this run logged (the log file is appended to)."""
    log_file = out.parent / f"{out.name}.log"
    before = len(log_file.read_text()) if log_file.exists() else 0
    return run(shards, out, "train.record_batches=false", *overrides, processes=1)[before:]


def test_checkpoints_resume_across_the_compile_switch(tiny_shards, tmp_path):
    # Eager for 2 steps, compiled from 2 to 3, eager again from 3 to 4: every resume loads the
    # other mode's checkpoint with strict keys, and the result matches a plain eager run up to
    # compiled-kernel rounding (fp32, so that rounding is small). A constant learning rate: each
    # resume here raises train.max_steps, which would stretch a decaying schedule.
    steps = ("train.checkpoint_every=1", "train.keep_checkpoints=5", "train.mixed_precision=no", "train.eval_every=100")
    steps += ("optim.schedule=constant", "optim.warmup_steps=0")
    reference = tmp_path / "eager"
    log = run_one_process(tiny_shards, reference, "train.max_steps=4", "train.compile=false", *steps)
    # accelerate launch sets OMP_NUM_THREADS=1 for its one process; the trainer uses the cores.
    cores = len(os.sched_getaffinity(0))
    if cores > 1:
        assert f"threads: {cores} per process (auto: {cores} usable cores / 1 process on them; " in log
        assert "replaces OMP_NUM_THREADS=1 set by accelerate launch)" in log
    out = tmp_path / "switch"
    run_one_process(tiny_shards, out, "train.max_steps=2", "train.compile=false", *steps)
    log = run_one_process(tiny_shards, out, "train.max_steps=3", "train.compile=true", *steps)
    assert "compile: on" in log and "at step 2" in log
    Generator().load_state_dict(generator_weights(out))  # a compiled run's generator.safetensors, strict keys
    log = run_one_process(tiny_shards, out, "train.max_steps=4", "train.compile=false", *steps)
    assert "compile: off" in log and "at step 3" in log

    # Weights: Adam moves a weight by up to lr per update whatever the gradient's size, so
    # kernel rounding on tiny gradients shows as ~lr differences; the losses and the restored
    # images are the meaningful comparison.
    def rows(run):
        return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "g/loss" in r}

    for step in (3, 4):
        for key in ("g/loss", "g/ssim_loss", "d/loss"):
            assert rows(out)[step][key] == pytest.approx(rows(reference)[step][key], rel=1e-3), (step, key)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    restored = []
    for run in (out, reference):
        generator = Generator()
        generator.load_state_dict(generator_weights(run))
        with torch.no_grad():
            restored.append(generator(x))
    torch.testing.assert_close(restored[0], restored[1], atol=2e-3, rtol=0)
