"""The fast training step's pieces, in process: device-side skips, the statistics meter,
precision and compile choices, the sample grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from deblur.models import Discriminator, Generator
from deblur.training import hardware
from deblur.training.config import LossConfig, OptimConfig
from deblur.training.gan import GanStep, StepStats, make_optimizer
from deblur.training.meter import Meter
from deblur.training.samples import labelled_grid
from deblur.training.stop import DeviceToHost


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True, mixed_precision="no")


def make_gan(accelerator: Accelerator, g_updates: int = 3) -> GanStep:
    torch.manual_seed(0)
    g, d = Generator().to(memory_format=torch.channels_last), Discriminator().to(memory_format=torch.channels_last)
    optim = OptimConfig()
    g_opt, d_opt = make_optimizer(g, 1e-3, optim), make_optimizer(d, 1e-3, optim)
    g, d, g_opt, d_opt = accelerator.prepare(g, d, g_opt, d_opt)
    return GanStep(accelerator, g, d, g_opt, d_opt, LossConfig(g_updates_per_step=g_updates), optim)


def snapshot(gan: GanStep) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for m in (gan.generator, gan.discriminator) for p in m.parameters()]
    for opt in (gan.g_optimizer, gan.d_optimizer):
        for state in opt.state_dict()["state"].values():
            tensors += [v.clone() for v in state.values()]
    return tensors


def batch(seed: int, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blurred, sharp = torch.randn(2, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    if poison:
        blurred[0, 0, 0, 0] = float("nan")
    return blurred, sharp


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def adam_steps(optimizer) -> set[float]:
    """Adam's step count of every parameter (empty before the first step)."""
    return {float(state["step"]) for state in optimizer.state_dict()["state"].values()}


def test_a_step_updates_both_models_and_reports_every_update(accelerator):
    gan = make_gan(accelerator)
    g_before, d_before = weights(gan.generator), weights(gan.discriminator)
    results = gan.step(iter([batch(i) for i in range(4)])).read()
    assert [r.kind for r in results] == ["d", "g", "g", "g"] and not any(r.skipped for r in results)
    assert set(results[0].stats) == {"d/loss", "d/prob_real", "d/prob_restored"}
    assert set(results[1].stats) == {"g/loss", "g/ssim_loss", "g/adv_loss", "g/l1_loss"}
    assert all(math.isfinite(v) for r in results for v in r.stats.values())  # finite numbers (not inf either)
    # Every weight of both models moved; D stepped once and G three times.
    assert all(not torch.equal(a, b) for a, b in zip(g_before, weights(gan.generator)))
    assert all(not torch.equal(a, b) for a, b in zip(d_before, weights(gan.discriminator)))
    assert adam_steps(gan.d_optimizer) == {1.0} and adam_steps(gan.g_optimizer) == {3.0}


def test_a_non_finite_loss_skips_the_update_on_the_device(accelerator):
    gan = make_gan(accelerator, g_updates=1)
    gan.step(iter([batch(i) for i in range(2)]))  # Adam state exists from here on
    before = snapshot(gan)
    # NaN in every input: every loss is non-finite, every update must leave weights and Adam
    # state (step counts included) exactly as they were.
    results = gan.step(iter([batch(10 + i, poison=True) for i in range(2)])).read()
    assert [r.skipped for r in results] == [True, True]
    after = snapshot(gan)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # ...and the next finite update steps again.
    assert not any(r.skipped for r in gan.step(iter([batch(20 + i) for i in range(2)])).read())


def test_meter_counts_skips_and_stops_after_too_many_in_a_row():
    def stats(kinds_skipped):
        parts = []
        for kind, skipped in kinds_skipped:
            width = 3 if kind == "d" else 4
            parts.append(StepStats(torch.tensor([float(skipped)] + [0.5] * width), (kind,)))
        return StepStats.concat(parts)

    meter = Meter(max_consecutive_skips=3, skipped_total=1)
    meter.add(stats([("d", False), ("g", True), ("g", True), ("g", False)]))
    meter.read(step=1)
    assert meter.counters() == {"skipped_total": 3, "consecutive_skips": 0}
    summary = meter.summary()
    assert summary["d/loss"] == 0.5 and summary["g/l1_loss"] == 0.5 and summary["skips/total"] == 3
    assert "d/loss" not in meter.summary()  # a new interval
    meter.add(stats([("d", True), ("g", True)]))
    meter.add(stats([("g", True), ("g", False)]))  # the third in a row, across two steps
    with pytest.raises(FloatingPointError, match="3 updates in a row had a non-finite loss"):
        meter.read(step=2)


def test_device_to_host_copy_on_cpu():
    assert DeviceToHost(torch.tensor([2.0])).get().item() == 2.0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),
        ({"avx512f", "avx512_bf16"}, "bf16"),
        ({"avx512f", "avx2"}, "no"),
        (set(), "no"),
    ],
)
def test_auto_precision_follows_the_cpu_bf16_units(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    precision, why = hardware.resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and why.startswith("auto:")
    assert hardware.resolve_precision("fp16", torch.device("cpu"))[0] == "fp16"  # explicit values win


def test_auto_compile_is_on_for_cuda_only():
    assert hardware.resolve_compile("auto", torch.device("cuda"))[0] is True
    assert hardware.resolve_compile("auto", torch.device("cpu"))[0] is False
    assert hardware.resolve_compile(True, torch.device("cpu"))[0] is True


def test_this_machines_cpu_flags_are_read():
    try:
        listed = any(line.startswith("flags") for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        listed = False
    if not listed:
        assert hardware.cpu_flags() == frozenset()
        pytest.skip("/proc/cpuinfo lists no CPU flags here")
    flags = hardware.cpu_flags()
    assert "fpu" in flags or "fp" in flags, sorted(flags)[:20]  # x86 lists fpu, arm lists fp


def test_labelled_grid_is_enlarged_and_has_a_label_column():
    rows = {name: torch.rand(4, 3, 64, 64) for name in ("blurred (input)", "restored (G)", "sharp (target)")}
    image = labelled_grid(rows, scale=3)
    assert image.height >= 3 * 64 * 3 and image.width >= 4 * 64 * 3 + 100
    label_column = np.asarray(image.crop((0, 0, 100, image.height)))
    assert label_column.min() < 128  # some dark text pixels in the label column
