"""One report per failure, in a run of many processes.

``launch/train.py`` runs the trainer through :func:`deblur.errors.run_main` with :func:`report`
deciding which process prints a failure's one line:

- Before the process group exists every process runs the same code on the same input (the
  config, the launcher's settings): an :class:`~deblur.errors.InputError` there is printed by the
  main process only; any other error by each process that meets it.
- Setup steps that can fail on one rank and not on another (the output folder, the loaders) run
  inside :func:`together`: afterwards every rank knows whether any rank failed, and all raise
  the same error, which the main process prints (naming the ranks when only some failed).
- Errors that every rank raises by construction (a choice all ranks agreed on, a checkpoint save
  all ranks agreed has failed) are marked with :func:`every_rank` where they are raised; the main
  process prints them.
- Any other error is the rank's own (a corrupt member in its part of the data): that rank prints
  it, as ``error: rank N: ...`` when the run has several (:func:`labelled`).
- A rank whose collective failed because another process died prints nothing: the process that
  failed printed its line, or its launcher reports the signal that killed it.
- An abort (a deliberate second signal, deblur/training/stop.py) prints ``interrupted`` from the
  main process.

Under torch elastic (``torchrun``, ``accelerate launch`` with several processes) every failing
process also writes its line to ``TORCHELASTIC_ERROR_FILE``, so the launcher's failure summary
quotes it (``traceback : error: ...``) instead of ``<N/A>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import TypeVar

import torch.distributed as dist
from tqdm import tqdm

from deblur.errors import DeblurError, Fault, InputError, classify

E = TypeVar("E", bound=BaseException)
_EVERY_RANK = "deblur_every_rank"

# How gloo and NCCL report a collective whose peer process has gone (torch 2.14; gloo's text
# ends "This is typically caused by a remote worker crashing").
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
    "NCCL communicator was aborted",
)


def every_rank(error: E) -> E:
    """Mark ``error`` as raised alike on every rank: only the main process reports it."""
    setattr(error, _EVERY_RANK, True)
    return error


def is_every_rank(error: BaseException) -> bool:
    return bool(getattr(error, _EVERY_RANK, False))


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process of the run died."""
    if isinstance(error, DeblurError):
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in PEER_LOST)


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes: the process group's once it exists,
    the launcher's environment before that."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env:  # srun's tasks, before the trainer maps them
        return int(env.get("SLURM_PROCID", "0")), int(env["SLURM_STEP_NUM_TASKS"])
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def message(error: BaseException) -> tuple[str, int]:
    """The one line :func:`deblur.errors.run_main` would print, without its ``error: ``, and the
    exit status."""
    line, status = classify(error)
    return " ".join(line.removeprefix("error: ").split()), status


def as_error(text: str, status: int) -> DeblurError:
    return InputError(text) if status == InputError.exit_code else Fault(text)


def agree(accelerator, failure: BaseException | None) -> None:
    """Collective: raise on every rank if ``failure`` happened on any rank.

    The error raised is marked :func:`every_rank`: the main process prints it, naming the
    ranks that failed unless all failed the same way. Its exit status is that of the first
    failed rank's error."""
    if accelerator.num_processes == 1:
        if failure is not None:
            raise every_rank(failure)
        return
    from accelerate.utils import gather_object

    mine = None if failure is None else message(failure)
    failed = [(rank, found) for rank, found in enumerate(gather_object([mine])) if found is not None]
    if not failed:
        return
    if len(failed) == accelerator.num_processes and len({text for _, (text, _) in failed}) == 1:
        raise every_rank(failure)  # the same failure everywhere: reported as it is
    text = "; ".join(f"rank {rank}: {text}" for rank, (text, _) in failed)
    raise every_rank(as_error(text, failed[0][1][1])) from failure


@contextlib.contextmanager
def together(accelerator) -> Iterator[None]:
    """Collective: run the block on every rank, then :func:`agree` on whether it failed anywhere.

    The block must not contain collectives itself: a rank that failed before one would leave the
    others waiting in it."""
    failure = None
    try:
        yield
    except Exception as error:  # KeyboardInterrupt (an aborting signal) passes
        failure = error
    agree(accelerator, failure)


@contextlib.contextmanager
def labelled() -> Iterator[None]:
    """Prefix a rank's own error with ``rank N:`` when the run has several processes."""
    try:
        yield
    except Exception as error:
        rank, size = rank_and_size()
        if size == 1 or is_every_rank(error) or peer_lost(error):
            raise
        if not (dist.is_available() and dist.is_initialized()) and isinstance(error, InputError):
            raise  # before the process group: every rank met the same input
        text, status = message(error)
        raise as_error(f"rank {rank}: {text}", status) from error


def report(error: BaseException) -> bool:
    """``run_main``'s ``report``: whether this process prints ``error``'s line (module docstring).

    Also writes the line to the torch elastic error file when the launcher asked for one."""
    rank, _ = rank_and_size()
    line = " ".join(classify(error)[0].split())
    if peer_lost(error):
        line = f"error: stopped: another process of the run failed or was stopped ({message(error)[0]})"
    write_elastic_error_file(line)
    if peer_lost(error):
        return False
    started = dist.is_available() and dist.is_initialized()
    if is_every_rank(error) or isinstance(error, KeyboardInterrupt) or (not started and isinstance(error, InputError)):
        printing = rank == 0
    else:
        printing = True
    if printing:  # end the progress bar's line, so that the error is a line of its own
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    return printing


def write_elastic_error_file(line: str) -> None:
    """Our line in ``TORCHELASTIC_ERROR_FILE``, in the layout torch's ErrorHandler writes: the
    launcher's failure summary shows ``py_callstack`` (here the line, not a traceback) and takes
    the earliest ``timestamp`` for the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump(data, f)
