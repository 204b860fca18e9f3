"""The end of a finished run: test-split scores, a replica check, the weights and ``metrics.json``.

Weights written by the main process into ``output_dir``:

    generator.safetensors       the generator to use: the EMA of G (metadata ``weights: ema``),
                                or G itself when train.ema_decay is 0 (``weights: raw``)
    generator_raw.safetensors   with an EMA only: the trained G itself (``weights: raw``)
    discriminator.safetensors   D (rank 0's BatchNorm statistics), for fine-tuning with train.init_from

``metrics.json`` holds the test scores of generator.safetensors' weights (and, with an EMA, of
the raw G under ``raw``), the image count and each replica's parameter hash.
"""

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
from deblur.training.validation import format_metrics, prefixed, scored_generators, summarize, validate
from deblur.weights import save_discriminator, save_generator


def final_outputs(cfg: Config, accelerator: Accelerator, gan: GanStep, log: Log, step: int) -> None:
    """Score the test split, check that the replicas agree, write the run's outputs."""
    test_loader = build_loader(cfg, accelerator, "test", train=False)
    generators = scored_generators(accelerator, gan)
    if test_loader is not None:
        scores = validate(accelerator, [generator for _, _, generator in generators], test_loader)[0]
    else:
        scores = [summarize(torch.zeros(5)) for _ in generators]
    fingerprints = replica_fingerprints(accelerator, gan)
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"replicas diverged: parameter hashes per rank {fingerprints}")
    write_final_outputs(cfg, accelerator, gan, step, scores, fingerprints)
    if scores[0]["images"]:
        log.scalars(prefixed("test", generators, scores), step)
    else:
        accelerator.print("warning: no test images; metrics.json holds no test metrics")
    weights = cfg.output_dir / "generator.safetensors"
    used = f" ({generators[0][1]})" if len(generators) > 1 else ""
    accelerator.print(f"done: {weights}{used}; test split, {format_metrics(scores[0])}")
    for (_, label, _), metrics in zip(generators[1:], scores[1:]):
        accelerator.print(f"  {label} beside it: {format_metrics(metrics)}")


def replica_fingerprints(accelerator: Accelerator, gan: GanStep) -> list[str]:
    """sha256 of each rank's G, D and EMA parameters: DDP keeps G and D bitwise identical and
    every rank makes the same EMA updates, so a mismatch means the replicas diverged (buffers are
    left out: D's BN statistics are per rank)."""
    digest = hashlib.sha256()
    models = [accelerator.unwrap_model(gan.generator), accelerator.unwrap_model(gan.discriminator)]
    for model in models + ([gan.ema.module] if gan.ema is not None else []):
        for p in model.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([digest.hexdigest()])


def write_final_outputs(
    cfg: Config, accelerator: Accelerator, gan: GanStep, step: int, scores: list[dict], fingerprints: list[str]
) -> None:
    """The weights files and ``metrics.json`` (NaN scores of an empty split as null), written by
    the main process. ``scores``: test scores of :func:`scored_generators`' generators, in order."""
    if not accelerator.is_main_process:
        return
    out, at = cfg.output_dir, {"step": str(step)}
    generator = accelerator.unwrap_model(gan.generator)
    raw = {**at, "format": "deblur-generator", "normalization": "imagenet", "weights": "raw"}
    if gan.ema is None:
        save_generator(generator, out / "generator.safetensors", extra_metadata=raw)
    else:
        ema = {**raw, "weights": "ema", "ema_decay": str(gan.ema.decay), "ema_updates": str(gan.ema.updates)}
        save_generator(gan.ema.module, out / "generator.safetensors", extra_metadata=ema)
        save_generator(generator, out / "generator_raw.safetensors", extra_metadata=raw)
    discriminator = accelerator.unwrap_model(gan.discriminator)
    save_discriminator(discriminator, out / "discriminator.safetensors", extra_metadata=at)

    def scores_json(metrics: dict) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}

    metrics = {
        "split": "test",
        "step": step,
        "weights": "raw" if gan.ema is None else "ema",
        **scores_json(scores[0]),
        **({"raw": scores_json(scores[1])} if gan.ema is not None else {}),
        "replica_param_sha256": fingerprints,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
