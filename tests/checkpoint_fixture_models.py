"""A custom model for the checkpoint fixtures of tests/fixtures/ (pickled by class path, so it
lives in an importable module): every kind of pickled usnet class a converted model holds."""

import timm
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Conv/BN/PReLU, a depthwise conv with GroupNorm and a layer scale (sliced parameter), a
    timm LayerNorm (plugin class) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.PReLU(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gn = nn.GroupNorm(4, 16)
        self.gamma = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.conv3 = nn.Conv2d(16, 24, 1)
        self.bn3 = nn.BatchNorm2d(24)
        self.ln = timm.layers.LayerNorm(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = x + self.gamma * self.gn(self.conv2(x))
        x = F.relu(self.bn3(self.conv3(x)))
        x = x.mean((2, 3))
        return self.fc(self.ln(x))
