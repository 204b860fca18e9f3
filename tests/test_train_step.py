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
from deblur.training.config import LossConfig, OptimConfig, build_config
from deblur.training.gan import D_STATS, G_STATS, GanStep, StepStats, make_optimizer
from deblur.training.meter import Meter, NonFiniteUpdates
from deblur.training.samples import labelled_grid
from deblur.training.setup import build_models
from deblur.training.stop import DeviceToHost


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True, mixed_precision="no")


def make_gan(accelerator: Accelerator, g_updates: int = 3, compile_mode: str | None = None) -> GanStep:
    torch.manual_seed(0)
    g, d = Generator().to(memory_format=torch.channels_last), Discriminator().to(memory_format=torch.channels_last)
    optim = OptimConfig()
    g_opt, d_opt = make_optimizer(g, 1e-3, optim), make_optimizer(d, 1e-3, optim)
    g, d, g_opt, d_opt = accelerator.prepare(g, d, g_opt, d_opt)
    return GanStep(accelerator, g, d, g_opt, d_opt, LossConfig(g_updates_per_step=g_updates), optim, compile_mode)


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def adam_steps(optimizer) -> set[float]:
    """Adam's step count of every parameter (empty before the first step)."""
    return {float(state["step"]) for state in optimizer.state_dict()["state"].values()}


def snapshot(gan: GanStep) -> list[torch.Tensor]:
    tensors = weights(gan.generator) + weights(gan.discriminator)
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


def flags(stats: StepStats) -> list[float]:
    return stats.d[:, 0].tolist() + stats.g[:, 0].tolist()


def test_a_step_updates_both_models_and_reports_every_update(accelerator):
    gan = make_gan(accelerator)
    g_before, d_before = weights(gan.generator), weights(gan.discriminator)
    stats = gan.step(iter([batch(i) for i in range(4)]))
    assert stats.d.shape == (1, 1 + len(D_STATS)) and stats.g.shape == (3, 1 + len(G_STATS))
    assert flags(stats) == [0.0, 0.0, 0.0, 0.0]  # nothing skipped
    values = stats.d.flatten().tolist() + stats.g.flatten().tolist()
    assert all(math.isfinite(v) for v in values), values
    # Every weight of both models moved; D stepped once and G three times.
    assert all(not torch.equal(a, b) for a, b in zip(g_before, weights(gan.generator)))
    assert all(not torch.equal(a, b) for a, b in zip(d_before, weights(gan.discriminator)))
    assert adam_steps(gan.d_optimizer) == {1.0} and adam_steps(gan.g_optimizer) == {3.0}
    # The rows hold what their names say: D's probabilities, G's weighted loss.
    d_stats, g_stats = dict(zip(D_STATS, stats.d[0, 1:].tolist())), dict(zip(G_STATS, stats.g[0, 1:].tolist()))
    assert 0 < d_stats["d/prob_real"] < 1 and 0 < d_stats["d/prob_restored"] < 1 and d_stats["d/grad_norm"] > 0
    loss = gan.loss
    expected = loss.ssim_weight * g_stats["g/ssim_loss"] + loss.adv_weight * g_stats["g/adv_loss"]
    expected += loss.l1_weight * g_stats["g/l1_loss"]
    assert g_stats["g/loss"] == pytest.approx(expected, rel=1e-5)


def test_a_non_finite_loss_skips_the_update_on_the_device(accelerator):
    gan = make_gan(accelerator, g_updates=1)
    gan.step(iter([batch(i) for i in range(2)]))  # Adam state exists from here on
    before = snapshot(gan)
    # NaN in every input: every loss is non-finite, every update must leave weights and Adam
    # state (step counts included) exactly as they were.
    assert flags(gan.step(iter([batch(10 + i, poison=True) for i in range(2)]))) == [1.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(gan)))
    # ...and the next finite update steps again.
    assert flags(gan.step(iter([batch(20 + i) for i in range(2)]))) == [0.0, 0.0]
    assert adam_steps(gan.d_optimizer) == adam_steps(gan.g_optimizer) == {2.0}


def test_non_finite_gradients_skip_the_update_even_with_a_finite_loss(accelerator):
    # What fp16 overflow in backward looks like: the loss is fine, a gradient is not.
    gan = make_gan(accelerator, g_updates=1)
    last_layer = gan.accelerator.unwrap_model(gan.generator).dec6.bias
    handle = last_layer.register_hook(lambda grad: grad * float("inf"))
    try:
        g_before, d_before = weights(gan.generator), weights(gan.discriminator)
        stats = gan.step(iter([batch(i) for i in range(2)]))
    finally:
        handle.remove()
    assert flags(stats) == [0.0, 1.0] and math.isfinite(stats.g[0, 1].item())  # G's loss was finite
    assert all(torch.equal(a, b) for a, b in zip(g_before, weights(gan.generator)))
    assert not torch.equal(d_before[0], weights(gan.discriminator)[0])  # D's update went through


def test_a_non_finite_loss_skips_the_update_even_when_its_gradients_are_finite(accelerator):
    # An infinite constant in the loss leaves every gradient finite: only the gate in GanStep
    # (loss * (1 + 0 * loss), NaN for a non-finite loss) turns the verdict into a skip, and so
    # makes the verdict reach the other ranks through DDP's gradient average.
    gan = make_gan(accelerator, g_updates=1)
    forward = gan._g_forward
    gan._g_forward = lambda blurred, sharp: (lambda loss, stats: (loss + float("inf"), stats))(*forward(blurred, sharp))
    g_before = weights(gan.generator)
    assert flags(gan.step(iter([batch(i) for i in range(2)]))) == [0.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(g_before, weights(gan.generator)))


def test_g_update_hooks_run_after_every_g_update_with_the_device_flag(accelerator):
    gan = make_gan(accelerator, g_updates=3)
    seen = []
    gan.g_update_hooks.append(lambda generator, skipped: seen.append((generator, skipped)))
    gan.step(iter([batch(i) for i in range(4)]))
    assert len(seen) == 3
    assert all(g is gan.accelerator.unwrap_model(gan.generator) for g, _ in seen)
    assert all(s.device == gan.accelerator.device and s.dim() == 0 and s.item() == 0 for _, s in seen)


def step_stats(kinds_skipped: list[tuple[str, bool]], value: float = 0.5) -> list[StepStats]:
    """Hand-made StepStats, one per D update with the G updates after it; skipped rows hold NaN."""
    steps, rows = [], {"d": [], "g": []}

    def flush():
        if rows["d"]:
            steps.append(StepStats(torch.tensor(rows["d"]), torch.tensor(rows["g"])))
        rows["d"], rows["g"] = [], []

    for kind, skipped in kinds_skipped:
        if kind == "d":
            flush()
        width = len(D_STATS) if kind == "d" else len(G_STATS)
        rows[kind].append([float(skipped)] + [float("nan") if skipped else value] * width)
    flush()
    return steps


def test_meter_averages_what_was_not_skipped_and_stops_after_too_many_skips_in_a_row(accelerator):
    meter = Meter(accelerator, max_consecutive_skips=3, skipped_total=1)
    for stats in step_stats([("d", False), ("g", True), ("g", False), ("d", True), ("g", False), ("g", False)]):
        meter.add(stats)
    meter.read(step=2)
    assert meter.counters() == {"skipped_total": 3, "consecutive_skips": 0}
    summary = meter.summary()
    # The skipped rows' NaNs are left out of the means.
    assert summary["d/loss"] == 0.5 and summary["g/l1_loss"] == 0.5 and summary["g/grad_norm"] == 0.5
    assert summary["skips/total"] == 3 and summary["skips/consecutive"] == 0
    assert "d/loss" not in meter.summary()  # a new interval
    for stats in step_stats([("d", True), ("g", True), ("g", True), ("d", False), ("g", False), ("g", False)]):
        meter.add(stats)
    # The third skip in a row is in the first step; reading stops the run, naming the key.
    with pytest.raises(NonFiniteUpdates, match=r"by step 4: 3 updates in a row .*train\.max_consecutive_skips=3"):
        meter.read(step=4)


def test_meter_counts_a_run_of_skips_across_reads(accelerator):
    meter = Meter(accelerator, max_consecutive_skips=3, consecutive_skips=2)  # as resumed from a checkpoint
    meter.add(step_stats([("d", True), ("g", False)])[0])
    with pytest.raises(NonFiniteUpdates, match="3 updates in a row"):
        meter.read(step=1)


def test_device_to_host_copy_on_cpu():
    assert DeviceToHost(torch.tensor([2.0, 3.0])).get() == [2.0, 3.0]


def bench_like_config(tmp_path: Path, **train):
    return build_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"shards": str(tmp_path), "batch_size": 2},
            "train": {"max_steps": 1, "checkpoint_every": 1, **train},
            "wandb": {"mode": "disabled"},
        },
        "test config",
    )


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
@pytest.mark.parametrize("scope", ["models", "update"])
def test_compile_scope_and_mode_reach_torch_compile(accelerator, monkeypatch, tmp_path, scope, mode):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda model, **kw: compiled.append((type(model).__name__, kw)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn.__name__, kw)) or fn)
    gan = build_models(bench_like_config(tmp_path, compile=True, compile_scope=scope, compile_mode=mode), accelerator)
    if scope == "models":
        assert compiled == [("Generator", {"mode": mode}), ("Discriminator", {"mode": mode})]
        assert gan.compile_mode is None
    else:
        assert compiled == [("d_forward", {"mode": mode}), ("g_forward", {"mode": mode})]
        assert gan.compile_mode == mode
    compiled.clear()
    build_models(bench_like_config(tmp_path, compile=False, compile_scope=scope, compile_mode=mode), accelerator)
    assert compiled == []  # compile_scope and compile_mode only matter with compile on


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


def test_the_compiled_update_matches_the_eager_one_and_compiles_once(accelerator):
    """compile_scope=update for real, in reduce-overhead mode: on the CPU inductor runs it as the
    default mode (no CUDA graphs there), while GanStep still marks every update as a new
    CUDA-graph step. Two graphs (D's update, G's update), no graph break, no recompilation on
    the next step: the constants (normalization, SSIM window) were made before tracing."""
    from torch._dynamo.utils import counters

    batches = [batch(i) for i in range(8)]
    eager = make_gan(accelerator)
    expected = [eager.step(iter(batches[:4])), eager.step(iter(batches[4:]))]
    compiled = make_gan(accelerator, compile_mode="reduce-overhead")
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    try:
        first = compiled.step(iter(batches[:4]))
        assert counters["stats"]["unique_graphs"] - graphs == 2
        assert sum(counters["graph_break"].values()) == breaks
        second = compiled.step(iter(batches[4:]))
        assert counters["stats"]["unique_graphs"] - graphs == 2  # nothing recompiled
    finally:
        torch._dynamo.reset()
    for got, want in zip((first, second), expected):
        torch.testing.assert_close(got.d, want.d, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(got.g, want.g, rtol=2e-3, atol=1e-4)
