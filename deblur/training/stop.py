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
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}: aborting without saving")
        self.requested = True

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank at the same step once any rank got a signal.

        Called once per step. The all-reduce of this call's flag is read at the next call, so
        the host never waits for the device here; ranks still agree, since each reads the same
        reduction, and a stop comes one step later."""
        previous, flag = self._pending, torch.tensor([float(self.requested)], device=accelerator.device)
        self._pending = DeviceToHost(accelerator.reduce(flag, reduction="sum"))
        return previous is not None and previous.get().item() > 0


class DeviceToHost:
    """A device tensor's copy to the host, started now and waited for only in :meth:`get`."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.host = tensor.detach().to("cpu", non_blocking=True)
        self.ready = None
        if tensor.is_cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def get(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host
