"""Starting the real trainer from tests: the tiny run's overrides, a clean environment, free
ports, waiting, and killing a launcher with every process it started.

Used by test_train.py (DDP runs through ``accelerate launch``), test_train_failures.py (one
line per failure, the output_dir lock, disk full) and test_cluster.py (torchrun, srun, the
Slurm script under stand-in Slurm commands).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ACCELERATE = BIN / "accelerate"
TORCHRUN = BIN / "torchrun"
TRAIN = ROOT / "launch" / "train.py"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
STEPS = 12
CHECKPOINT_EVERY = 4
RUN_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(shards: Path, out: Path, *overrides: str) -> list[str]:
    """``--config`` and overrides of a tiny CPU run (batch 2, STEPS steps); later overrides win."""
    return [
        "--config",
        str(DEMO_CONFIG),
        f"data.shards={shards}",
        f"output_dir={out}",
        "data.batch_size=2",
        "data.flip=false",
        "data.workers=1",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.keep_checkpoints=2",
        "train.log_every=1",
        f"train.eval_every={STEPS}",
        "train.record_batches=true",
        # A learning rate that changes every step (and the EMA, on by default), so that resuming
        # shows whether both continue exactly.
        "optim.schedule=cosine",
        "optim.warmup_steps=2",
        "wandb.mode=disabled",
        *overrides,
    ]


def accelerate_launch(processes: int = 2, *flags: str) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes (a free port), up to launch/train.py."""
    launcher = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return [
        str(ACCELERATE),
        "launch",
        *launcher,
        *flags,
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(TRAIN),
    ]


def clean_env(**changes: str | None) -> dict[str, str]:
    """This environment without the settings a user might have that tests must not inherit
    (W&B's mode, thread counts, accelerate's CPU switch), with ``changes`` applied (None
    removes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    for name in ("WANDB_MODE", "WANDB_DISABLED", "OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION"):
        env.pop(name, None)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def log_path(out: Path) -> Path:
    return out.parent / f"{out.name}.log"


def launch(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own; its output is appended to out/../<out.name>.log."""
    log = open(log_path(out), "a")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env or clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, out: Path, timeout: float = RUN_TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_all(proc)
    return log_path(out).read_text()


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (workers run in sessions of their own)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def error_lines(log: str) -> list[str]:
    """The ``error: ...`` (and ``internal error: ...``) lines our processes printed; the
    launchers' failure summaries quote them indented, after ``traceback :``."""
    lines = log.replace("\r", "\n").splitlines()
    return [line for line in lines if line.startswith(("error: ", "internal error: "))]


def trainers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes (launch/train.py) under a launcher, oldest first; not the
    DataLoader workers they fork (same command line, a trainer as parent)."""

    def is_trainer(p: psutil.Process) -> bool:
        try:
            return any(arg.endswith("launch/train.py") for arg in p.cmdline())
        except psutil.NoSuchProcess:
            return False

    found = [p for p in psutil.Process(proc.pid).children(recursive=True) if is_trainer(p)]
    pids = {p.pid for p in found}
    return sorted((p for p in found if p.ppid() not in pids), key=lambda p: p.create_time())
