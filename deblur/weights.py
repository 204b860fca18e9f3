"""Generator weights on disk: ``generator.safetensors``, never a pickle.

The file holds the unwrapped generator's ``state_dict`` plus two metadata strings that say how
to rebuild the module before loading into it:

    {"residual": "true" | "false", "image_size": "64"}

safetensors stores only tensors and strings, so loading a file cannot run code (unlike
``torch.load`` of a pickle), which matters for weights downloaded from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from deblur.models import Generator


def save_generator(generator: Generator, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``generator`` (unwrapped: not the DDP/compiled wrapper) to ``path``.

    ``extra_metadata`` (strings, e.g. the training step) is stored beside the two keys above
    and ignored when loading."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or non-contiguous storage
    state = {k: v.detach().to("cpu").contiguous() for k, v in generator.state_dict().items()}
    metadata = {
        **(extra_metadata or {}),
        "residual": "true" if generator.residual else "false",
        "image_size": str(generator.image_size),
    }
    save_file(state, str(path), metadata=metadata)
    return path


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Rebuild the generator described by ``path``'s metadata and load its weights (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e

    residual = metadata.get("residual")
    if residual not in ("true", "false"):
        raise ValueError(f"{path}: metadata key 'residual' must be 'true' or 'false', got {residual!r}")
    image_size = metadata.get("image_size")
    if image_size != str(Generator.image_size):
        raise ValueError(
            f"{path}: metadata key 'image_size' is {image_size!r}; this Generator works at {Generator.image_size}"
        )

    generator = Generator(residual=residual == "true")
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the Generator ({e})") from e
    return generator.to(device).eval()
