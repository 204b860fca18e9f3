"""Model weights on disk: ``generator.safetensors`` (and ``generator_raw.safetensors``,
``discriminator.safetensors`` from training), never a pickle.

A generator file holds the unwrapped generator's ``state_dict`` plus two metadata strings that
say how to rebuild the module before loading into it:

    {"residual": "true" | "false", "image_size": "64"}

and, from the trainer, which weights they are: ``"weights": "ema"`` (the exponential moving
average of training, what generator.safetensors holds by default) or ``"raw"`` (the trained
generator itself), with ``step`` and, for the EMA, ``ema_decay`` and ``ema_updates``. A
discriminator file (``"format": "deblur-discriminator"``) holds D's ``state_dict``, BatchNorm
statistics included; ``train.init_from`` loads it to fine-tune the GAN.

safetensors stores only tensors and strings, so loading a file cannot run code (unlike
``torch.load`` of a pickle), which matters for weights downloaded from elsewhere. Loading
refuses, naming the file and the tensor or key, tensors that are not the model's (names,
shapes, kinds), weights holding NaN or inf, and missing metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from deblur.errors import InputError
from deblur.models import Discriminator, Generator


def save_generator(generator: Generator, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``generator`` (unwrapped: not the DDP/compiled wrapper) to ``path``.

    ``extra_metadata`` (strings, e.g. the training step) is stored beside the two keys above
    and ignored when loading."""
    metadata = {
        **(extra_metadata or {}),
        "residual": "true" if generator.residual else "false",
        "image_size": str(generator.image_size),
    }
    return _save(generator, path, metadata)


def save_discriminator(
    discriminator: Discriminator, path: str | Path, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write ``discriminator`` (unwrapped) to ``path``, for :func:`load_discriminator_state`."""
    return _save(discriminator, path, {**(extra_metadata or {}), "format": "deblur-discriminator"})


def _save(module: torch.nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or non-contiguous storage
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


class WeightsError(InputError, ValueError):
    """A weights file that cannot be used: missing, unreadable, or not this project's generator."""


def check_tensors(path: Path, state: dict[str, torch.Tensor], model: type[torch.nn.Module] = Generator) -> None:
    """Refuse tensors that are not ``model``'s (by name, shape and kind) or hold NaN/inf.

    A NaN or inf weight (a diverged run, a damaged file) makes every output black or NaN, so it
    is refused here, at load, rather than discovered in the images."""
    expected, model_name = model().state_dict(), model.__name__
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        parts = [f"missing tensor {missing[0]!r}"] if missing else []
        parts += [f"unexpected tensor {unexpected[0]!r}"] if unexpected else []
        counts = f" ({len(missing)} missing, {len(unexpected)} unexpected of {len(expected)})"
        raise WeightsError(f"{path}: not a deblur {model_name}'s weights: {', '.join(parts)}{counts}")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise WeightsError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)}, the {model_name}'s is {list(want.shape)}"
            )
        if tensor.is_floating_point() != want.is_floating_point():
            raise WeightsError(f"{path}: tensor {name!r} is {tensor.dtype}, the {model_name}'s is {want.dtype}")
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise WeightsError(
                f"{path}: tensor {name!r} holds {bad} NaN/inf values of {tensor.numel()}: "
                "the run that wrote it diverged or the file is damaged"
            )


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file; a WeightsError naming it if missing
    or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def generator_state(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(the checked tensors, residual) of a generator file; WeightsError naming the file and
    the tensor or metadata key at fault."""
    path = Path(path)
    state, metadata = read_weights(path)
    check_tensors(path, state)
    residual = metadata.get("residual")
    if residual not in ("true", "false"):
        raise WeightsError(
            f"{path}: metadata key 'residual' must be 'true' or 'false', got {residual!r} "
            "(files written by deblur.weights.save_generator have it)"
        )
    image_size = metadata.get("image_size")
    if image_size != str(Generator.image_size):
        raise WeightsError(
            f"{path}: metadata key 'image_size' is {image_size!r}; this Generator works at {Generator.image_size}"
        )
    return state, residual == "true"


def load_discriminator_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checked tensors of a discriminator file (WeightsError naming the file and tensor)."""
    path = Path(path)
    state, _ = read_weights(path)
    check_tensors(path, state, Discriminator)
    return state


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the generator described by ``path``'s metadata and load its weights (eval mode),
    after :func:`check_tensors`; any problem is a :class:`WeightsError` naming the file."""
    state, residual = generator_state(path)
    generator = Generator(residual=residual)
    generator.load_state_dict(state, strict=True)  # names and shapes checked above
    return generator.to(device).eval()
