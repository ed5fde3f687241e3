"""Model code written the way model libraries write it: shape queries, assertions, casts,
crops, padding, interpolation, permutes and softmax keep the channels; mixing channel layouts is
refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import usnet


class LibraryStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.proj = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        torch._assert(x.ndim == 4, "NCHW input")
        torch._assert(x.size(1) == 3, "RGB input")
        y = self.conv(x).float().contiguous()
        y = F.pad(y, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]  # a crop of the padding
        y = self.up(y)[..., :h, :w]
        y = F.interpolate(self.proj(y), size=(h, w), mode="bilinear", align_corners=False)
        z = y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return torch.softmax(self.head(z + getattr(y, "shape")[1] * 0.0), dim=1)


def test_library_style_code_converts_and_exports():
    model = usnet.slimmable(LibraryStyle(), input_size=(1, 3, 8, 8)).eval()
    usnet.set_width(model, 0.5)
    assert model.proj.active_in_channels == 8 and model.head.active_in_channels == 8
    x = torch.randn(2, 3, 8, 8)
    plain = usnet.export(model, 0.5)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 5, 8, 8)
        assert torch.allclose(plain(x), y, atol=1e-6)


def test_channel_crop_and_mixed_layouts_are_refused():
    class ChannelCrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            return self.conv(x)[:, :8]

    class MixedLayout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):  # an 8x8 input: (N, 8, 8, 8) either way round
            return self.a(x) + self.b(x).permute(0, 3, 2, 1)

    with pytest.raises(usnet.ConversionError, match="indexing a tensor that carries channels"):
        usnet.slimmable(ChannelCrop(), input_size=(1, 3, 8, 8))
    with pytest.raises(usnet.ConversionError, match="channels at different dimensions"):
        usnet.slimmable(MixedLayout(), input_size=(1, 3, 8, 8))
