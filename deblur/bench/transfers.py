"""Counting the host<->device traffic a piece of code asks for, on any device, the CPU included.

    with HostTransfers() as transfers:
        gan.step(batches)
    transfers.counts   # Counter: kind -> operations;  transfers.sites: kind -> Counter of file:line

On a CPU every tensor is on the host, so a transfer cannot be told by the devices involved; it is
told by the operation, as a GPU would execute it (a torch function mode sees the Python calls, a
dispatch mode the aten operators):

- ``from_host``: a tensor built from Python or NumPy data (``aten.lift_fresh``: ``torch.tensor``,
  ``as_tensor``, ``new_tensor`` of a list; ``torch.from_numpy``). On a GPU: a copy from pageable
  host memory, which waits until everything queued on the stream has run.
- ``host_factory``: a tensor factory (``torch.arange``, ``zeros``, ``full``, ...) called without a
  ``device``: on a GPU machine it makes a host tensor, which the step then copies to the device.
- ``host_read``: the host reads a device value (``aten._local_scalar_dense``: ``.item()``,
  ``bool``/``float``/``int`` of a tensor, ``if tensor:``; ``.tolist()``, ``.numpy()``): waits
  for the device to get there.
- ``move``: ``.cpu()``, ``.cuda()``, ``.pin_memory()``, or ``.to()``/``.copy_()`` between
  different devices (the last can only show on a machine with two kinds of device).
- ``data_dependent``: operators whose output size depends on the data (``nonzero``,
  ``masked_select``, ``unique``, indexing with a boolean mask, ``repeat_interleave`` without
  ``output_size``): CUDA copies the size to the host and waits for it.
- ``deliberate``: any of these issued inside :class:`deblur.training.stop.DeviceToHost`, the
  trainer's copy to the host that is started one step before it is read.

Modes run the code eagerly (torch.compile does not trace under a dispatch mode), so compiled code
is counted as its eager equivalent. What this cannot see: transfers made inside C++ or CUDA
libraries without an operator (a GPU's ``torch.cuda.set_sync_debug_mode`` sees those; the GPU
benchmark reports both).
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._python_dispatch import TorchDispatchMode

from deblur.training.stop import DeviceToHost

KINDS = ("from_host", "host_factory", "host_read", "move", "data_dependent", "deliberate")
UNEXPECTED = KINDS[:-1]  # everything but the deliberate copy

_FACTORIES = {
    f"torch.{name}"
    for name in (
        "arange",
        "empty",
        "eye",
        "full",
        "linspace",
        "logspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "range",
        "scalar_tensor",
        "zeros",
    )
}
_FROM_HOST_CALLS = {"torch.from_numpy", "torch.frombuffer"}
_READ_CALLS = {"torch.Tensor.tolist", "torch.Tensor.numpy"}
_MOVE_CALLS = {"torch.Tensor.cpu", "torch.Tensor.cuda", "torch.Tensor.pin_memory"}
_FROM_HOST_OPS = {"aten.lift_fresh", "aten.lift_fresh_copy"}
_READ_OPS = {"aten._local_scalar_dense"}
_DATA_DEPENDENT_OPS = {
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.masked_scatter",
}
_COLLECTIVE_NAMESPACES = ("c10d.", "_c10d_functional.")
_DELIBERATE_CODE = {DeviceToHost.__init__.__code__, DeviceToHost.get.__code__}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # deblur/
_PROJECT_DIR = os.path.dirname(os.path.dirname(_PACKAGE_DIR)) + os.sep


def _device_of(value) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, torch.Tensor):
        return value.device
    return None


def _moves_between_devices(name: str, args: tuple, kwargs: dict) -> bool:
    """``Tensor.to(...)`` / ``Tensor.copy_(src)`` across devices of different type or index."""
    if not args or not isinstance(args[0], torch.Tensor):
        return False
    here = args[0].device
    if name == "torch.Tensor.to":
        targets = [kwargs.get("device"), *args[1:2]]
    elif name == "torch.Tensor.copy_":
        targets = args[1:2]
    else:
        return False
    devices = [d for d in map(_device_of, targets) if d is not None]
    return any(
        d.type != here.type or (d.index is not None and here.index is not None and d.index != here.index)
        for d in devices
    )


class HostTransfers:
    """Context manager: counts host<->device operations by kind (module doc) while active, and
    where each kind came from (``path:line`` of the innermost frame in the deblur package, else of
    the innermost one outside torch), and the collectives."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.sites: dict[str, Counter[str]] = defaultdict(Counter)
        # collectives (c10d operators, DDP's gradient all-reduce included): "op at site" -> count
        self.collectives: Counter[str] = Counter()
        self._modes = (_Functions(self), _Operators(self))

    def __enter__(self) -> HostTransfers:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def unexpected(self) -> int:
        return sum(self.counts[kind] for kind in UNEXPECTED)

    def record(self, kind: str) -> None:
        site, deliberate = _site()
        kind = "deliberate" if deliberate else kind
        self.counts[kind] += 1
        self.sites[kind][site] += 1

    def record_collective(self, name: str) -> None:
        self.collectives[f"{name} at {_site()[0]}"] += 1

    def report(self) -> str:
        """One line per kind seen: count and sites."""
        return "\n".join(
            f"{kind}: {self.counts[kind]} at {dict(self.sites[kind])}" for kind in KINDS if self.counts[kind]
        )


def _short(filename: str) -> str:
    """A path relative to the project root (deblur/...), or to its site-packages folder."""
    if filename.startswith(_PROJECT_DIR):
        return os.path.relpath(filename, _PROJECT_DIR)
    return filename.split(f"site-packages{os.sep}")[-1]


def _site() -> tuple[str, bool]:
    """(where the operation came from: the innermost frame in the deblur package, else the
    innermost outside torch, as "path:line"; whether it was issued inside DeviceToHost)."""
    frame, inner, ours, deliberate = sys._getframe(2), None, None, False
    while frame is not None:
        code = frame.f_code
        deliberate = deliberate or code in _DELIBERATE_CODE
        filename = code.co_filename
        if filename != __file__ and not filename.startswith(_TORCH_DIR):
            where = f"{_short(filename)}:{frame.f_lineno}"
            inner = inner or where
            if ours is None and filename.startswith(_PACKAGE_DIR):
                ours = where
        frame = frame.f_back
    return ours or inner or "?", deliberate


class _Functions(TorchFunctionMode):
    def __init__(self, owner: HostTransfers) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or ""
        if name in _FACTORIES and kwargs.get("device") is None and kwargs.get("out") is None:
            self.owner.record("host_factory")
        elif name in _FROM_HOST_CALLS:
            self.owner.record("from_host")
        elif name in _READ_CALLS:
            self.owner.record("host_read")
        elif name in _MOVE_CALLS or _moves_between_devices(name, args, kwargs):
            self.owner.record("move")
        return func(*args, **kwargs)


class _Operators(TorchDispatchMode):
    def __init__(self, owner: HostTransfers) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)  # e.g. "aten._local_scalar_dense"
        if name.startswith(_COLLECTIVE_NAMESPACES):
            self.owner.record_collective(name)
        elif name in _FROM_HOST_OPS:
            self.owner.record("from_host")
        elif name in _READ_OPS:
            self.owner.record("host_read")
        elif name in _DATA_DEPENDENT_OPS or _data_dependent(func, args, kwargs or {}):
            self.owner.record("data_dependent")
        return func(*args, **(kwargs or {}))


def _data_dependent(func, args: tuple, kwargs: dict) -> bool:
    name = str(func.overloadpacket)
    if name == "aten.index":  # x[mask] with a boolean mask
        return any(i is not None and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
    if name == "aten.repeat_interleave":  # repeats given as a tensor, without output_size
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    return False
