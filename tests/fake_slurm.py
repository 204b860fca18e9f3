"""Stand-ins for Slurm's ``sbatch``, ``srun``, ``scontrol`` and ``scancel`` on one machine, for
testing launch/slurm.sbatch and ``srun`` launches on CPU (tests/test_cluster.py).

    python tests/fake_slurm.py install BIN   # BIN/sbatch, BIN/srun, ... call this file
    FAKE_SLURM_STATE=DIR sbatch --nodes=2 launch/slurm.sbatch ...

They behave as Slurm's do where a training job can tell (Slurm 23.x, src/srun and the man pages):

- ``sbatch`` reads ``#SBATCH`` lines, then its own options (which win); it runs the script in a
  session of its own with the job's SLURM_* variables, writes its output to ``--output``
  (``%x`` job name, ``%j`` job id) truncated at every start of the job unless
  ``--open-mode=append``, and waits for the job to end (as ``sbatch --wait``). A job requeued
  (``scontrol requeue``) starts again with the same id and SLURM_RESTART_COUNT + 1.
  ``--signal=[B:]SIG@SECONDS`` is recorded; ``fake_slurm.py warn JOBID`` delivers it as the time
  limit approaching would: to the batch shell only with ``B:``, else to every process of every
  job step.
- ``srun`` inside a job (or making an allocation of its own outside one) starts ``--ntasks``
  tasks (``--nodes`` x ``--ntasks-per-node`` by default), each in a session of its own, with
  per-task SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURMD_NODENAME and the step's
  SLURM_STEP_* variables. Each "node" is one of FAKE_SLURM_NODES (default 127.0.0.1,
  127.0.0.2...), all on this machine. Tasks are bound to ``--cpus-per-task`` CPUs each (default
  1), which srun takes from its option or SRUN_CPUS_PER_TASK, never from the job's
  --cpus-per-task (Slurm >= 22.05). srun's own SIGTERM, SIGHUP or SIGQUIT ("forcing job
  termination") SIGKILLs every process of the step; SIGINT and any other signal is forwarded to
  every process of the step (Slurm signals a step's whole process tree). With
  ``--kill-on-bad-exit=1`` a task exiting non-zero SIGKILLs the others. Its exit status is the
  highest of the tasks' (128 + signal for a killed one).
- ``scontrol show hostnames LIST`` expands ``127.0.0.[1-2]``-style lists; ``scontrol requeue
  JOB`` marks the job for a restart and terminates it (SIGCONT + SIGTERM to the batch step and
  every step, SIGKILL after FAKE_SLURM_KILL_WAIT seconds, default 5).
- ``scancel --signal=SIG JOB`` signals every process of every step, not the batch shell;
  ``--batch`` the batch shell alone, ``--full`` the batch shell, its children and every step.
  ``scancel JOB`` terminates the job (as requeue does, without the restart).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

COMMANDS = ("sbatch", "srun", "scontrol", "scancel")


def state_dir() -> Path:
    path = Path(os.environ.get("FAKE_SLURM_STATE", "/tmp/fake-slurm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_dir(job: str) -> Path:
    path = state_dir() / "jobs" / job
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_id(name: str, start: int) -> int:
    counter = state_dir() / name
    value = int(counter.read_text()) + 1 if counter.exists() else start
    counter.write_text(str(value))
    return value


def nodes(count: int) -> list[str]:
    names = os.environ.get("FAKE_SLURM_NODES", ",".join(f"127.0.0.{i + 1}" for i in range(8))).split(",")
    if count > len(names):
        sys.exit(f"fake slurm: {count} nodes asked for, FAKE_SLURM_NODES has {len(names)}")
    return names[:count]


def compress(hosts: list[str]) -> str:
    """``127.0.0.1,127.0.0.2`` -> ``127.0.0.[1-2]`` (Slurm's hostlist form, consecutive suffixes)."""
    prefix = os.path.commonprefix(hosts)
    suffixes = [h[len(prefix) :] for h in hosts]
    if len(hosts) > 1 and all(s.isdigit() for s in suffixes):
        return f"{prefix}[{suffixes[0]}-{suffixes[-1]}]"
    return ",".join(hosts)


def expand(hostlist: str) -> list[str]:
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", hostlist):
        match = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not match:
            hosts.append(part)
            continue
        for piece in match.group(2).split(","):
            first, _, last = piece.partition("-")
            width = len(first)
            for n in range(int(first), int(last or first) + 1):
                hosts.append(f"{match.group(1)}{n:0{width}d}")
    return hosts


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def send(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def step_processes(job: str) -> list[psutil.Process]:
    """Every process of every running step: the tasks of each srun and their descendants (not
    srun itself, which runs in the batch step)."""
    found = []
    for record in (job_dir(job) / "steps").glob("*.json"):
        for pid in json.loads(record.read_text())["tasks"]:
            found += tree(pid)
    return found


def batch_step(job: str, children: bool) -> list[psutil.Process]:
    """The batch shell, and with ``children`` its other processes (srun included, its tasks not)."""
    path = job_dir(job) / "batch.pid"
    if not path.exists():
        return []
    shell = tree(int(path.read_text()))
    if not children:
        return shell[:1]
    steps = {p.pid for p in step_processes(job)}
    return [p for p in shell if p.pid not in steps]


def job_processes(job: str) -> list[psutil.Process]:
    """Every process of a job: the batch step (shell, srun...) and every step's."""
    return batch_step(job, children=True) + step_processes(job)


def terminate(everyone: list[psutil.Process]) -> None:
    """Slurm ending a job: SIGCONT and SIGTERM to every process of it, SIGKILL after KillWait."""
    send(everyone, signal.SIGCONT)
    send(everyone, signal.SIGTERM)
    deadline = time.monotonic() + float(os.environ.get("FAKE_SLURM_KILL_WAIT", "5"))
    while time.monotonic() < deadline and any(p.is_running() and p.status() != "zombie" for p in everyone):
        time.sleep(0.1)
    send(everyone, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- sbatch


def sbatch_options(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbatch")
    parser.add_argument("-J", "--job-name")
    parser.add_argument("-N", "--nodes", type=int)
    parser.add_argument("--ntasks-per-node", type=int)
    parser.add_argument("-n", "--ntasks", type=int)
    parser.add_argument("-c", "--cpus-per-task", type=int)
    parser.add_argument("--gpus-per-node")
    parser.add_argument("-t", "--time")
    parser.add_argument("--signal")
    parser.add_argument("--requeue", action="store_true", default=None)
    parser.add_argument("--open-mode", choices=["append", "truncate"])
    parser.add_argument("-o", "--output")
    parser.add_argument("--wait", action="store_true")
    return parser


def sbatch(argv: list[str]) -> int:
    parser = sbatch_options(argv)
    options, rest = parser.parse_known_args(argv)
    script, script_args = Path(rest[0]), rest[1:]
    header = [
        shlex.split(line.strip()[len("#SBATCH") :])[0]
        for line in script.read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    merged = parser.parse_args(header)
    for key, value in vars(options).items():
        if value is not None:
            setattr(merged, key, value)
    job = str(new_id("last_job_id", 4242))
    name = merged.job_name or script.name
    count = merged.nodes or 1
    hosts = nodes(count)
    per_node = merged.ntasks_per_node or 1
    gpus = int(str(merged.gpus_per_node or "0").split(":")[-1])
    signal_spec = merged.signal
    (job_dir(job) / "signal").write_text(signal_spec or "")
    env = {
        **os.environ,
        "SLURM_JOB_ID": job,
        "SLURM_JOBID": job,
        "SLURM_JOB_NAME": name,
        "SLURM_JOB_NODELIST": compress(hosts),
        "SLURM_NODELIST": compress(hosts),
        "SLURM_NNODES": str(count),
        "SLURM_JOB_NUM_NODES": str(count),
        "SLURM_NTASKS": str(merged.ntasks or count * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{count})" if count > 1 else str(per_node),
        "SLURM_SUBMIT_DIR": os.getcwd(),
        "SLURMD_NODENAME": hosts[0],
        "SLURM_CLUSTER_NAME": "fake",
    }
    if merged.cpus_per_task:
        env["SLURM_CPUS_PER_TASK"] = str(merged.cpus_per_task)
    if gpus:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
        env["SLURM_GPUS_PER_NODE"] = str(gpus)
    output = (merged.output or "slurm-%j.out").replace("%x", name).replace("%j", job)
    print(f"Submitted batch job {job}", flush=True)
    status = 0
    for attempt in itertools.count():
        (job_dir(job) / "requeue").unlink(missing_ok=True)
        env["SLURM_RESTART_COUNT"] = str(attempt)
        with open(output, "a" if merged.open_mode == "append" else "w") as log:
            command = ["bash", str(script), *script_args]
            shell = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            (job_dir(job) / "batch.pid").write_text(str(shell.pid))
            status = shell.wait()
        while (job_dir(job) / "terminating").exists():
            time.sleep(0.1)
        if not (job_dir(job) / "requeue").exists() or attempt >= 4:
            break
        if not merged.requeue:
            sys.exit(f"fake sbatch: job {job} requeued without --requeue")
    return 0 if status == 0 else 1


# ---------------------------------------------------------------------------------------------- srun


def srun(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="srun")
    parser.add_argument("-N", "--nodes", type=int)
    parser.add_argument("-n", "--ntasks", type=int)
    parser.add_argument("--ntasks-per-node", type=int)
    parser.add_argument("-c", "--cpus-per-task", type=int)
    parser.add_argument("-K", "--kill-on-bad-exit", type=int, nargs="?", const=1, default=0)
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    if "SLURM_JOB_ID" in os.environ:  # a step of the job this runs in
        job = os.environ["SLURM_JOB_ID"]
        count = options.nodes or int(os.environ["SLURM_NNODES"])
        hosts = expand(os.environ["SLURM_JOB_NODELIST"])[:count]
        per_node = options.ntasks_per_node or int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    else:  # an allocation of its own
        job = str(new_id("last_job_id", 4242))
        count = options.nodes or 1
        hosts = nodes(count)
        per_node = options.ntasks_per_node or -(-(options.ntasks or count) // count)
    tasks = options.ntasks or count * per_node
    layout = [(node, local) for node in range(count) for local in range(per_node)][:tasks]
    cpus_from = "--cpus-per-task" if options.cpus_per_task else "SRUN_CPUS_PER_TASK"
    if not options.cpus_per_task and "SRUN_CPUS_PER_TASK" not in os.environ:
        cpus_from = "default"
    cpus_per_task = options.cpus_per_task or int(os.environ.get("SRUN_CPUS_PER_TASK", "1"))
    step = new_id(f"job-{job}-steps", 0)
    cores = sorted(os.sched_getaffinity(0))
    print(
        f"fake srun: step {job}.{step}: {tasks} tasks on {count} nodes, {cpus_per_task} CPUs per task ({cpus_from})",
        file=sys.stderr,
        flush=True,
    )
    env = {
        **os.environ,
        "SLURM_JOB_ID": job,
        "SLURM_JOBID": job,
        "SLURM_JOB_NODELIST": os.environ.get("SLURM_JOB_NODELIST", compress(hosts)),
        "SLURM_STEP_ID": str(step),
        "SLURM_STEPID": str(step),
        "SLURM_STEP_NODELIST": compress(hosts),
        "SLURM_STEP_NUM_NODES": str(count),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{count})" if count > 1 else str(per_node),
        "SLURM_NTASKS": str(tasks),
        "SLURM_NPROCS": str(tasks),
        "SLURM_NNODES": str(count),
        "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
    }
    if options.cpus_per_task or "SRUN_CPUS_PER_TASK" in os.environ:
        env["SLURM_CPUS_PER_TASK"] = str(cpus_per_task)
    procs = []
    for rank, (node, local) in enumerate(layout):
        first = rank * cpus_per_task
        bound = {cores[(first + i) % len(cores)] for i in range(cpus_per_task)}
        task_env = {
            **env,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node),
            "SLURMD_NODENAME": hosts[node],
        }
        procs.append(
            subprocess.Popen(
                options.command,
                env=task_env,
                start_new_session=True,
                preexec_fn=lambda bound=bound: os.sched_setaffinity(0, bound),
            )
        )
    record = job_dir(job) / "steps" / f"{step}.json"
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps({"srun": os.getpid(), "tasks": [p.pid for p in procs]}))

    def everyone() -> list[psutil.Process]:
        return [q for p in procs for q in tree(p.pid)]

    def on_signal(signum: int, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            print("srun: forcing job termination", file=sys.stderr, flush=True)
            send(everyone(), signal.SIGKILL)
        else:
            send(everyone(), signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, on_signal)
    statuses: dict[int, int] = {}
    while len(statuses) < len(procs):
        for p in procs:
            if p.pid not in statuses and p.poll() is not None:
                statuses[p.pid] = p.returncode if p.returncode >= 0 else 128 - p.returncode
                if statuses[p.pid] != 0 and options.kill_on_bad_exit:
                    print(f"srun: error: task exited with {statuses[p.pid]}: terminating the step", file=sys.stderr)
                    send(everyone(), signal.SIGKILL)
        time.sleep(0.05)
    record.unlink()
    return max(statuses.values())


# ---------------------------------------------------------------------------------------------- scontrol, scancel


def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(expand(argv[2] if len(argv) > 2 else os.environ["SLURM_JOB_NODELIST"])))
        return 0
    if argv[:1] == ["requeue"]:
        job = argv[1]
        doomed = [p for p in job_processes(job) if p.pid != os.getpid()]
        (job_dir(job) / "requeue").touch()
        (job_dir(job) / "terminating").touch()  # sbatch starts the job again once it is gone
        if os.fork() == 0:  # slurmctld terminates the job after answering this command
            os.setsid()
            time.sleep(0.5)
            terminate(doomed)
            (job_dir(job) / "terminating").unlink()
            os._exit(0)
        return 0
    sys.exit(f"fake scontrol: not implemented: {argv}")


def scancel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scancel")
    parser.add_argument("-s", "--signal")
    parser.add_argument("-b", "--batch", action="store_true")
    parser.add_argument("-f", "--full", action="store_true")
    parser.add_argument("job")
    options = parser.parse_args(argv)
    job = options.job.split(".")[0]
    if options.signal is None:
        terminate(job_processes(job))
        return 0
    signum = signal_number(options.signal)
    if options.batch:
        send(batch_step(job, children=False), signum)
    elif options.full:
        send(batch_step(job, children=True) + step_processes(job), signum)
    else:
        send(step_processes(job), signum)
    return 0


def signal_number(name: str) -> int:
    return int(name) if name.isdigit() else signal.Signals["SIG" + name.removeprefix("SIG")].value


def warn(job: str) -> int:
    """The time limit approaching: the job's --signal, as Slurm sends it."""
    spec = (job_dir(job) / "signal").read_text().strip()
    if not spec:
        sys.exit(f"fake slurm: job {job} has no --signal")
    batch_only = spec.startswith("B:")
    signum = signal_number(spec.removeprefix("B:").split("@")[0])
    send(batch_step(job, children=False) if batch_only else step_processes(job), signum)
    return 0


def install(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {name} "$@"\n')
        wrapper.chmod(0o755)


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "install":
        install(Path(rest[0]))
        return 0
    if command == "warn":
        return warn(rest[0])
    return {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel}[command](rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
