"""generator.safetensors round trip and clear refusals of bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from deblur.models import Generator
from deblur.weights import WeightsError, load_generator, save_generator


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
    save_file(Generator().state_dict(), str(path))  # the right tensors, no metadata
    with pytest.raises(WeightsError, match=r"g\.safetensors: metadata key 'residual' must be"):
        load_generator(path)


def test_other_tensor_names_are_named_before_the_metadata(tmp_path):
    """Weights of another model (no metadata either) name a tensor, not a metadata key."""
    path = tmp_path / "g.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsError) as raised:
        load_generator(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not a deblur Generator's weights: missing tensor 'enc1.0.weight'")
    assert "unexpected tensor 'w'" in message and "metadata" not in message


def test_a_tensor_of_another_shape_is_named(tmp_path):
    state = Generator().state_dict()
    state["dec6.weight"] = torch.zeros(80, 4, 3, 3)
    path = tmp_path / "g.safetensors"
    save_file(state, str(path), metadata={"residual": "true", "image_size": "64"})
    with pytest.raises(
        WeightsError, match=r"tensor 'dec6\.weight' has shape \[80, 4, 3, 3\], the Generator's is \[80, 3, 3, 3\]"
    ):
        load_generator(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    state = Generator().state_dict()
    state["enc2.0.weight"][0, 0, 0, 0] = value
    path = save_generator_state(tmp_path, state)
    with pytest.raises(WeightsError, match=r"tensor 'enc2\.0\.weight' holds 1 NaN/inf values of 73728"):
        load_generator(path)


def save_generator_state(tmp_path, state):
    path = tmp_path / "g.safetensors"
    save_file(state, str(path), metadata={"residual": "true", "image_size": "64"})
    return path


def test_garbage_file_and_folder_are_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(WeightsError, match=r"g\.safetensors: not a readable safetensors file"):
        load_generator(path)
    with pytest.raises(WeightsError, match=r"weights file not found \(it is a folder\)"):
        load_generator(tmp_path)
