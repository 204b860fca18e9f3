"""What the hardware is good at: the precision and compile settings that ``auto`` resolves to.

Measured on 2026-11-29 (BENCHMARKS.md, "Training step"):
- bf16 only pays where there are bf16 matrix units. On an H200 bf16 autocast is the fast path;
  on a Xeon with AMX, bf16 + channels_last trains ~3x faster than fp32; on a Xeon with AVX-512
  but no bf16 instructions, bf16 ran at half the fp32 speed (oneDNN emulates it).
- torch.compile bought 1.3x on the H200 but nothing on 2-core CPUs, where it also costs 30-50 s
  of compilation per process before the first step.

Each function returns the resolved value and a sentence saying why, which the trainer logs.
Precedence, the same for every setting: a value written in the config > what the user gave the
launcher or the environment (deblur.training.launcher tells those apart from values a launcher
filled in by itself) > ``auto``; the reason names where the value came from and what it
overrode.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from deblur.errors import InputError

# /proc/cpuinfo flags of x86 bf16 matrix/dot-product units: AMX tiles, or AVX-512 BF16.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not available."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


PRECISIONS = ("no", "bf16", "fp16")


def auto_precision(device: torch.device) -> tuple[str, str]:
    """What ``auto`` picks on ``device``, and why."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "no", f"auto: {torch.cuda.get_device_name(device)} has no bf16 support, fp32"
    if device.type == "cpu":
        units = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
        if units:
            return "bf16", f"auto: the CPU has bf16 matrix units ({', '.join(units)})"
        return "no", "auto: the CPU has no bf16 units (neither amx_bf16 nor avx512_bf16), fp32 is faster there"
    return "no", f"auto: no bf16 rule for device type {device.type!r}, fp32"


def resolve_precision(setting: str, device: torch.device, launcher: tuple[str, str] | None = None) -> tuple[str, str]:
    """``train.mixed_precision`` -> (Accelerate's value "no" | "bf16" | "fp16", reason).

    Precedence: a value in the config > ``launcher``, the precision the user gave the launcher
    or the environment (``accelerate launch --mixed_precision``, its config file,
    ACCELERATE_MIXED_PRECISION) with where it came from > ``auto``. The reason names the source
    and any value it overrode."""
    if setting != "auto":
        why = f"train.mixed_precision={setting} in the config"
        if launcher is not None and launcher[0] != setting:
            why += f", overriding {launcher[1]}"
        return setting, why
    if launcher is None:
        return auto_precision(device)
    value, source = launcher
    if value not in PRECISIONS:
        raise InputError(f"{source}: this trainer supports mixed precision {', '.join(PRECISIONS)}, not {value!r}")
    auto, why = auto_precision(device)
    return value, source + ("" if value == auto else f"; auto would pick {auto}: {why.removeprefix('auto: ')}")


def resolve_compile(
    setting: bool | str, device: torch.device, launcher: tuple[str, str] | None = None
) -> tuple[bool, str]:
    """``train.compile`` -> (compile the models?, reason). Precedence as for the precision: the
    config > the launcher's dynamo backend (``accelerate launch --dynamo_backend``; the models are
    compiled in place with torch.compile's inductor, so ``no`` and ``inductor`` are the values
    understood) > ``auto``."""
    if setting != "auto":
        why = f"train.compile={str(setting).lower()} in the config"
        if launcher is not None and (launcher[0].lower() != "no") != bool(setting):
            why += f", overriding {launcher[1]}"
        return bool(setting), why
    if launcher is not None:
        value, source = launcher
        if value.lower() not in ("no", "inductor"):
            raise InputError(f"{source}: the trainer compiles with inductor; use no or inductor, or set train.compile")
        return value.lower() == "inductor", source
    if device.type == "cuda":
        return True, "auto: CUDA device, torch.compile on"
    return False, f"auto: torch.compile off on {device.type} (no gain measured there, 30-50 s to compile)"


def resolve_threads(
    setting: int | None, usable: int, sharing: int, launcher: tuple[int, str] | None
) -> tuple[int, str]:
    """Compute threads per process (torch.set_num_threads) -> (count, reason).

    ``usable``: the cores this process may run on; ``sharing``: the run's processes on them.
    Precedence: ``train.threads`` in the config > the threads the user gave the launcher or the
    environment (OMP_NUM_THREADS, ``--num_cpu_threads_per_process``) > ``auto``, the process's
    share ``usable // sharing``, whatever OMP_NUM_THREADS a launcher set by itself. The loader's
    threads are not subtracted: fed by the DALI loader, the step ran within 1 % of its speed on
    synthetic input on the 2-core development CPU (BENCHMARKS.md, "Threads"), where a core left
    to the loader would halve the compute."""
    share = max(1, usable // sharing)
    auto = f"{usable} usable core{'s' if usable > 1 else ''} / {sharing} process{'es' if sharing > 1 else ''} on them"
    if setting is None and launcher is None:
        return share, f"auto: {auto}"
    count, why = (setting, f"train.threads={setting} in the config") if setting is not None else launcher
    if setting is not None and launcher is not None and launcher[0] != setting:
        why += f", overriding {launcher[1]}"
    return count, why + ("" if count == share else f"; auto would use {share}: {auto}")
