"""Who started this process, how many processes the run should have, and which settings the user
chose (as opposed to values a launcher filled in).

Launchers put values of their own into the environment of the processes they start, and some of
them were never chosen by the user: ``accelerate launch`` always sets ACCELERATE_MIXED_PRECISION
(``no`` when not given) and OMP_NUM_THREADS (``1`` when not given), ``torchrun`` sets
OMP_NUM_THREADS=1 for several processes per node. So when this process's parent is a launcher
(``accelerate launch``, ``torchrun``, found from ``/proc/<parent>/cmdline``), the user's
settings are read from the launcher's own environment (``/proc/<parent>/environ``: the
environment the launcher was started with, which its own changes do not alter) and from its
command line and config file; otherwise (``python``, ``srun``) this process's environment is
the user's.

Supported ways to start a run (docs/cluster.md): ``python`` (one process), ``accelerate
launch`` (flags or an ``accelerate config`` file, one or many machines), ``torchrun`` (one or
many nodes), ``srun`` with one task per process (the Slurm variables become torch's:
:func:`srun_environment`), and ``launch/slurm.sbatch``. A run whose environment asks for more
processes than it got is refused with a message saying how to launch it
(:meth:`Launch.refuse_fewer_processes`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deblur.errors import InputError

PROC = Path("/proc")
ACCELERATE = "accelerate launch"
TORCHRUN = "torchrun"
SRUN = "srun"
PYTHON = "python"
# Variables a torch launcher sets in every process it starts: the layout is the launcher's.
TORCH_LAYOUT = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    """How this process was started.

    ``launcher``: one of ACCELERATE, TORCHRUN, SRUN, PYTHON. ``user_env``: the environment the
    user gave (the launcher's own when a launcher started us). ``accelerate``: the parsed
    ``accelerate launch`` command line, and ``accelerate_config`` the config file it read."""

    launcher: str
    user_env: Mapping[str, str]
    accelerate: argparse.Namespace | None = None
    accelerate_config: tuple[Path, object] | None = None
    notes: list[str] = field(default_factory=list)

    def user_value(self, name: str) -> str | None:
        return self.user_env.get(name)

    def accelerate_setting(self, name: str) -> tuple[str, str] | None:
        """``(value, where it came from)`` of an ``accelerate launch`` setting the user gave: a
        flag on its command line, else a key of its config file; None otherwise."""
        if self.accelerate is None:
            return None
        if name in getattr(self.accelerate, "nondefault", ()) and getattr(self.accelerate, name, None) is not None:
            value = getattr(self.accelerate, name)
            return str(value), f"accelerate launch --{name} {value}"
        if self.accelerate_config is not None:
            path, config = self.accelerate_config
            value = getattr(config, name, None)
            if name == "dynamo_backend":
                value = (getattr(config, "dynamo_config", None) or {}).get("dynamo_backend")
            if value is not None:
                return str(value), f"{name}: {value} in the accelerate config file {path}"
        return None

    def mixed_precision(self) -> tuple[str, str] | None:
        """The precision the user asked the launcher or the environment for, and where."""
        chosen = self.accelerate_setting("mixed_precision")
        if chosen is None and (value := self.user_value("ACCELERATE_MIXED_PRECISION")):
            chosen = value, f"ACCELERATE_MIXED_PRECISION={value} in the environment"
        return chosen

    def dynamo_backend(self) -> tuple[str, str] | None:
        chosen = self.accelerate_setting("dynamo_backend")
        if chosen is None and (value := self.user_value("ACCELERATE_DYNAMO_BACKEND")):
            chosen = value, f"ACCELERATE_DYNAMO_BACKEND={value} in the environment"
        return chosen

    def threads(self) -> tuple[int, str] | None:
        """Threads per process the user set: OMP_NUM_THREADS, or accelerate's
        ``--num_cpu_threads_per_process``."""
        chosen = self.accelerate_setting("num_cpu_threads_per_process")
        if chosen is None and (value := self.user_value("OMP_NUM_THREADS")):
            chosen = value, f"OMP_NUM_THREADS={value} in the environment"
        if chosen is None:
            return None
        try:
            count = int(chosen[0])
        except ValueError:
            raise InputError(f"{chosen[1]}: expected a whole number of threads") from None
        if count < 1:
            raise InputError(f"{chosen[1]}: expected at least 1 thread")
        return count, chosen[1]

    def expected_processes(self, env: Mapping[str, str]) -> tuple[int, str] | None:
        """How many processes the environment or the launcher's settings say the run has, and
        which setting says so; None when nothing says more than one."""
        found = []
        if self.accelerate is not None:
            chosen = self.accelerate_setting("num_processes")
            if chosen is not None and int(chosen[0]) > 1:
                found.append((int(chosen[0]), chosen[1]))
        for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
                found.append((int(env[name]), f"{name}={env[name]}"))
        if self.launcher == PYTHON and "SLURM_JOB_ID" in env and env.get("SLURM_NTASKS", "1").isdigit():
            tasks = int(env.get("SLURM_NTASKS", "1"))
            if tasks > 1:
                found.append((tasks, f"SLURM_NTASKS={tasks}"))
        return max(found, default=None)

    def refuse_fewer_processes(self, processes: int, env: Mapping[str, str] = os.environ) -> None:
        """Raise InputError, saying how to launch, when the run got fewer processes than asked for."""
        expected = self.expected_processes(env)
        if expected is None or expected[0] <= processes:
            return
        count, source = expected
        got = "only this one" if processes == 1 else f"only {processes}"
        if self.launcher == ACCELERATE:
            how = (
                "accelerate launch starts one process unless it is given --multi_gpu (or distributed_type: "
                "MULTI_GPU in its config file; MULTI_CPU needs mpirun), on machines without GPUs too; launch "
                f"with: accelerate launch --multi_gpu --num_processes {count} launch/train.py --config ..."
            )
        elif source.startswith("SLURM_NTASKS"):
            how = (
                "this is one process started without srun inside a Slurm job; start one per task with "
                "srun python launch/train.py --config ..., or submit launch/slurm.sbatch"
            )
        else:
            how = (
                "start the processes with torchrun --nproc_per_node N, accelerate launch --multi_gpu "
                "--num_processes N, or srun (one task per process)"
            )
        raise InputError(f"{source} says {count} processes but the run has {got}: {how}")


def detect(env: Mapping[str, str] = os.environ, ppid: int | None = None) -> Launch:
    """The launcher that started this process and the settings the user gave it."""
    ppid = os.getppid() if ppid is None else ppid
    argv = read_proc(ppid, "cmdline")
    parent = [a.decode(errors="replace") for a in argv.split(b"\0") if a] if argv else []
    launcher, rest = parent_launcher(parent)
    if launcher is None:
        return Launch(SRUN if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env else PYTHON, dict(env))
    own = read_proc(ppid, "environ")
    notes = []
    if own is None:  # not readable: fall back on ours, which may hold the launcher's values
        user_env = dict(env)
        notes.append(f"could not read the environment of the launcher (pid {ppid}); using this process's")
    else:
        user_env = dict(item.decode(errors="replace").partition("=")[::2] for item in own.split(b"\0") if item)
    if launcher != ACCELERATE:
        return Launch(launcher, user_env, notes=notes)
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(rest)
    except SystemExit:  # not a command line we understand: judge by the environment alone
        return Launch(launcher, user_env, notes=notes)
    return Launch(launcher, user_env, parsed, accelerate_config(parsed, user_env), notes)


def parent_launcher(argv: list[str]) -> tuple[str | None, list[str]]:
    """(ACCELERATE or TORCHRUN, the arguments after ``accelerate launch``) when ``argv`` is one
    of those launchers' command lines, else (None, [])."""
    names = [Path(arg).name for arg in argv]
    for i, name in enumerate(names):
        if name == "accelerate" and names[i + 1 : i + 2] == ["launch"]:
            return ACCELERATE, argv[i + 2 :]
        if name == "accelerate-launch" or (name == "-m" and argv[i + 1 : i + 2] == ["accelerate.commands.launch"]):
            return ACCELERATE, argv[i + 1 + (name == "-m") :]
        if name == "torchrun" or (
            name == "-m" and argv[i + 1 : i + 2] in (["torch.distributed.run"], ["torch.distributed.launch"])
        ):
            return TORCHRUN, []
    return None, []


def accelerate_config(parsed: argparse.Namespace, user_env: Mapping[str, str]) -> tuple[Path, object] | None:
    """The config file ``accelerate launch`` read, as it decides: ``--config_file``, else its
    default file when it exists and ``--cpu`` was not given."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file

    path = parsed.config_file or (default_config_file if not parsed.cpu else None)
    if path is None or not os.path.isfile(path):
        return None
    try:
        return Path(path), load_config_from_file(path)
    except Exception as error:  # the launcher read it already; a file it rejects never gets here
        raise InputError(f"accelerate config file {path}: {error}") from None


def read_proc(pid: int, name: str) -> bytes | None:
    try:
        return (PROC / str(pid) / name).read_bytes()
    except OSError:
        return None


def srun_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torch's variables (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
    MASTER_ADDR, MASTER_PORT) for a process that ``srun`` started as one of several tasks with no
    torch launcher in between; {} otherwise.

    The rendezvous is rank 0's node, the first of SLURM_STEP_NODELIST, on MASTER_PORT if set,
    else the step's first reserved port (SLURM_STEP_RESV_PORTS, with MpiParams=ports), else a
    port derived from the job and step ids: every task computes the same one without talking."""
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env or any(k in env for k in TORCH_LAYOUT):
        return {}
    tasks = int(env["SLURM_STEP_NUM_TASKS"])
    if tasks < 2:
        return {}
    node = int(env.get("SLURM_NODEID", "0"))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(tasks)))
    port = env.get("MASTER_PORT") or env.get("SLURM_STEP_RESV_PORTS", "").split("-")[0].split(",")[0]
    if not port:
        job, step = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0") or 0)
        port = str(20000 + (job * 7 + step) % 20000)
    return {
        "WORLD_SIZE": str(tasks),
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(per_node[node] if node < len(per_node) else 1),
        "GROUP_RANK": str(node),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST", "")),
        "MASTER_PORT": port,
    }


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise InputError(f"SLURM_STEP_TASKS_PER_NODE={spec}: not Slurm's count(xN),... format")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (``node[01-04],gpu7``), as ``scontrol`` expands it."""
    if not nodelist:
        raise InputError("SLURM_STEP_NODELIST is not set: set MASTER_ADDR to rank 0's host")
    if not re.search(r"[\[,]", nodelist):
        return nodelist
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise InputError(f"SLURM_STEP_NODELIST={nodelist}: scontrol is not on PATH to expand it; set MASTER_ADDR")
    result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        raise InputError(f"scontrol show hostnames {nodelist}: {result.stderr.strip() or 'no hosts'}; set MASTER_ADDR")
    return hosts[0]
