"""The training loop's named pieces, in process: throughput timing, the endless feed,
validation (and its averaging, shared with deblur.evaluate), the sample grid and the final outputs."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open

from deblur.metrics import mean_scores, psnr, score_sums, ssim
from deblur.models import Discriminator, Generator
from deblur.norm import denormalize
from deblur.training.config import LossConfig, OptimConfig, build_config
from deblur.training.ema import Ema
from deblur.training.feed import Feed, endless
from deblur.training.gan import GanStep, make_optimizer
from deblur.training.meter import Throughput
from deblur.training.outputs import write_final_outputs
from deblur.training.samples import PADDING
from deblur.training.tracking import Log
from deblur.training.validation import summarize, validate, validate_and_sample
from deblur.weights import load_discriminator_state, load_generator


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True, mixed_precision="no")


def make_gan(accelerator: Accelerator) -> GanStep:
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    optim = OptimConfig()
    g_opt, d_opt = make_optimizer(g, 1e-3, optim), make_optimizer(d, 1e-3, optim)
    g, d, g_opt, d_opt = accelerator.prepare(g, d, g_opt, d_opt)
    return GanStep(accelerator, g, d, g_opt, d_opt, LossConfig(), optim)


@pytest.fixture(scope="module")
def gan(accelerator) -> GanStep:
    return make_gan(accelerator)


@pytest.fixture(scope="module")
def gan_ema(accelerator) -> GanStep:
    """A GanStep with an EMA of G whose weights differ from G's (as after training)."""
    gan = make_gan(accelerator)
    gan.ema = Ema(gan.generator, decay=0.999)
    with torch.no_grad():
        torch.nn.init.normal_(gan.generator.dec6.weight, std=0.01)  # G's output moves away from the EMA's identity
    return gan


def pairs(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 64, 64, generator=gen), torch.randn(n, 3, 64, 64, generator=gen)) for n in sizes]


def config(tmp_path):
    return build_config(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"shards": str(tmp_path), "batch_size": 2},
            "train": {"max_steps": 1, "checkpoint_every": 1},
            "wandb": {"mode": "disabled"},
        },
        "test config",
    )


def test_throughput_leaves_paused_time_out():
    throughput = Throughput(images_per_step=8)
    for _ in range(3):
        throughput.step()
    with throughput.paused():
        time.sleep(0.2)
    images, seconds = throughput.interval()
    assert images == 24 and seconds < 0.2
    throughput.restart()
    assert throughput.interval()[0] == 0


def test_endless_crosses_epochs_and_refuses_a_loader_without_batches():
    batches = endless([1, 2])
    assert [next(batches) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(RuntimeError, match="yields no batches"):
        next(endless([]))


class SlowLoader:
    """A loader whose every batch takes ``delay`` seconds to arrive."""

    def __init__(self, batches: list, delay: float) -> None:
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for item in self.batches:
            time.sleep(self.delay)
            yield item


def test_feed_times_and_records_every_batch(tmp_path):
    record = tmp_path / "batches.jsonl"
    feed = Feed(SlowLoader(pairs([2, 2]), delay=0.05), updates_per_step=2, record_path=record)
    start = time.perf_counter()
    for step in range(3):
        feed.step = step
        next(feed), next(feed)
        time.sleep(0.05)  # the "training" between batches is not waiting
    elapsed = time.perf_counter() - start
    assert 6 * 0.05 <= feed.wait <= elapsed - 3 * 0.05
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["step"], r["update"], r["epoch"]) for r in rows] == [
        (0, 0, 0),
        (0, 1, 0),
        (1, 0, 1),
        (1, 1, 1),
        (2, 0, 2),
        (2, 1, 2),
    ]
    assert all(len(r["sharp"]) == 2 for r in rows)


def test_validation_averages_per_image_over_uneven_batches(accelerator, gan):
    """Batches of 3, 1 and 2 images: the mean is over the 6 images, not over batch means."""
    loader = pairs([3, 1, 2])
    [metrics], first = validate(accelerator, [gan.generator], loader)
    blurred = denormalize(torch.cat([b for b, _ in loader])).clamp(0, 1)
    sharp = denormalize(torch.cat([s for _, s in loader])).clamp(0, 1)
    assert metrics["images"] == 6 and first[0].shape[0] == 3
    assert metrics["psnr_blurred"] == pytest.approx(psnr(blurred, sharp).mean().item(), rel=1e-6)
    assert metrics["ssim_blurred"] == pytest.approx(ssim(blurred, sharp).mean().item(), rel=1e-5)
    assert gan.generator.training  # validation puts the generator back in training mode


def test_validation_scores_each_generator_in_one_pass(accelerator, gan_ema):
    generator = gan_ema.generator
    scores, _ = validate(accelerator, [gan_ema.ema.module, generator], pairs([3, 1]))
    restored = torch.cat([generator(b) for b, _ in pairs([3, 1])]).detach()
    sharp = torch.cat([s for _, s in pairs([3, 1])])
    psnr_g = psnr(denormalize(restored).clamp(0, 1), denormalize(sharp).clamp(0, 1)).mean().item()
    assert scores[1]["psnr_restored"] == pytest.approx(psnr_g, rel=1e-6)
    # The EMA here is still G's residual initialization, the identity: it scores as the input does.
    assert scores[0]["psnr_restored"] == pytest.approx(scores[0]["psnr_blurred"], rel=1e-6)
    assert scores[0]["psnr_blurred"] == scores[1]["psnr_blurred"] and scores[0]["images"] == 4
    assert not gan_ema.ema.module.training and generator.training  # each left in its own mode


def test_an_empty_split_scores_nan_and_no_images(accelerator, gan):
    [metrics], first = validate(accelerator, [gan.generator], [])
    assert first is None and metrics["images"] == 0
    scores = ("psnr_restored", "ssim_restored", "psnr_blurred", "ssim_blurred")
    assert set(metrics) == {"images", *scores} and all(math.isnan(metrics[k]) for k in scores)


def test_score_sums_add_up_to_the_per_image_mean():
    gen = torch.Generator().manual_seed(2)
    images, targets = torch.rand(5, 3, 32, 32, generator=gen), torch.rand(5, 3, 32, 32, generator=gen)
    total = score_sums(images[:2], targets[:2]).double() + score_sums(images[2:], targets[2:]).double()
    means = mean_scores(total, 5)
    assert means["psnr"] == pytest.approx(psnr(images, targets).mean().item(), rel=1e-6)
    assert means["ssim"] == pytest.approx(ssim(images, targets).mean().item(), rel=1e-5)


def test_validate_and_sample_logs_scores_and_writes_the_grid(accelerator, gan, tmp_path):
    cfg = config(tmp_path)
    cfg.output_dir.mkdir(parents=True)
    validate_and_sample(accelerator, gan, pairs([4, 2]), Log(cfg, accelerator), 7, tmp_path / "samples", 3)
    assert (tmp_path / "samples" / "step-0000007.png").is_file()
    logged = json.loads((cfg.output_dir / "log.jsonl").read_text())
    assert logged["step"] == 7 and logged["val/images"] == 6 and "val/psnr_restored" in logged
    assert not any(key.startswith("val_raw/") for key in logged)  # no EMA: one generator


def test_with_an_ema_both_generators_are_logged_and_drawn(accelerator, gan, gan_ema, tmp_path):
    cfg = config(tmp_path)
    cfg.output_dir.mkdir(parents=True)
    for name, model in (("plain", gan), ("ema", gan_ema)):
        validate_and_sample(accelerator, model, pairs([4, 2]), Log(cfg, accelerator), 7, tmp_path / name, 3)
    *_, logged = map(json.loads, (cfg.output_dir / "log.jsonl").read_text().splitlines())
    assert logged["val/psnr_restored"] == pytest.approx(logged["val/psnr_blurred"], rel=1e-6)  # the EMA
    assert logged["val_raw/psnr_restored"] != logged["val/psnr_restored"] and logged["val_raw/images"] == 6
    # One more row of images: blurred | restored (EMA) | restored (raw G) | sharp.
    heights = [Image.open(tmp_path / name / "step-0000007.png").height for name in ("plain", "ema")]
    assert heights[1] - heights[0] == (heights[0] - PADDING) // 3


def test_final_outputs_are_loadable_weights_and_json_metrics(accelerator, gan, tmp_path):
    cfg = config(tmp_path)
    cfg.output_dir.mkdir(parents=True)
    metrics = summarize(torch.zeros(5))  # an empty test split: NaN scores are written as null
    write_final_outputs(cfg, accelerator, gan, 12, [metrics], ["abc"])
    written = json.loads((cfg.output_dir / "metrics.json").read_text())
    assert written == {
        "split": "test",
        "step": 12,
        "weights": "raw",
        "psnr_restored": None,
        "ssim_restored": None,
        "psnr_blurred": None,
        "ssim_blurred": None,
        "images": 0,
        "replica_param_sha256": ["abc"],
    }
    generator = load_generator(cfg.output_dir / "generator.safetensors", torch.device("cpu"))
    unwrapped = accelerator.unwrap_model(gan.generator)
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), unwrapped.state_dict().values()))
    with safe_open(cfg.output_dir / "generator.safetensors", framework="pt") as f:
        assert f.metadata()["weights"] == "raw" and f.metadata()["step"] == "12"
    assert not (cfg.output_dir / "generator_raw.safetensors").exists()  # no EMA: nothing to put beside it
    discriminator = load_discriminator_state(cfg.output_dir / "discriminator.safetensors")
    assert all(torch.equal(discriminator[k], v) for k, v in gan.discriminator.state_dict().items())


def test_with_an_ema_generator_safetensors_holds_it_and_the_raw_g_is_beside_it(accelerator, gan_ema, tmp_path):
    cfg = config(tmp_path)
    cfg.output_dir.mkdir(parents=True)
    ema_scores, raw_scores = {**summarize(torch.zeros(5)), "images": 3}, {**summarize(torch.zeros(5)), "images": 4}
    write_final_outputs(cfg, accelerator, gan_ema, 12, [ema_scores, raw_scores], ["abc"])
    written = json.loads((cfg.output_dir / "metrics.json").read_text())
    assert written["weights"] == "ema" and written["images"] == 3 and written["raw"]["images"] == 4
    for name, weights, model in (
        ("generator.safetensors", "ema", gan_ema.ema.module),
        ("generator_raw.safetensors", "raw", gan_ema.generator),
    ):
        loaded = load_generator(cfg.output_dir / name)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())), name
        with safe_open(cfg.output_dir / name, framework="pt") as f:
            assert f.metadata()["weights"] == weights, name
    with safe_open(cfg.output_dir / "generator.safetensors", framework="pt") as f:
        assert f.metadata()["ema_decay"] == "0.999" and f.metadata()["ema_updates"] == "0"
