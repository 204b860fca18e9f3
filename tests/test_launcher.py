"""Which launcher started a process and what the user asked it for (deblur/training/launcher.py),
and the precedence of settings: the config > the launcher or the environment > auto
(deblur/training/hardware.py, tracking.py). In process; the real launchers run in
test_cluster.py and test_train.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from deblur.errors import InputError
from deblur.training import launcher
from deblur.training.hardware import resolve_compile, resolve_precision, resolve_threads
from deblur.training.tracking import resolve_wandb_mode

ACCELERATE = [sys.executable, "/venv/bin/accelerate", "launch"]
SCRIPT = ["launch/train.py", "--config", "configs/demo.yaml"]
CPU = torch.device("cpu")


def fake_parent(tmp_path: Path, monkeypatch, argv: list[str], environ: dict[str, str]) -> int:
    """A /proc/<pid>/{cmdline,environ} of a parent process; returns its pid."""
    pid = 4242
    folder = tmp_path / "proc" / str(pid)
    folder.mkdir(parents=True)
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (folder / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in environ.items()) + b"\0")
    monkeypatch.setattr(launcher, "PROC", tmp_path / "proc")
    return pid


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        ([*ACCELERATE, "--multi_gpu", *SCRIPT], (launcher.ACCELERATE, ["--multi_gpu", *SCRIPT])),
        ([sys.executable, "/venv/bin/accelerate-launch", *SCRIPT], (launcher.ACCELERATE, SCRIPT)),
        ([sys.executable, "-m", "accelerate.commands.launch", *SCRIPT], (launcher.ACCELERATE, SCRIPT)),
        ([sys.executable, "/venv/bin/torchrun", "--nproc_per_node", "2", *SCRIPT], (launcher.TORCHRUN, [])),
        ([sys.executable, "-m", "torch.distributed.run", *SCRIPT], (launcher.TORCHRUN, [])),
        (["/bin/bash"], (None, [])),
    ],
)
def test_the_parent_launcher_is_recognised(argv, found):
    assert launcher.parent_launcher(argv) == found


def test_accelerates_own_values_are_told_apart_from_the_users(tmp_path, monkeypatch):
    # accelerate launch put OMP_NUM_THREADS=1 and ACCELERATE_MIXED_PRECISION=no into our
    # environment; the user gave neither: the launcher's own environment has neither.
    ours = {"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no", "HOME": "/home/u"}
    pid = fake_parent(tmp_path, monkeypatch, [*ACCELERATE, *SCRIPT], {"HOME": "/home/u"})
    launch = launcher.detect(ours, ppid=pid)
    assert launch.launcher == launcher.ACCELERATE
    assert launch.mixed_precision() is None and launch.threads() is None


def test_the_users_launcher_flags_and_environment_are_found(tmp_path, monkeypatch):
    argv = [*ACCELERATE, "--mixed_precision", "bf16", "--num_cpu_threads_per_process", "3", *SCRIPT]
    pid = fake_parent(tmp_path, monkeypatch, argv, {"OMP_NUM_THREADS": "4"})
    launch = launcher.detect({"OMP_NUM_THREADS": "3"}, ppid=pid)
    assert launch.mixed_precision() == ("bf16", "accelerate launch --mixed_precision bf16")
    assert launch.threads() == (3, "accelerate launch --num_cpu_threads_per_process 3")  # the flag beats the env
    pid = fake_parent(tmp_path / "2", monkeypatch, [*ACCELERATE, *SCRIPT], {"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert launcher.detect({}, ppid=pid).mixed_precision() == (
        "fp16",
        "ACCELERATE_MIXED_PRECISION=fp16 in the environment",
    )


def test_an_accelerate_config_file_counts_as_the_users_choice(tmp_path, monkeypatch):
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: bf16\n"
        "num_machines: 1\nnum_processes: 2\nuse_cpu: true\n"
    )
    pid = fake_parent(tmp_path, monkeypatch, [*ACCELERATE, "--config_file", str(config), *SCRIPT], {})
    launch = launcher.detect({}, ppid=pid)
    assert launch.mixed_precision() == ("bf16", f"mixed_precision: bf16 in the accelerate config file {config}")
    # MULTI_CPU without mpirun: accelerate launch started one process where the file says two.
    with pytest.raises(InputError) as error:
        launch.refuse_fewer_processes(1, {})
    message = str(error.value)
    assert message.startswith(f"num_processes: 2 in the accelerate config file {config} says 2 processes")
    assert "accelerate launch --multi_gpu --num_processes 2 launch/train.py" in message
    launch.refuse_fewer_processes(2, {"WORLD_SIZE": "2"})  # as many as asked for: fine


def test_python_in_a_slurm_job_of_several_tasks_is_told_to_use_srun(tmp_path, monkeypatch):
    pid = fake_parent(tmp_path, monkeypatch, ["/bin/bash"], {})
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
    launch = launcher.detect(env, ppid=pid)
    assert launch.launcher == launcher.PYTHON and launch.user_env == env  # no launcher: ours is the user's
    with pytest.raises(InputError, match="SLURM_NTASKS=4 says 4 processes .* srun python launch/train.py"):
        launch.refuse_fewer_processes(1, env)
    launch.refuse_fewer_processes(1, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})


def test_a_process_of_plain_srun_gets_torchs_variables():
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "3",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
        "SLURM_STEP_NODELIST": "gpu07",
    }
    mapped = launcher.srun_environment(env)
    assert mapped == {
        "WORLD_SIZE": "7",
        "RANK": "5",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + (1234 * 7 + 3) % 20000),  # the same on every task
    }
    assert launcher.srun_environment({**env, "SLURM_STEP_RESV_PORTS": "12000-12003"})["MASTER_PORT"] == "12000"
    assert launcher.srun_environment({**env, "MASTER_PORT": "29999"})["MASTER_PORT"] == "29999"
    # A torch launcher inside the task (launch/slurm.sbatch), or a single task: nothing to map.
    assert launcher.srun_environment({**env, "WORLD_SIZE": "16", "RANK": "0", "LOCAL_RANK": "0"}) == {}
    assert launcher.srun_environment({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    assert launcher.tasks_per_node("4,2(x2)") == [4, 2, 2]
    with pytest.raises(InputError, match="SLURM_STEP_TASKS_PER_NODE"):
        launcher.tasks_per_node("two")


def test_precision_precedence_names_the_source_and_what_it_overrode():
    auto, why = resolve_precision("auto", CPU)
    assert why.startswith("auto: ")
    other = "fp16" if auto != "fp16" else "bf16"
    flag = (other, f"accelerate launch --mixed_precision {other}")
    value, why = resolve_precision("auto", CPU, flag)
    assert value == other and why.startswith(flag[1] + f"; auto would pick {auto}: ")
    assert resolve_precision("auto", CPU, (auto, "x"))[1] == "x"  # the same value as auto: nothing overridden
    assert resolve_precision("no", CPU, flag) == ("no", f"train.mixed_precision=no in the config, overriding {flag[1]}")
    with pytest.raises(InputError, match="fp8"):
        resolve_precision("auto", CPU, ("fp8", "accelerate launch --mixed_precision fp8"))


def test_compile_precedence():
    assert resolve_compile("auto", CPU)[0] is False
    assert resolve_compile("auto", CPU, ("inductor", "accelerate launch --dynamo_backend inductor")) == (
        True,
        "accelerate launch --dynamo_backend inductor",
    )
    assert resolve_compile(False, CPU, ("inductor", "--dynamo_backend inductor"))[1].endswith(
        "overriding --dynamo_backend inductor"
    )
    with pytest.raises(InputError, match="inductor"):
        resolve_compile("auto", CPU, ("aot_eager", "accelerate launch --dynamo_backend aot_eager"))


def test_threads_precedence():
    assert resolve_threads(None, 8, 2, None) == (4, "auto: 8 usable cores / 2 processes on them")
    assert resolve_threads(None, 1, 3, None) == (1, "auto: 1 usable core / 3 processes on them")
    user = (6, "OMP_NUM_THREADS=6 in the environment")
    assert resolve_threads(None, 8, 2, user) == (
        6,
        "OMP_NUM_THREADS=6 in the environment; auto would use 4: 8 usable cores / 2 processes on them",
    )
    assert resolve_threads(2, 8, 2, user)[1].startswith("train.threads=2 in the config, overriding OMP_NUM_THREADS=6")


def test_wandb_mode_precedence_and_a_safe_default():
    assert resolve_wandb_mode("auto", {})[0] == "offline"  # never online unless asked: nodes may have no network
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "online"}) == ("online", "WANDB_MODE=online in the environment")
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "dryrun"})[0] == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_DISABLED": "true"})[0] == "disabled"
    assert resolve_wandb_mode("online", {"WANDB_MODE": "disabled"}) == (
        "online",
        "wandb.mode=online in the config, overriding WANDB_MODE=disabled in the environment",
    )
    with pytest.raises(InputError, match="WANDB_MODE=sometimes"):
        resolve_wandb_mode("auto", {"WANDB_MODE": "sometimes"})
