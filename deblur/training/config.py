"""Typed training configuration: a YAML file plus ``key.sub=value`` overrides.

    cfg = load_config("configs/ddp.yaml", ["train.max_steps=1000", "train.mixed_precision=no"])

Every section rejects unknown keys and wrong types (pydantic strict mode), and errors name the
dotted key and the file. YAML is read with YAML 1.2 scalars: only ``true``/``false`` are
booleans, so ``mixed_precision: no`` stays the string "no" (PyYAML's YAML 1.1 default would
turn it into False), and ``1e-4`` is a float (YAML 1.1 reads it as a string). Configs are
frozen: code derives new values instead of mutating them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deblur.errors import InputError

# Paths come from YAML as strings; everything else is strict.
LoosePath = Annotated[Path, Field(strict=False)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ConfigError(InputError, ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(_Section):
    shards: LoosePath  # folder written by `python -m deblur.shard`
    loader: Literal["dali", "torch"] = "dali"
    batch_size: PositiveInt  # per process; each G or D update consumes one batch
    image_size: Literal[64] = 64  # the unpadded generator only fits 64x64
    flip: bool = True  # random horizontal flip, same for both members of a pair
    # Patch training (real blur, e.g. configs/gopro.yaml): an image_size crop of each pair at full
    # resolution, one window for both members; false = each image resized whole (CelebA's).
    crop: bool = False
    # Cores each process's loader keeps busy (torch DataLoader workers; DALI runs one CPU thread
    # more unless decode_threads says otherwise); None = this machine's usable cores divided by
    # the processes on it (LOCAL_WORLD_SIZE), so ranks do not oversubscribe.
    workers: PositiveInt | None = None
    # DALI only. Threads of each process's pipeline (JPEG decoding on the CPU, and the CPU half
    # of GPU decoding); None = workers + 1.
    decode_threads: PositiveInt | None = None
    # DALI on a GPU only: share of JPEGs for the GPU's hardware JPEG engine, the rest decoded
    # with CUDA helped by the threads above. None = 0.0 with >= 12 threads, 1.0 with <= 4,
    # 0.65 (DALI's default) between: measured on an H200 (deblur.loading.dali_graph).
    hw_decoder_load: Annotated[float, Field(ge=0, le=1)] | None = None


class ModelConfig(_Section):
    residual: bool = True  # generator predicts a correction added to its input


class OptimConfig(_Section):
    # Adam with beta1 = 0.5 is the usual GAN choice (DCGAN); the paper names no optimizer.
    g_lr: PositiveFloat = 2e-4
    d_lr: PositiveFloat = 2e-4
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.5
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    grad_clip: PositiveFloat | None = None  # max global grad norm per update; None = off
    # The learning rates of G and D over the run (deblur/training/schedule.py), stepped once per
    # training step: constant, cosine (to 0 at train.max_steps) or linear (to 0), each after
    # warmup_steps steps that rise linearly to the configured rate.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: NonNegativeInt = 0


class LossConfig(_Section):
    ssim_weight: NonNegativeFloat = 1.0  # generator: weight * (1 - SSIM)
    adv_weight: NonNegativeFloat = 0.01  # generator: weight * BCE(D(G(x)), real)
    # Ours, not the paper's: weight * mean |G(x) - sharp| on [0, 1] images. SSIM barely
    # penalizes a global colour shift, which costs PSNR (measured on the demo: -1.35 dB of
    # drift after 100 steps with SSIM + adversarial alone). 0 gives the paper's exact loss.
    l1_weight: NonNegativeFloat = 1.0
    g_updates_per_step: PositiveInt = 3  # the paper's: three G updates per D update


class TrainConfig(_Section):
    max_steps: PositiveInt  # one step = 1 D update + g_updates_per_step G updates
    checkpoint_every: PositiveInt
    keep_checkpoints: PositiveInt = 3
    # auto = bf16 where the hardware has bf16 matrix units (recent GPUs; CPUs with AMX or
    # AVX512-BF16), fp32 elsewhere; see deblur/training/hardware.py. The run logs what it chose and why.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # torch.compile of G and D (in place: state-dict keys are unchanged, so checkpoints move
    # freely between compiled and eager runs). auto = on for CUDA, off on CPU.
    compile: bool | Literal["auto"] = "auto"
    # What compile covers: "models" (G and D, each on its own) or "update" (each update's forward
    # passes and losses as one graph, which fuses the losses' small kernels; deblur/training/gan.py).
    compile_scope: Literal["models", "update"] = "models"
    # torch.compile's mode: default | max-autotune-no-cudagraphs (tuned kernels, longer compile) |
    # reduce-overhead (CUDA graphs: one launch per graph; CUDA only, elsewhere it runs as default).
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    # Models and batches in channels_last memory format (NHWC): the layout cuDNN's and oneDNN's
    # fastest convolutions use. Off only to measure the difference.
    channels_last: bool = True
    log_every: PositiveInt = 20
    eval_every: PositiveInt = 500  # validation PSNR/SSIM over the whole val split + sample grid
    sample_images: PositiveInt = 8  # images in the sample grid
    max_consecutive_skips: PositiveInt = 20  # stop after this many non-finite updates in a row
    # Exponential moving average of G's weights (deblur/training/ema.py), updated after every G
    # update, with a warm-up: the decay of update n is min(ema_decay, (1 + n) / (10 + n)), so a
    # short run averages its last ~10 % of updates instead of staying near the initial weights.
    # Validation, test scores, the sample grid and generator.safetensors use it. 0 = off.
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    # Start a fresh run from weights (deblur/training/init.py): a generator .safetensors file
    # (with discriminator.safetensors beside it, when there is one) or a finished run's
    # output_dir. Weights only: new optimizers, step 0. Resuming from this run's own
    # checkpoints wins: once it has one, init_from is not read again.
    init_from: LoosePath | None = None
    # Compute threads of each process (torch.set_num_threads). None = the OMP_NUM_THREADS the
    # user set, else the process's share of the usable cores (the cores it may run on divided by
    # the processes of the run sharing them), whatever a launcher set; logged at start.
    threads: PositiveInt | None = None
    # Diagnostic: append a hash of every training image each rank consumes to
    # output_dir/batches-rank<R>.jsonl (used to check that ranks see disjoint data).
    record_batches: bool = False


class WandbConfig(_Section):
    # auto = the WANDB_MODE environment variable if set, else offline (a local run folder that
    # `wandb sync` uploads later): online by default would hang or fail on compute nodes without
    # network, and a home directory's ~/.netrc (shared by every node of a cluster) says nothing
    # about the network. See deblur/training/tracking.py.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "deblur"
    name: str | None = None  # W&B run name; defaults to the output folder's name
    entity: str | None = None


class Config(_Section):
    output_dir: LoosePath
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig
    wandb: WandbConfig = WandbConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe dict (paths as strings): the resolved config that runs save."""
        return self.model_dump(mode="json")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats.

    YAML 1.1 makes yes/no/on/off booleans (so ``mixed_precision: no`` would be False) and
    needs a dot in floats (so ``1e-4`` would be a string).
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc


def apply_override(tree: dict[str, Any], override: str) -> dict[str, Any]:
    """Return a copy of ``tree`` with one ``a.b.c=value`` override applied (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    value = parse_yaml(raw, f"override {key}") if raw.strip() else None
    parts = key.split(".")
    new = dict(tree)
    node = new
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return new


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def build_config(tree: Any, source: str = "<config>") -> Config:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(tree).__name__}")
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read ``path``, apply ``key.sub=value`` overrides in order, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    tree = parse_yaml(text, str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        tree = apply_override(tree, override)
    source = str(path) + (f" with overrides {list(overrides)}" if overrides else "")
    return build_config(tree, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
