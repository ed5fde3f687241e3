"""The slimmable counterparts of more PyTorch layers, each inside a small model: full width is
the plain model, every width exports to plain layers of the active shapes that compute the same."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import usnet
from usnet.nn.base import SlimmableLayer


class Seq1d(nn.Module):
    """Conv1d + BatchNorm1d on (N, C, L); Linear on (N, L, C) (features last)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 24)
        self.bn_flat = nn.BatchNorm1d(24 * 8)
        self.out = nn.Linear(24 * 8, 5)

    def forward(self, x):  # x: (N, 3, H, W) -> (N, 3, L)
        x = self.dw(torch.relu(self.bn(self.conv(x.mean(2)))))
        x = self.fc(x.transpose(1, 2))  # (N, L, 24)
        return self.out(self.bn_flat(torch.flatten(x.transpose(1, 2), 1)))


class Norms(nn.Module):
    """GroupNorm, InstanceNorm2d (affine), per-channel PReLU, ConvTranspose2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.gn = nn.GroupNorm(8, 32)
        self.act = nn.PReLU(32)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.plain_inorm = nn.InstanceNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.up(self.act(self.gn(self.conv(x))))
        return self.head(self.plain_inorm(self.inorm(x)))


MODELS = {"seq1d": Seq1d, "norms": Norms}


@torch.no_grad()
def _lively(model: nn.Module) -> nn.Module:
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p) * 0.2)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1)
    return model


def _pair(name):
    torch.manual_seed(0)
    plain = _lively(MODELS[name]()).eval()
    return plain, usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 8, 8)).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_width_is_the_plain_model_and_every_layer_is_bound(name):
    plain, model = _pair(name)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    bound = {b.layer for b in usnet.state.get_state(model).bindings}
    expected = {n for n, m in plain.named_modules() if n and not isinstance(m, (Seq1d, Norms))}
    expected -= {"plain_inorm"}  # no parameters: passes channels through
    assert bound == expected
    assert all(isinstance(model.get_submodule(n), SlimmableLayer) for n in bound)


_MODELS = {name: _pair(name)[1] for name in MODELS}


@pytest.mark.filterwarnings("ignore:input's size at dim=1 does not match num_features")
@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=6, deadline=None)
@given(width=st.floats(0.25, 0.99))
def test_export_at_random_widths_equals_the_slimmable_model(name, width):
    model = _MODELS[name]
    usnet.calibrate(model, [torch.randn(8, 3, 8, 8) for _ in range(2)], [width], num_images=16)
    plain = usnet.export(model, width)
    assert not any(isinstance(m, SlimmableLayer) for m in plain.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), usnet.width(model, width):
        y = model(x)
        assert torch.allclose(plain(x), y, atol=1e-5, rtol=1e-4)
    full = usnet.profile(model, 1.0, (1, 3, 8, 8))
    assert usnet.profile(model, width, (1, 3, 8, 8)).params <= full.params
    assert usnet.profile(model, 0.5, (1, 3, 8, 8)).params < full.params


def test_group_norm_keeps_its_group_size():
    _, model = _pair("norms")
    plan = usnet.channel_plan(model)
    assert plan.groups["conv"].divisor % 4 == 0  # 32 channels in 8 groups of 4
    usnet.set_width(model, 0.5)
    assert model.gn.active_features == 16
    plain = usnet.export(model, 0.5)
    assert (plain.gn.num_groups, plain.gn.num_channels) == (4, 16)
    assert plain.act.num_parameters == 16 and plain.up.in_channels == 16
