"""The networks match the paper's tables (docs/design.md): every layer's output size for a 64x64
input, and parameter counts computed from the tables' shapes, independently of the code."""

from __future__ import annotations

import pytest
import torch

from deblur.models import Discriminator, Generator

# (name, in channels, out channels, kernel, output size) straight from the table in docs/design.md.
GENERATOR_TABLE = [
    ("enc1", 3, 64, 3, 62),
    ("enc2", 64, 128, 3, 30),
    ("enc3", 128, 256, 3, 28),
    ("enc4", 256, 512, 3, 13),
    ("bottleneck", 512, 512, 3, 11),
    ("dec1", 512, 128, 3, 13),
    ("dec2", 640, 128, 4, 28),
    ("dec3", 384, 64, 3, 30),
    ("dec4", 192, 32, 3, 61),
    ("dec5", 32, 16, 2, 62),
    ("dec6", 80, 3, 3, 64),
]
# Discriminator convs: (in, out, kernel, output size), each followed by BatchNorm2d(out).
DISCRIMINATOR_CONVS = [(3, 64, 3, 62), (64, 128, 3, 30), (128, 256, 3, 28), (256, 512, 3, 13)]


def conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout  # weights + bias (same count for ConvTranspose2d)


def output_sizes(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    sizes = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape))
        )
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize("residual", [True, False])
def test_generator_layer_outputs_follow_the_table(residual):
    g = Generator(residual=residual)
    sizes = output_sizes(g, [row[0] for row in GENERATOR_TABLE], torch.randn(2, 3, 64, 64))
    for name, _cin, cout, _k, size in GENERATOR_TABLE:
        assert sizes[name] == (2, cout, size, size), name
    assert g(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_generator_parameter_count_matches_the_table():
    expected = sum(conv_params(cin, cout, k) for _n, cin, cout, k, _s in GENERATOR_TABLE)
    assert sum(p.numel() for p in Generator().parameters()) == expected


def test_residual_generator_starts_as_identity():
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(Generator(residual=True)(x), x)


def test_generator_refuses_other_sizes():
    with pytest.raises(ValueError, match="64x64"):
        Generator()(torch.randn(1, 3, 96, 96))


def test_discriminator_layer_outputs_and_logit_shape():
    d = Discriminator()
    sizes = {}
    convs = [m for m in d.features.modules() if isinstance(m, torch.nn.Conv2d)]
    for i, conv in enumerate(convs):
        conv.register_forward_hook(lambda _m, _i, out, i=i: sizes.__setitem__(i, tuple(out.shape)))
    logits = d(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3,)
    for i, (_cin, cout, _k, size) in enumerate(DISCRIMINATOR_CONVS):
        assert sizes[i] == (3, cout, size, size)


def test_discriminator_parameter_count_matches_the_table():
    convs = sum(conv_params(cin, cout, k) + 2 * cout for cin, cout, k, _s in DISCRIMINATOR_CONVS)  # + BN affine
    linear = 512 * 13 * 13 + 1
    assert sum(p.numel() for p in Discriminator().parameters()) == convs + linear


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero weights everywhere (the residual generator's last layer starts at zero,
    which would hide differences in it)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("make", [Generator, Discriminator])
def test_channels_last_models_compute_the_same_outputs(make):
    model = trained_like(make())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    model.to(memory_format=torch.channels_last)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The state dict has the same keys and values (only strides differ): checkpoints move freely.
    reference = make().state_dict()
    assert model.state_dict().keys() == reference.keys()


def test_compiled_generator_agrees_with_eager_and_keeps_its_keys():
    generator = trained_like(Generator()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.no_grad():
        expected = generator(x)
        keys = list(generator.state_dict())
        generator.compile()  # in place, as the trainer does
        got = generator(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert list(generator.state_dict()) == keys
