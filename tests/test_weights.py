"""generator.safetensors round trip and clear refusals of bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from deblur.models import Generator
from deblur.weights import load_generator, save_generator


@pytest.mark.parametrize("residual", [True, False])
def test_round_trip_restores_outputs_and_variant(tmp_path, residual):
    torch.manual_seed(0)
    g = Generator(residual=residual)
    torch.nn.init.normal_(g.dec6.weight, std=0.01)  # residual init is zero: make outputs differ
    path = save_generator(g, tmp_path / "sub" / "generator.safetensors")
    loaded = load_generator(path)
    assert loaded.residual is residual
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(g.eval()(x), loaded(x))


def test_missing_metadata_is_named(tmp_path):
    path = tmp_path / "g.safetensors"
    save_file(Generator().state_dict(), str(path))  # no metadata
    with pytest.raises(ValueError, match="residual"):
        load_generator(path)


def test_wrong_tensors_are_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"residual": "true", "image_size": "64"})
    with pytest.raises(ValueError, match="do not match"):
        load_generator(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="g.safetensors"):
        load_generator(path)
