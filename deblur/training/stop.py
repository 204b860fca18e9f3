"""Stopping on a signal: SIGTERM/SIGINT only set a flag, and all ranks stop at the same step."""

from __future__ import annotations

import signal
from typing import Any

import torch
from accelerate import Accelerator


class StopRequest:
    """SIGTERM/SIGINT only set a flag; the loop acts on it at a step boundary.

    A second signal aborts at once (e.g. Ctrl-C twice when a rank hangs), without saving.
    """

    def __init__(self) -> None:
        self.requested = False
        self._pending: DeviceToHost | None = None
        self._flag: torch.Tensor | None = None  # this rank's flag, on the device
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: aborting without saving")
        self.requested = True

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
