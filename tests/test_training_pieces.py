"""The training loop's named pieces, in process: throughput timing, the endless feed,
validation (and its averaging, shared with deblur.evaluate), the sample grid and the final outputs."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from accelerate import Accelerator

from deblur.metrics import mean_scores, psnr, score_sums, ssim
from deblur.models import Discriminator, Generator
from deblur.norm import denormalize
from deblur.training.config import LossConfig, OptimConfig, build_config
from deblur.training.feed import Feed, endless
from deblur.training.gan import GanStep, make_optimizer
from deblur.training.meter import Throughput
from deblur.training.outputs import write_final_outputs
from deblur.training.tracking import Log
from deblur.training.validation import summarize, validate, validate_and_sample
from deblur.weights import load_generator


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True, mixed_precision="no")


@pytest.fixture(scope="module")
def gan(accelerator) -> GanStep:
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    optim = OptimConfig()
    g_opt, d_opt = make_optimizer(g, 1e-3, optim), make_optimizer(d, 1e-3, optim)
    g, d, g_opt, d_opt = accelerator.prepare(g, d, g_opt, d_opt)
    return GanStep(accelerator, g, d, g_opt, d_opt, LossConfig(), optim)


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
    metrics, first = validate(accelerator, gan, loader)
    blurred = denormalize(torch.cat([b for b, _ in loader])).clamp(0, 1)
    sharp = denormalize(torch.cat([s for _, s in loader])).clamp(0, 1)
    assert metrics["images"] == 6 and first[0].shape[0] == 3
    assert metrics["psnr_blurred"] == pytest.approx(psnr(blurred, sharp).mean().item(), rel=1e-6)
    assert metrics["ssim_blurred"] == pytest.approx(ssim(blurred, sharp).mean().item(), rel=1e-5)
    assert gan.generator.training  # validation puts the generator back in training mode


def test_an_empty_split_scores_nan_and_no_images(accelerator, gan):
    metrics, first = validate(accelerator, gan, [])
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


def test_final_outputs_are_loadable_weights_and_json_metrics(accelerator, gan, tmp_path):
    cfg = config(tmp_path)
    cfg.output_dir.mkdir(parents=True)
    metrics = summarize(torch.zeros(5))  # an empty test split: NaN scores are written as null
    write_final_outputs(cfg, accelerator, gan, 12, metrics, ["abc"])
    written = json.loads((cfg.output_dir / "metrics.json").read_text())
    assert written == {
        "split": "test",
        "step": 12,
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
