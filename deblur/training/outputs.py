"""The end of a finished run: test-split scores, a replica check, ``generator.safetensors`` and
``metrics.json``."""

from __future__ import annotations

import hashlib
import json
import math

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from deblur.training.config import Config
from deblur.training.gan import GanStep
from deblur.training.setup import build_loader
from deblur.training.tracking import Log
from deblur.training.validation import format_metrics, summarize, validate
from deblur.weights import save_generator


def final_outputs(cfg: Config, accelerator: Accelerator, gan: GanStep, log: Log, step: int) -> None:
    """Score the test split, check that the replicas agree, write the run's outputs."""
    test_loader = build_loader(cfg, accelerator, "test", train=False)
    test_metrics = validate(accelerator, gan, test_loader)[0] if test_loader is not None else summarize(torch.zeros(5))
    fingerprints = replica_fingerprints(accelerator, gan)
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"replicas diverged: parameter hashes per rank {fingerprints}")
    write_final_outputs(cfg, accelerator, gan, step, test_metrics, fingerprints)
    if test_metrics["images"]:
        log.scalars({f"test/{k}": v for k, v in test_metrics.items()}, step)
    else:
        accelerator.print("warning: no test images; metrics.json holds no test metrics")
    accelerator.print(f"done: {cfg.output_dir / 'generator.safetensors'}; test split, {format_metrics(test_metrics)}")


def replica_fingerprints(accelerator: Accelerator, gan: GanStep) -> list[str]:
    """sha256 of each rank's G and D parameters: DDP keeps them bitwise identical, and a
    mismatch means the replicas diverged (buffers are left out: D's BN statistics are per rank)."""
    digest = hashlib.sha256()
    for model in (gan.generator, gan.discriminator):
        for p in accelerator.unwrap_model(model).parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([digest.hexdigest()])


def write_final_outputs(
    cfg: Config, accelerator: Accelerator, gan: GanStep, step: int, test_metrics: dict, fingerprints: list[str]
) -> None:
    """``generator.safetensors`` and ``metrics.json`` (NaN scores of an empty split as null),
    written by the main process."""
    if not accelerator.is_main_process:
        return
    save_generator(
        accelerator.unwrap_model(gan.generator),
        cfg.output_dir / "generator.safetensors",
        extra_metadata={"format": "deblur-generator", "normalization": "imagenet", "step": str(step)},
    )
    metrics = {
        "split": "test",
        "step": step,
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in test_metrics.items()},
        "replica_param_sha256": fingerprints,
    }
    (cfg.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
