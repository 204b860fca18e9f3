"""Which torch device a command runs on when none is given."""

from __future__ import annotations

import torch

from deblur.errors import InputError


def resolve_device(device: torch.device | str | None) -> torch.device:
    """None -> the process's current CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_option(value: str | None, option: str = "--device") -> torch.device:
    """A command's ``--device`` value (None = :func:`resolve_device`'s default), refused with one
    line naming the option when torch does not know it or this machine does not have it."""
    if value is None:
        return resolve_device(None)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"{option}: {value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", lambda: False)()
        count = getattr(backend, "device_count", lambda: 1)() if available else 0
        if not available or (device.index is not None and device.index >= count):
            raise InputError(f"{option}: {value!r} is not available on this machine ({count} {device.type} devices)")
    return resolve_device(device)
