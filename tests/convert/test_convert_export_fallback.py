"""Models torch.fx cannot trace symbolically (Python control flow over shapes) are traced with
non-strict torch.export; what neither can trace is refused with both reasons."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import usnet


class ShapeControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.branch = nn.Conv2d(16, 16, 3, padding=1)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        if x.shape[-1] > 4:  # fx: a Proxy cannot be a bool
            x = F.avg_pool2d(x, 2)
        y = F.relu(self.bn(self.conv(x)))
        y = torch.cat([y, self.branch(y)], 1)
        for _ in range(int(y.shape[1]) // 32):
            y = y * 1.0
        return self.fc(self.norm(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)))


def _plain():
    torch.manual_seed(0)
    model = ShapeControlFlow().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(1)
    return model


def test_shape_control_flow_converts_through_torch_export():
    plain = _plain()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(plain)
    model = usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 8, 8), divisor=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    usnet.set_width(model, 0.5)
    assert model.fc.active_in_index.tolist() == [*range(8), *range(16, 24)]
    usnet.calibrate(model, [torch.randn(4, 3, 8, 8)], [0.5], num_images=4)
    exported = usnet.export(model, 0.5)
    with torch.no_grad(), usnet.width(model, 0.5):
        assert torch.allclose(exported(x), model(x), atol=1e-5)


def test_what_neither_tracer_handles_is_refused_with_both_reasons():
    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y

    with pytest.raises(usnet.ConversionError, match=r"torch\.fx .*nor with torch\.export"):
        usnet.slimmable(ValueBranch(), input_size=(1, 3, 8, 8))


def test_a_layer_called_twice_is_refused_through_torch_export_too():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            if x.shape[1] == 3:
                x = self.stem(x)
            return self.conv(self.conv(x))

    with pytest.raises(usnet.ConversionError, match="more than once"):
        usnet.slimmable(Twice(), input_size=(1, 3, 8, 8))
