"""ConvNeXt-style blocks: permute, LayerNorm over channels, Linear on the last dimension,
torchvision's LayerNorm2d and a layer-scale parameter used directly in the forward code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d

import usnet
from usnet.nn.norm import SlimmableLayerNorm, SlimmableLayerNorm2d


class Block(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.stem_norm = LayerNorm2d(dim)
        self.block = CNBlock(dim, layer_scale=0.5, stochastic_depth_prob=0.0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.block(self.stem_norm(self.stem(x)))
        return self.head(self.norm(x.mean((2, 3))))


@torch.no_grad()
def _lively(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def test_full_width_equals_the_plain_model_and_layers_are_slimmable():
    plain = _lively(Block()).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = plain(x)
    model = usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 8, 8)).eval()
    assert torch.equal(model(x), expected)
    assert type(model.stem_norm) is SlimmableLayerNorm2d and type(model.norm) is SlimmableLayerNorm
    assert model.block.layer_scale.shape == (16, 1, 1)
    assert model.state_dict().keys() == plain.state_dict().keys()
    usnet.set_width(model, 0.5)
    assert model.block.layer_scale.shape == (8, 1, 1)  # follows the channels it scales
    assert model.block._parameters["layer_scale"].shape == (16, 1, 1)  # the parameter is whole
    assert model.block.block[3].active_in_features == 8  # Linear on channels-last input
    assert model.block.block[3].active_out_features == 32


def test_layer_norm_statistics_are_over_the_active_channels():
    model = usnet.slimmable(_lively(Block()), input_size=(1, 3, 8, 8)).eval()
    usnet.set_width(model, 0.5)
    y = torch.randn(4, 8)
    norm = model.norm
    expected = F.layer_norm(y, (8,), norm.weight[:8], norm.bias[:8], norm.eps)
    assert torch.allclose(norm(y), expected)


@settings(max_examples=6, deadline=None)
@given(width=st.floats(0.25, 1.0))
def test_export_equals_the_slimmable_model(width):
    model = _MODEL
    plain = usnet.export(model, width)
    assert type(plain.stem_norm) is LayerNorm2d and type(plain.norm) is nn.LayerNorm
    assert type(plain.block) is CNBlock and "layer_scale" in plain.block._parameters
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), usnet.width(model, width):
        assert torch.allclose(model(x), plain(x), atol=1e-5)
        assert plain.block.layer_scale.shape[0] == model.stem.active_out_channels


_MODEL = usnet.slimmable(_lively(Block()), input_size=(1, 3, 8, 8)).eval()


def test_checkpoint_round_trip_keeps_the_sliced_parameter(tmp_path):
    model = copy.deepcopy(_MODEL)
    usnet.set_width(model, 0.5)
    loaded = usnet.load(usnet.save(model, tmp_path / "block.pt")).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.block.layer_scale.shape == (8, 1, 1)


def test_layer_norm_over_more_than_the_channels_is_refused():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm([8, 8])

        def forward(self, x):
            return self.norm(self.conv(x).permute(0, 2, 3, 1))

    with pytest.raises(usnet.ConversionError, match=r"'norm' \(LayerNorm\).*mixes the channels"):
        usnet.slimmable(Wide(), input_size=(1, 3, 8, 8))


def test_torchvision_convnext_tiny_exports_at_a_random_width():
    model = usnet.slimmable(_lively(__import__("torchvision").models.convnext_tiny()),
                            input_size=(1, 3, 64, 64)).eval()  # fmt: skip
    plain = usnet.export(model, 0.6)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), usnet.width(model, 0.6):
        assert torch.allclose(model(x), plain(x), atol=1e-4, rtol=1e-4)
    assert (
        usnet.profile(model, 0.6, (1, 3, 64, 64)).macs
        < 0.5 * usnet.profile(model, 1.0, (1, 3, 64, 64)).macs
    )
