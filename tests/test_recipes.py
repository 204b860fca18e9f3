"""The paired recipes end to end on small synthetic pairs, with the exact commands written at the
top of configs/gopro.yaml and configs/pairs.yaml (only the paths are the test's, and training
runs as one CPU process, ``python launch/train.py``, for a few steps): build the shards, train,
evaluate."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pairs_data
import pytest
from cli_checks import ROOT, run

from deblur.training.config import load_config

pytestmark = pytest.mark.timeout(600)
TRAIN = ["train.max_steps=2", "train.checkpoint_every=2", "train.eval_every=2", "train.log_every=1"]
TRAIN += ["data.batch_size=2", "data.workers=1", "train.mixed_precision=no", "wandb.mode=disabled"]


def recipe(config: Path) -> dict[str, list[str]]:
    """The config's commands (its ``#   `` lines): building, training, evaluating."""
    lines = [shlex.split(line[1:]) for line in config.read_text().splitlines() if line.startswith("#   ")]

    def find(word: str) -> list[str]:
        return next(cmd for cmd in lines if word in cmd)

    return {"shard": find("deblur.shard"), "train": find("launch/train.py"), "evaluate": find("deblur.evaluate")}


def as_test(cmd: list[str], paths: dict[str, Path]) -> list[str]:
    """The command with the test's paths and this interpreter."""
    cmd = [str(paths.get(arg, arg)) for arg in cmd]
    return [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd


@pytest.mark.parametrize("name", ["gopro", "pairs"])
def test_the_paired_recipes_build_train_and_evaluate(name, tmp_path):
    config = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(config)
    commands = recipe(config)
    assert commands["train"][-2:] == ["--config", f"configs/{name}.yaml"]
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    if name == "gopro":
        paths = {"~/data/GOPRO_Large": pairs_data.gopro(tmp_path / "GOPRO_Large")}
    else:
        sharp, blurred = pairs_data.two_trees(tmp_path / "data")
        paths = {"data/original": sharp, "data/blurred": blurred}
    paths |= {
        str(cfg.data.shards): shards,
        f"{cfg.output_dir}/generator.safetensors": run_dir / "generator.safetensors",
    }

    built = run(as_test(commands["shard"], paths))
    assert built.returncode == 0, built.stderr[-3000:]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["blur"]["type"] == "real" and manifest["splits"]["test"]["samples"] > 0

    trained = run(
        [
            sys.executable,
            str(ROOT / "launch/train.py"),
            "--config",
            str(config),
            f"data.shards={shards}",
            f"output_dir={run_dir}",
            *TRAIN,
        ]
    )
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert load_config(run_dir / "config.yaml").data.crop is (name == "gopro")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["images"] == manifest["splits"]["test"]["samples"]

    scored = run(as_test(commands["evaluate"], paths) + ["--limit", "2"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["n"] == 2 and result["wiener"]["psnr"] is None and result["restored"]["psnr"] > 10
