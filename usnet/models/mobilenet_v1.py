"""MobileNetV1 (Howard et al., 2017) as a plain torchvision-style model.

torchvision has no MobileNetV1; this one follows ``torchvision.models.mobilenet_v2``'s layout and
naming (``features`` of ``Conv2dNormActivation`` blocks, ``classifier``) and its channel rule, so
``mobilenet_v1(width_mult=w)`` is exactly the plain network that a US-MobileNetV1 exports at ``w``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ..channels import make_divisible

# (output channels, stride) of each depthwise-separable block, as in the MobileNetV1 paper.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.conv = nn.Sequential(
            Conv2dNormActivation(inp, inp, 3, stride, groups=inp, activation_layer=nn.ReLU),
            Conv2dNormActivation(inp, oup, 1, activation_layer=nn.ReLU),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class MobileNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        small_input: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = make_divisible(32 * width_mult, 8)
        # small_input: 28-32 px images keep resolution in the stem and the first downsampling block.
        layers: list[nn.Module] = [
            Conv2dNormActivation(in_channels, channels, 3, 1 if small_input else 2,
                                 activation_layer=nn.ReLU)
        ]  # fmt: skip
        first_downsample = True
        for out, stride in MOBILENET_V1_BLOCKS:
            if small_input and stride == 2 and first_downsample:
                stride, first_downsample = 1, False
            out = make_divisible(out * width_mult, 8)
            layers.append(DepthwiseSeparable(channels, out, stride))
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v1(**kwargs) -> MobileNetV1:
    """A plain MobileNetV1; ``width_mult`` scales every layer by torchvision's channel rule."""
    return MobileNetV1(**kwargs)
