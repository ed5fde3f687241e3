"""Concatenation along channels: ordered segments, each active on a prefix of its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from usnet_testing import liven

import usnet
from usnet import ConversionError


class Inception(nn.Module):
    """Two branches concatenated, then a conv and a BN over the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.mix = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = F.relu(self.bn(y))
        z = torch.cat([self.mix(y), x], dim=1)  # a dense connection: new features, then the input
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 2), 1))


def _converted():
    model = liven(usnet.slimmable(Inception(), input_size=(1, 3, 8, 8), divisor=4))
    usnet.calibrate(
        model, [torch.randn(8, 3, 8, 8) for _ in range(2)], [0.25, 0.5, 0.7, 1.0], num_images=16
    )
    return model.eval()


def test_layers_after_a_concatenation_take_each_segments_prefix():
    model = _converted()
    x = torch.randn(2, 3, 8, 8)
    usnet.set_width(model, 0.5)
    a, b, s = (
        model.a.active_out_channels,
        model.b.active_out_channels,
        model.stem.active_out_channels,
    )
    assert (a, b, s) == (12, 4, 8)
    assert model.mix.active_in_channels == a + b
    expected_index = list(range(a)) + list(range(24, 24 + b))
    assert model.mix.active_in_index.tolist() == expected_index
    assert model.bn.active_index.tolist() == expected_index
    # the sub-network by hand: every active channel plays the role it plays at full width
    with torch.no_grad():
        h = F.relu(F.conv2d(x, model.stem.weight[:s], model.stem.bias[:s], padding=1))
        ya = F.conv2d(h, model.a.weight[:a, :s], model.a.bias[:a])
        yb = F.conv2d(h, model.b.weight[:b, :s], model.b.bias[:b], padding=1)
        y = torch.cat([ya, yb], 1)
        mean, var = model.bn.current_stats()
        index = torch.tensor(expected_index)
        y = F.relu(
            F.batch_norm(
                y, mean, var, model.bn.weight[index], model.bn.bias[index], eps=model.bn.eps
            )
        )
        m = model.mix.active_out_channels
        z = torch.cat([F.conv2d(y, model.mix.weight[:m, index], model.mix.bias[:m]), h], 1)
        features = torch.flatten(F.adaptive_avg_pool2d(z, 2), 1)
        # the Linear's input: mix's first m channels (4 features each), then the stem's s
        columns = list(range(4 * m)) + list(range(64, 64 + 4 * s))
        expected = F.linear(features, model.fc.weight[:, columns], model.fc.bias)
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert model.fc.active_in_index.tolist() == columns


@settings(max_examples=8, deadline=None)
@given(width=st.floats(0.25, 1.0))
def test_export_equals_the_slimmable_model(width):
    model = _CONVERTED
    usnet.calibrate(model, [torch.randn(8, 3, 8, 8) for _ in range(2)], [width], num_images=16)
    plain = usnet.export(model, width)
    assert not any(isinstance(m, usnet.nn.base.SlimmableLayer) for m in plain.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), usnet.width(model, width):
        assert torch.allclose(model(x), plain(x), atol=1e-5)
        assert plain.mix.in_channels == model.mix.active_in_channels
        assert plain.fc.in_features == model.fc.active_in_features


_CONVERTED = _converted()


def test_full_width_equals_the_plain_model():
    plain = liven(Inception()).eval()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(1)
    x = torch.randn(2, 3, 8, 8)
    expected = plain(x)
    import copy

    model = usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 8, 8)).eval()
    assert torch.equal(model(x), expected)


def test_concatenation_along_other_dimensions_ties_the_inputs():
    """torch.cat(..., dim=0) is not refused: it ties its inputs' channels (equal at any width)."""

    class BatchCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), self.b(x)], dim=0))

    model = usnet.slimmable(BatchCat(), input_size=(1, 3, 8, 8))
    usnet.set_width(model, 0.5)
    assert model.a.active_out_channels == model.b.active_out_channels == 8
    assert model(torch.randn(2, 3, 8, 8)).shape == (4, 4, 8, 8)


def test_the_same_tensor_twice_and_a_split_back_into_the_pieces():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 16, 3, padding=1)
            self.c = nn.Conv2d(16, 8, 1)
            self.d = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y = self.a(x)
            both = torch.cat([y, y, self.b(x)], 1)
            p, q = torch.split(both, [16, 16], dim=1)  # constant sizes: refused
            return self.c(p) + self.d(q)

    class TwiceChunked(Twice):
        def forward(self, x):
            y = self.a(x)
            p, q = torch.cat([y, y, self.b(x)], 1).chunk(2, dim=1)  # not the same groups: refused
            return self.c(p) + self.d(q)

    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.a2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.c, self.d = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y, z = self.a(x), self.a2(x)
            p, q = torch.cat([y, z, y, z], 1).chunk(2, dim=1)
            return self.c(p) + self.d(q)

    for net in (Twice, TwiceChunked):
        with pytest.raises(ConversionError, match=r"(split|chunk) into \[16, 16\] cuts"):
            usnet.slimmable(net(), input_size=(1, 3, 8, 8), divisor=4)
    model = usnet.slimmable(Chunked(), input_size=(1, 3, 8, 8), divisor=4)
    usnet.set_width(model, 0.5)
    assert model.a2.active_out_channels == 4
    assert model.c.active_in_index.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert model.d.active_in_index.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    x = torch.randn(1, 3, 8, 8)
    assert model(x).shape == (1, 8, 8, 8)
    usnet.calibrate(model, [torch.randn(4, 3, 8, 8)], [0.5], num_images=4)
    with torch.no_grad():
        assert torch.allclose(usnet.export(model, 0.5)(x), model.eval()(x), atol=1e-5)


def test_a_split_inside_one_group_is_refused():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            p, q = torch.split(self.a(x), 8, dim=1)
            return p * q

    with pytest.raises(ConversionError, match=r"split.*not whole channel groups"):
        usnet.slimmable(Halves(), input_size=(1, 3, 8, 8))


def test_checkpoints_keep_segmented_bindings(tmp_path):
    model = _converted()
    usnet.set_width(model, 0.5)
    path = usnet.save(model, tmp_path / "cat.pt")
    loaded = usnet.load(path).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.mix.active_in_index.tolist() == model.mix.active_in_index.tolist()
