"""Config loading: typed, strict, errors name the key; YAML 1.2 scalars; overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from deblur.training.config import (
    Config,
    ConfigError,
    apply_override,
    build_config,
    dump_config,
    load_config,
    parse_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = (
    "output_dir: runs/x\ndata:\n  shards: shards/x\n  batch_size: 4\ntrain:\n  max_steps: 10\n  checkpoint_every: 5\n"
)


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL)
    return path


@pytest.mark.parametrize("name", ["ddp.yaml", "demo.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.max_steps > 0 and cfg.data.batch_size > 0


def test_defaults_and_overrides(config_file):
    cfg = load_config(
        config_file, ["train.mixed_precision=bf16", "optim.g_lr=1e-4", "data.shards=/data/s", "wandb.mode=disabled"]
    )
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.optim.g_lr == 1e-4
    assert cfg.data.shards == Path("/data/s")
    assert cfg.loss.g_updates_per_step == 3
    assert cfg.wandb.mode == "disabled"


def test_no_stays_a_string_in_files_and_overrides(config_file):
    config_file.write_text(MINIMAL.replace("  checkpoint_every: 5\n", "  checkpoint_every: 5\n  mixed_precision: no\n"))
    assert load_config(config_file).train.mixed_precision == "no"
    assert load_config(config_file, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert parse_yaml("off") == "off" and parse_yaml("true") is True and parse_yaml("1e-4") == 1e-4


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("trian.max_steps=3", "trian"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.loader=pil", "data.loader"),
        ("data.flip=no", "data.flip"),  # booleans are true/false only
        ("data.batch_size='4'", "data.batch_size"),  # strict: no str -> int coercion
        ("wandb.mode=on", "wandb.mode"),
        ("data.hw_decoder_load=1.5", "data.hw_decoder_load"),
        ("data.decode_threads=0", "data.decode_threads"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(config_file, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(config_file, [override])
    assert f"  {key}:" in str(err.value)
    assert str(config_file) in str(err.value)


def test_missing_required_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL.replace("  batch_size: 4\n", ""))
    with pytest.raises(ConfigError, match=r"data\.batch_size: Field required"):
        load_config(path)


@pytest.mark.parametrize("override", ["train", "=3", "train..max_steps=3", "train.max_steps.x=1"])
def test_malformed_overrides(config_file, override):
    with pytest.raises(ConfigError, match="override"):
        load_config(config_file, [override])


def test_overrides_do_not_mutate_their_input():
    tree = {"train": {"max_steps": 1}}
    new = apply_override(tree, "train.max_steps=2")
    assert tree == {"train": {"max_steps": 1}} and new["train"]["max_steps"] == 2


def test_config_is_frozen(config_file):
    cfg = load_config(config_file)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.max_steps = 3


def test_dump_round_trips(config_file):
    cfg = load_config(config_file, ["train.mixed_precision=no", "optim.d_lr=3e-5"])
    assert build_config(parse_yaml(dump_config(cfg))) == cfg


def test_unset_choices_are_left_to_run_time(config_file):
    # auto: decided at start from the launcher, the environment and the hardware (hardware.py,
    # tracking.py), not when the config is read.
    cfg = load_config(config_file)
    assert (cfg.wandb.mode, cfg.train.mixed_precision, cfg.train.threads) == ("auto", "auto", None)


def test_cli_rejects_a_bad_key_before_training(config_file):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config_file), "train.max_stepz=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the script's folder is launch/, not the root
    )
    assert proc.returncode == 2
    assert "train.max_stepz: Extra inputs are not permitted" in proc.stderr


def test_schema_has_the_issue_keys():
    fields = {
        name: set(f.annotation.model_fields) if hasattr(f.annotation, "model_fields") else None
        for name, f in Config.model_fields.items()
    }
    assert {"output_dir", "data", "train", "wandb"} <= set(fields)
    assert {"shards", "loader", "batch_size"} <= fields["data"]
    assert {"max_steps", "checkpoint_every", "mixed_precision"} <= fields["train"]
    assert {"mode"} <= fields["wandb"]


def test_dali_decoder_settings(config_file):
    cfg = load_config(config_file)
    assert cfg.data.decode_threads is None and cfg.data.hw_decoder_load is None  # chosen at run time
    cfg = load_config(config_file, ["data.decode_threads=16", "data.hw_decoder_load=0"])
    assert cfg.data.decode_threads == 16 and cfg.data.hw_decoder_load == 0.0
