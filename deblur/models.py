"""Generator and discriminator from the paper's layer tables (docs/design.md).

No padding anywhere: the spatial sizes below are those of a 64x64 input, and the skip
connections only line up for that size (the generator refuses anything else).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int, s: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s), nn.ReLU())


def _deconv(cin: int, cout: int, k: int, s: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, k, s), nn.ReLU())


class Generator(nn.Module):
    """Fully convolutional encoder-decoder with skip connections (E1..E4).

    Our choices where the paper is silent: ReLU after every layer but the last; the last layer is
    linear because images live in ImageNet-normalized space, not [0, 1]. With ``residual=True``
    the network predicts a correction added to its input and the last layer starts at zero, so
    an untrained generator is the identity; this makes short runs improve on the blurred input
    from the first step instead of first learning to copy it.
    """

    image_size = 64

    def __init__(self, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.enc1 = _conv(3, 64, 3, 1)  # 62, E1
        self.enc2 = _conv(64, 128, 3, 2)  # 30, E2
        self.enc3 = _conv(128, 256, 3, 1)  # 28, E3
        self.enc4 = _conv(256, 512, 3, 2)  # 13, E4
        self.bottleneck = _conv(512, 512, 3, 1)  # 11
        self.dec1 = _deconv(512, 128, 3, 1)  # 13, cat E4 -> 640
        self.dec2 = _deconv(640, 128, 4, 2)  # 28, cat E3 -> 384
        self.dec3 = _deconv(384, 64, 3, 1)  # 30, cat E2 -> 192
        self.dec4 = _deconv(192, 32, 3, 2)  # 61
        self.dec5 = _deconv(32, 16, 2, 1)  # 62, cat E1 -> 80
        self.dec6 = nn.ConvTranspose2d(80, 3, 3, 1)  # 64
        if residual:
            nn.init.zeros_(self.dec6.weight)
            nn.init.zeros_(self.dec6.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"Generator expects {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        d = self.dec1(self.bottleneck(e4))
        d = self.dec2(torch.cat([d, e4], 1))
        d = self.dec3(torch.cat([d, e3], 1))
        d = self.dec4(torch.cat([d, e2], 1))
        d = self.dec5(d)
        out = self.dec6(torch.cat([d, e1], 1))
        return x + out if self.residual else out


def _d_block(cin: int, cout: int, s: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, s), nn.BatchNorm2d(cout), nn.ReLU())


class Discriminator(nn.Module):
    """Binary classifier real vs restored. Returns a logit per image, shape (N,).

    The paper ends with a Sigmoid; we keep the logit and train with BCE-with-logits, which is
    numerically safer and allowed under CUDA autocast (plain BCELoss is refused there).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _d_block(3, 64, 1),  # 62
            _d_block(64, 128, 2),  # 30
            _d_block(128, 256, 1),  # 28
            _d_block(256, 512, 2),  # 13
        )
        self.classifier = nn.Linear(512 * 13 * 13, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1)).squeeze(1)
