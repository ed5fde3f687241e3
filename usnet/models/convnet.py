"""A plain VGG-style CNN for small images (Fashion-MNIST, CIFAR): 3x3 conv-BN-ReLU stages.

``convnet(width_mult=w)`` scales every stage by torchvision's channel rule, so it is exactly the
plain network that a US-ConvNet exports at ``w``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ..channels import make_divisible

DEFAULT_CHANNELS = (32, 64, 64, 128, 128)
DEFAULT_STRIDES = (1, 2, 1, 2, 1)


class ConvNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        strides: Sequence[int] = DEFAULT_STRIDES,
        width_mult: float = 1.0,
        dropout: float = 0.0,
        pool_size: int = 1,
    ):
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError("channels and strides must be non-empty and of equal length")
        layers: list[nn.Module] = []
        cin = in_channels
        for c, s in zip(channels, strides):
            cout = make_divisible(c * width_mult, 8)
            layers.append(Conv2dNormActivation(cin, cout, 3, s, activation_layer=nn.ReLU))
            cin = cout
        self.features = nn.Sequential(*layers)
        # pool_size > 1 keeps a coarse spatial layout for the classifier (flattened channel-major).
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(cin * pool_size * pool_size, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def convnet(**kwargs) -> ConvNet:
    return ConvNet(**kwargs)
