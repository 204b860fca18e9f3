"""Every standard launcher, and Slurm's preemption path, on CPU (docs/cluster.md's commands).

Slurm runs under stand-ins for sbatch/srun/scontrol/scancel (tests/fake_slurm.py) that behave
as Slurm's do where a training job can tell: srun answers its own SIGTERM with SIGKILL of the
tasks and forwards other signals to every process of the step, ``--signal=B:`` reaches the
batch shell alone, SLURM_* variables are set per task, and two "nodes" are 127.0.0.1 and
127.0.0.2 on this machine. Runs are tiny (tests/runner.py); a few are refused before training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runner import (
    ACCELERATE,
    BIN,
    CHECKPOINT_EVERY,
    ROOT,
    RUN_TIMEOUT,
    STEPS,
    TORCHRUN,
    TRAIN,
    clean_env,
    error_lines,
    finish,
    free_port,
    kill_all,
    launch,
    log_path,
    tiny_run,
    wait_for,
)

FAKE_SLURM = Path(__file__).with_name("fake_slurm.py")


@pytest.fixture
def slurm(tmp_path) -> dict[str, str]:
    """An environment with the stand-in Slurm commands first on PATH."""
    bin_dir = tmp_path / "slurm-bin"
    subprocess.run([sys.executable, str(FAKE_SLURM), "install", str(bin_dir)], check=True)
    return clean_env(
        PATH=f"{bin_dir}:{BIN}:{os.environ['PATH']}",
        FAKE_SLURM_STATE=str(tmp_path / "slurm-state"),
        FAKE_SLURM_KILL_WAIT="5",
    )


def test_the_stand_in_srun_behaves_as_slurms(slurm, tmp_path):
    # Two tasks that report their Slurm variables and the signals they get.
    report = tmp_path / "tasks"
    report.mkdir()
    task = (
        'echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID $SLURM_STEP_NUM_TASKS $SLURMD_NODENAME" > '
        f'{report}/$SLURM_PROCID; trap "echo USR1 >> {report}/$SLURM_PROCID" USR1; '
        "while true; do sleep 0.1; done"
    )
    proc = subprocess.Popen(
        ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", task], env=slurm, start_new_session=True
    )
    try:
        for rank in (0, 1):
            wait_for(report / str(rank), proc, timeout=30)
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # forwarded to every process of the step
        deadline = time.monotonic() + 10
        while not all("USR1" in (report / str(rank)).read_text() for rank in (0, 1)):
            assert time.monotonic() < deadline, "srun did not forward SIGUSR1"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # "forcing job termination": SIGKILL of every task
        assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    finally:
        kill_all(proc)
    assert [(report / str(rank)).read_text().splitlines()[0] for rank in (0, 1)] == [
        "0 0 0 2 127.0.0.1",
        "1 0 1 2 127.0.0.2",
    ]


def test_slurm_saves_before_the_time_limit_requeues_and_resumes(slurm, tiny_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "slurm-deblur-%j.out"
    overrides = tiny_run(tiny_shards, out, "train.record_batches=false")[2:]  # the script passes --config
    cmd = ["sbatch", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={log}", "launch/slurm.sbatch"]
    proc = subprocess.Popen(
        [*cmd, *overrides],
        cwd=ROOT,
        env={**slurm, "CONFIG": "configs/demo.yaml"},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        job = proc.stdout.readline().split()[-1]  # "Submitted batch job 4242"
        wait_for(out / "checkpoints" / f"step-{CHECKPOINT_EVERY:07d}", proc)
        # The time limit approaches: --signal=B:USR1@180 reaches the batch shell alone.
        subprocess.run([sys.executable, str(FAKE_SLURM), "warn", job], env=slurm, check=True)
        assert proc.wait(timeout=RUN_TIMEOUT) == 0
    finally:
        kill_all(proc)
    text = Path(str(log).replace("%j", job)).read_text()
    first, _, second = text.partition("attempt 2:")
    assert "attempt 1:" in first and second, text[-3000:]  # both attempts' output, appended
    assert "2 nodes x 1 processes, 1 CPUs per node" in first and ":29500" not in first  # a free port
    assert "2 tasks on 2 nodes, 1 CPUs per task (SRUN_CPUS_PER_TASK)" in first  # srun got the job's CPUs
    assert "processes: 2 (nodes 2), started by accelerate launch" in first
    # Each node's process on its one bound core, whatever OMP_NUM_THREADS accelerate launch set.
    assert "threads: 1 per process (auto: 1 usable core / 1 process on them)" in first
    assert "got SIGUSR1: asking the training processes to save" in first
    assert "forcing job termination" not in text and "aborting" not in text
    saved = re.findall(r"stop signal: saved .*/step-(\d+);", first)
    assert len(saved) == 1, first[-3000:]  # printed once, not once per node
    stopped_at = int(saved[0])
    assert CHECKPOINT_EVERY <= stopped_at < STEPS
    assert "requeueing job" in first
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:07d}'} at step {stopped_at}" in second
    assert json.loads((out / "metrics.json").read_text())["step"] == STEPS


def test_plain_srun_with_one_task_per_process(slurm, tiny_shards, tmp_path):
    out = tmp_path / "srun"
    cmd = ["srun", "--ntasks=2", sys.executable, str(TRAIN), *tiny_run(tiny_shards, out, "train.max_steps=4")]
    proc = launch(cmd, out, slurm)
    text = finish(proc, out)
    assert proc.returncode == 0, text[-3000:]
    assert "processes: 2 (nodes 1), started by srun" in text
    assert "threads: 1 per process (auto: 1 usable core" in text  # srun binds each task to a CPU
    assert json.loads((out / "metrics.json").read_text())["replica_param_sha256"][0] is not None


def test_torchrun_on_two_nodes(tiny_shards, tmp_path):
    # Two torchrun agents, one per "node", as on two machines (both on 127.0.0.1 here).
    out, port = tmp_path / "torchrun", free_port()
    procs = [
        launch(
            [
                str(TORCHRUN),
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(TRAIN),
                *tiny_run(tiny_shards, out, "train.max_steps=2", "train.record_batches=false"),
            ],
            out,
        )
        for node in (0, 1)
    ]
    texts = [finish(proc, out) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], texts[-1][-3000:]
    assert texts[-1].count("processes: 2 (nodes 2), started by torchrun") == 1
    assert json.loads((out / "metrics.json").read_text())["step"] == 2


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        (["--num_processes", "2"], "accelerate launch --num_processes 2 says 2 processes"),
        (["--config_file", "MULTI_CPU"], "num_processes: 2 in the accelerate config file"),
    ],
)
def test_accelerate_launch_that_would_start_one_process_is_refused(tiny_shards, tmp_path, launcher, expected):
    if launcher[-1] == "MULTI_CPU":  # what `accelerate config` writes for several CPU processes
        config = tmp_path / "multi-cpu.yaml"
        config.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\n"
            "num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\n"
        )
        launcher = ["--config_file", str(config)]
    out = tmp_path / "refused"
    cmd = [str(ACCELERATE), "launch", "-q", *launcher, str(TRAIN), *tiny_run(tiny_shards, out)]
    proc = launch(cmd, out, clean_env())
    text = finish(proc, out)
    assert proc.returncode != 0
    [line] = error_lines(text)
    assert line.startswith(f"error: {expected}") and "accelerate launch --multi_gpu --num_processes 2" in line
    assert "Traceback" not in text and not out.exists()  # refused before touching anything


def test_python_inside_a_slurm_job_of_several_tasks_is_refused(tiny_shards, tmp_path):
    out = tmp_path / "batch-step"
    env = clean_env(SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1")
    proc = launch([sys.executable, str(TRAIN), *tiny_run(tiny_shards, out)], out, env)
    text = finish(proc, out)
    assert proc.returncode == 2, text[-3000:]
    assert error_lines(text) == [
        "error: SLURM_NTASKS=2 says 2 processes but the run has only this one: this is one process started "
        "without srun inside a Slurm job; start one per task with srun python launch/train.py --config ..., "
        "or submit launch/slurm.sbatch"
    ]
    assert not out.exists() and not log_path(out).read_text().count("Traceback")
