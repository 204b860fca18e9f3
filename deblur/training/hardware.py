"""What the hardware is good at: the precision and compile settings that ``auto`` resolves to.

Measured on 2026-11-29 (BENCHMARKS.md, "Training step"):
- bf16 only pays where there are bf16 matrix units. On an H200 bf16 autocast is the fast path;
  on a Xeon with AMX, bf16 + channels_last trains ~3x faster than fp32; on a Xeon with AVX-512
  but no bf16 instructions, bf16 ran at half the fp32 speed (oneDNN emulates it).
- torch.compile bought 1.3x on the H200 but nothing on 2-core CPUs, where it also costs 30-50 s
  of compilation per process before the first step.

Each function returns the resolved value and a sentence saying why, which the trainer logs.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

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


def resolve_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """``train.mixed_precision`` -> (Accelerate's value "no" | "bf16" | "fp16", reason)."""
    if setting != "auto":
        return setting, f"mixed_precision={setting} as configured"
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


def resolve_compile(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """``train.compile`` -> (compile the models?, reason)."""
    if setting != "auto":
        return bool(setting), f"compile={str(setting).lower()} as configured"
    if device.type == "cuda":
        return True, "auto: CUDA device, torch.compile on"
    return False, f"auto: torch.compile off on {device.type} (no gain measured there, 30-50 s to compile)"
