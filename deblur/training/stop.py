"""Stopping on a signal: SIGTERM, SIGINT and SIGUSR1 only set a flag, and all ranks stop at
the same step, save a checkpoint and exit.

The rule for repeated signals: every signal within ``REPEAT_WINDOW_S`` (3 s) of the first is the
same request, however many come and of whichever kind, because clusters deliver several: Slurm
signals every process of a job step and the launcher (torch elastic, ``accelerate launch``)
forwards its own copy a moment later; a terminal's Ctrl-C reaches the whole foreground process
group. A signal that comes later than that is deliberate and aborts at once, without saving
(a second Ctrl-C when saving hangs; ``kill -9`` always works too). The first signal prints when
and how to abort.

SIGUSR1 is the signal ``launch/slurm.sbatch`` sends ahead of the time limit: launchers do not
forward it and it is ignored in their processes there, so only the training processes act on it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 3.0


class StopRequest:
    """SIGTERM/SIGINT/SIGUSR1 only set a flag; the loop acts on it at a step boundary (module
    docstring: the rule for repeated signals).

    ``announce``: print the first signal's message (the main process). Processes forked from
    this one (DataLoader workers) keep the signals' previous behaviour, except that SIGUSR1 is
    ignored there: it is meant for the trainer, and its default action would kill the worker."""

    def __init__(self, announce: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.requested = False
        self.first: tuple[str, float] | None = None
        self._announce = announce
        self._clock = clock
        self._pid = os.getpid()
        self._pending: DeviceToHost | None = None
        self._flag: torch.Tensor | None = None  # this rank's flag, on the device
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if os.getpid() != self._pid:  # a forked child, e.g. a DataLoader worker
            if signum != signal.SIGUSR1:
                signal.signal(signum, self._previous[signum])
                os.kill(os.getpid(), signum)
            return
        now = self._clock()
        if self.first is None:
            self.first, self.requested = (name, now), True
            if self._announce:
                # os.write, not print: a handler may run in the middle of another write to stderr.
                os.write(
                    2,
                    f"\n{name}: saving a checkpoint at the next step, then stopping; signals within "
                    f"{REPEAT_WINDOW_S:.0f} s count as this one, a later one aborts without saving\n".encode(),
                )
            return
        since = now - self.first[1]
        if since <= REPEAT_WINDOW_S:
            return  # the same request, delivered again (by the scheduler, the launcher, the terminal)
        raise KeyboardInterrupt(f"{name} {since:.0f} s after {self.first[0]}: aborting without saving")

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank at the same step once any rank got a signal.

        Called once per step: one all-reduce (sum) of a one-element flag, the step's only
        collective besides DDP's gradient all-reduce. Its result is copied to the host without
        waiting and read at the next call, so the host never waits for the device here (the
        copy was started a whole step earlier); ranks still agree, since each reads the same
        reduction, and a stop comes one step later. The flag is a device tensor made once and
        refilled, so no call builds a tensor from host data."""
        if self._flag is None:
            self._flag = torch.zeros(1, device=accelerator.device)
        self._flag.fill_(float(self.requested))
        previous, self._pending = self._pending, DeviceToHost(accelerator.reduce(self._flag, reduction="sum"))
        return previous is not None and previous.get()[0] > 0


class DeviceToHost:
    """A device tensor's copy to the host, started now and waited for only in :meth:`get`: the
    trainer's one deliberate host read per step (tests/test_host_transfers.py tells it from any
    other by these methods)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.host = tensor.detach().to("cpu", non_blocking=True)
        self.ready = None
        if tensor.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def get(self) -> list:
        """The tensor's values as a (nested) list, once the copy is done."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()
