"""The training recipe's pieces, in process: the learning-rate schedules, the EMA of G, the run
state that owns them (and its resume), and starting from weights (train.init_from). The DDP
runs that resume them exactly are in test_train.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from deblur.bench.transfers import HostTransfers
from deblur.errors import InputError
from deblur.models import Discriminator, Generator
from deblur.training.config import build_config
from deblur.training.ema import Ema, ema_decay_at
from deblur.training.init import init_from
from deblur.training.meter import Meter
from deblur.training.schedule import lr_factor
from deblur.training.setup import build_models
from deblur.training.state import TrainState
from deblur.weights import save_discriminator, save_generator


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True, mixed_precision="no")


def config(tmp_path: Path, *, optim: dict | None = None, **train):
    return build_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"shards": str(tmp_path), "batch_size": 2},
            "optim": {"g_lr": 1e-3, "d_lr": 5e-4, **(optim or {})},
            "train": {"max_steps": 10, "checkpoint_every": 5, **train},
            "wandb": {"mode": "disabled"},
        },
        "test config",
    )


class Position:
    """A training loader's position (state_dict / load_state_dict), as TrainState keeps it."""

    def __init__(self) -> None:
        self.state = {"epoch": 0, "batch": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def train_state(cfg, accelerator: Accelerator) -> TrainState:
    torch.manual_seed(0)
    return TrainState(cfg, build_models(cfg, accelerator), Position(), Meter(accelerator, 20))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)) for _ in range(n)]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- learning-rate schedules -------------------------------------------------------------


def test_warmup_rises_linearly_to_the_rate_then_each_schedule_decays_from_it():
    # 4 warm-up steps of 10: base/4, base/2, 3base/4, base; then 6 steps of decay.
    assert [lr_factor(s, "cosine", 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(s, "constant", 4, 10) for s in range(3, 10)] == [1.0] * 7
    assert [lr_factor(s, "linear", 4, 10) for s in range(4, 10)] == pytest.approx(
        [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    )
    cosine = [lr_factor(s, "cosine", 0, 10) for s in range(10)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and 0 < cosine[9] < 0.03
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    assert lr_factor(20, "cosine", 0, 10) == 0.0 and lr_factor(20, "linear", 0, 10) == 0.0  # past the end


# These step the schedules without training steps in between, which torch warns about.
no_step_warning = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


@no_step_warning
def test_both_optimizers_follow_the_schedule_one_step_per_training_step(accelerator, tmp_path):
    state = train_state(config(tmp_path, optim={"schedule": "cosine", "warmup_steps": 2}), accelerator)
    seen = []
    for _ in range(10):
        assert state.gan.g_optimizer.param_groups[0]["lr"] == state.current_lrs()["generator"]
        state.advance()
        seen.append(state.lrs)  # what the step just taken trained with
    assert [lrs["generator"] for lrs in seen] == pytest.approx(
        [1e-3 * lr_factor(s, "cosine", 2, 10) for s in range(10)]
    )
    assert [lrs["discriminator"] for lrs in seen] == pytest.approx(
        [5e-4 * lr_factor(s, "cosine", 2, 10) for s in range(10)]
    )
    assert state.step == 10


@no_step_warning
def test_advancing_the_schedules_moves_nothing_between_host_and_device(accelerator, tmp_path):
    state = train_state(config(tmp_path, optim={"schedule": "linear", "warmup_steps": 3}), accelerator)
    generator = accelerator.unwrap_model(state.gan.generator)
    with HostTransfers() as transfers:
        for _ in range(4):
            state.advance()
            state.ema.update(generator)
    assert transfers.unexpected() == 0, transfers.report()


# --- the EMA -------------------------------------------------------------------------------


def test_the_ema_warms_up_then_keeps_its_decay():
    assert [ema_decay_at(n, 0.999) for n in (0, 1, 10)] == [0.1, 2 / 11, 11 / 20]
    assert ema_decay_at(10**6, 0.999) == 0.999 and ema_decay_at(890, 0.99) == 0.99


def test_an_ema_update_is_the_average_in_float32_and_in_g_s_memory_format():
    torch.manual_seed(0)
    generator = Generator().to(memory_format=torch.channels_last)
    ema = Ema(generator, decay=0.999)
    start = weights(ema.module)
    assert same(start, weights(generator)) and all(v.dtype == torch.float32 for v in start.values())
    assert ema.module.enc1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    ema.update(generator)  # decay 0.1 at the first update: 0.1 * old + 0.9 * new
    ema.update(generator)  # then 2/11
    for name, value in ema.state_dict().items():
        first = 0.1 * start[name] + 0.9 * (start[name] + 1)
        torch.testing.assert_close(value, 2 / 11 * first + 9 / 11 * (start[name] + 1))
    assert ema.updates == 2
    generator.to(torch.bfloat16)  # weights kept in a lower precision: the EMA stays float32
    ema.update(generator)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())


def test_build_models_attaches_the_ema_to_every_g_update_and_zero_turns_it_off(accelerator, tmp_path):
    state = train_state(config(tmp_path), accelerator)
    gan = state.gan
    assert gan.ema is not None and gan.ema.update in gan.g_update_hooks
    gan.step(iter(batches(4)))
    assert gan.ema.updates == 3  # three G updates per step
    generator = weights(accelerator.unwrap_model(gan.generator))
    assert not same(weights(gan.ema.module), generator)  # it lags behind G
    off = build_models(config(tmp_path, ema_decay=0.0), accelerator)
    assert off.ema is None and off.g_update_hooks == []


# --- the run state: one object, saved and restored ------------------------------------------


def save_state(state: TrainState, folder: Path) -> dict:
    """What a checkpoint keeps of the state: trainer.json (through JSON) and its files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in state.tensor_files().items():
        save_file(tensors, folder / name)
    return json.loads(json.dumps(state.state_dict()))


def test_the_run_state_round_trips_through_json_and_safetensors(accelerator, tmp_path):
    cfg = config(tmp_path, optim={"schedule": "cosine", "warmup_steps": 3})
    state = train_state(cfg, accelerator)
    data = batches(12)
    for step in range(3):
        state.gan.step(iter(data[4 * step : 4 * step + 4]))
        state.advance()
    state.meter.skipped_total, state.meter.consecutive_skips = 2, 1
    state.loader.state = {"epoch": 1, "batch": 3}
    saved = save_state(state, tmp_path / "ckpt")
    assert saved["step"] == 3 and saved["skipped_total"] == 2 and saved["ema"] == {"decay": 0.999, "updates": 9}
    assert saved["lr_schedules"]["generator"]["last_epoch"] == 3
    assert list(state.tensor_files()) == ["ema.safetensors"]

    fresh = train_state(cfg, accelerator)
    # As resuming does: Accelerate restores the optimizers (their rates with them), then the state.
    for name in ("g_optimizer", "d_optimizer"):
        getattr(fresh.gan, name).load_state_dict(getattr(state.gan, name).state_dict())
    assert fresh.load_state_dict(saved, tmp_path / "ckpt") == []
    assert fresh.step == 3 and fresh.meter.counters() == {"skipped_total": 2, "consecutive_skips": 1}
    assert same(weights(fresh.ema.module), weights(state.ema.module)) and fresh.ema.updates == 9
    assert fresh.lrs == state.lrs
    for _ in range(5):  # both continue along the same schedule
        state.advance()
        fresh.advance()
        assert fresh.lrs == state.lrs and fresh.current_lrs() == state.current_lrs()


def test_a_checkpoint_from_before_ema_and_schedules_resumes_with_notes(accelerator, tmp_path):
    cfg = config(tmp_path, optim={"schedule": "linear"})
    state = train_state(cfg, accelerator)
    old = {"step": 4, "skipped_total": 0, "consecutive_skips": 0, "world_size": 2}  # trainer.json before issue 19
    notes = state.load_state_dict(old, tmp_path)
    assert any("has none" in note and "starts from the generator" in note for note in notes), notes
    assert any("no schedule position" in note for note in notes), notes
    assert state.current_lrs()["generator"] == pytest.approx(1e-3 * lr_factor(4, "linear", 0, 10))


def test_switching_the_ema_on_or_off_between_resumes_is_said(accelerator, tmp_path):
    with_ema = train_state(config(tmp_path), accelerator)
    saved = save_state(with_ema, tmp_path / "ckpt")
    without = train_state(config(tmp_path, ema_decay=0.0), accelerator)
    assert without.tensor_files() == {} and without.state_dict()["ema"] is None
    [note] = without.load_state_dict(saved, tmp_path / "ckpt")
    assert "train.ema_decay=0, so the EMA saved in" in note
    other_decay = train_state(config(tmp_path, ema_decay=0.99), accelerator)
    [note] = other_decay.load_state_dict(saved, tmp_path / "ckpt")
    assert note == "EMA: decay 0.99 from now on (train.ema_decay), 0.999 before"


# --- train.init_from ----------------------------------------------------------------------


def trained_pair(folder: Path, discriminator: bool = True) -> tuple[dict, dict]:
    """generator.safetensors (+ discriminator.safetensors) of weights unlike a fresh start's."""
    torch.manual_seed(5)
    g, d = Generator(), Discriminator()
    with torch.no_grad():
        torch.nn.init.normal_(g.dec6.weight, std=0.01)
        d.features[0][1].running_mean.add_(0.5)
    save_generator(g, folder / "generator.safetensors")
    if discriminator:
        save_discriminator(d, folder / "discriminator.safetensors")
    return weights(g), weights(d)


@pytest.mark.parametrize("as_folder", [True, False])
def test_init_from_loads_g_its_ema_and_d(accelerator, tmp_path, as_folder):
    g, d = trained_pair(tmp_path)
    gan = build_models(config(tmp_path), accelerator)
    source = tmp_path if as_folder else tmp_path / "generator.safetensors"
    [line] = init_from(source, accelerator, gan)
    assert line == (
        f"initialized from {tmp_path / 'generator.safetensors'} (generator and its EMA) and "
        f"{tmp_path / 'discriminator.safetensors'} (discriminator): weights only, new optimizers, step 0"
    )
    assert same(weights(accelerator.unwrap_model(gan.generator)), g) and same(weights(gan.ema.module), g)
    assert same(weights(accelerator.unwrap_model(gan.discriminator)), d)
    assert gan.g_optimizer.state_dict()["state"] == {}  # new optimizers


def test_init_from_a_generator_alone_leaves_d_untrained(accelerator, tmp_path):
    g, _ = trained_pair(tmp_path, discriminator=False)
    gan = build_models(config(tmp_path), accelerator)
    d_before = weights(accelerator.unwrap_model(gan.discriminator))
    lines = init_from(tmp_path / "generator.safetensors", accelerator, gan)
    assert lines[1] == f"no discriminator.safetensors beside {tmp_path / 'generator.safetensors'}: " + (
        "the discriminator starts untrained"
    )
    assert same(weights(accelerator.unwrap_model(gan.generator)), g)
    assert same(weights(accelerator.unwrap_model(gan.discriminator)), d_before)


def test_init_from_refuses_a_mismatch_naming_the_tensor_and_loads_nothing(accelerator, tmp_path):
    trained_pair(tmp_path)
    state = load_file(tmp_path / "discriminator.safetensors")
    state["classifier.weight"] = torch.zeros(1, 10)
    save_file(state, tmp_path / "discriminator.safetensors")
    gan = build_models(config(tmp_path), accelerator)
    before = weights(accelerator.unwrap_model(gan.generator))
    with pytest.raises(InputError) as raised:
        init_from(tmp_path, accelerator, gan)
    assert str(raised.value) == (
        f"train.init_from: {tmp_path / 'discriminator.safetensors'}: tensor 'classifier.weight' has shape [1, 10], "
        "the Discriminator's is [1, 86528]"
    )
    assert same(weights(accelerator.unwrap_model(gan.generator)), before)  # the generator was not loaded either
    del state["classifier.weight"]
    save_file(state, tmp_path / "discriminator.safetensors")
    with pytest.raises(InputError, match=r"not a deblur Discriminator's weights: missing tensor 'classifier\.weight'"):
        init_from(tmp_path, accelerator, gan)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda folder: folder / "nowhere", "train.init_from: {source} not found"),
        (lambda folder: folder, "train.init_from: {source} is a folder without generator.safetensors"),
    ],
)
def test_init_from_a_path_without_weights_is_one_clear_error(accelerator, tmp_path, make, expected):
    source = make(tmp_path)
    with pytest.raises(InputError) as raised:
        init_from(source, accelerator, build_models(config(tmp_path), accelerator))
    assert str(raised.value).startswith(expected.format(source=source))


def test_init_from_another_generator_variant_names_the_key(accelerator, tmp_path):
    save_generator(Generator(residual=False), tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match=r"residual=false, this run's model\.residual is true"):
        init_from(tmp_path / "plain.safetensors", accelerator, build_models(config(tmp_path), accelerator))


def test_ema_decay_and_warmup_are_validated(tmp_path):
    with pytest.raises(InputError, match="train.ema_decay"):
        config(tmp_path, ema_decay=1.0)
    with pytest.raises(InputError, match="optim.warmup_steps"):
        config(tmp_path, optim={"warmup_steps": -1})
    with pytest.raises(InputError, match="optim.schedule"):
        config(tmp_path, optim={"schedule": "step"})
    assert math.isclose(config(tmp_path).train.ema_decay, 0.999) and config(tmp_path).optim.schedule == "constant"
