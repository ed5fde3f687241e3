"""Extension points: a user's own layer works everywhere once registered; a user's own op too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import usnet
from usnet.convert import MODULE_OPS, pass_through
from usnet.nn.base import SLIMMABLE_LAYERS, ActiveChannels, SlimmableLayer, take


class Scale(nn.Module):
    """A per-channel scale: a layer type usnet does not know."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class SlimmableScale(SlimmableLayer, Scale):
    channel_role = "features"

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.active = ActiveChannels(self.weight.shape[0])

    def active_attrs(self, inputs, outputs, stats_key):
        return {"active": outputs}

    def active_weight(self):
        return take(self.weight, 0, self.active.count, self.active.index)

    def forward(self, x):
        return x * self.active_weight().view(1, -1, 1, 1)

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        plain = Scale(self.active.count)
        with torch.no_grad():
            plain.weight.copy_(self.active_weight())
        return plain


class Gate(nn.Module):
    """Untraceable Python control flow on values: registered as an op that keeps channels."""

    def forward(self, x):
        return x if float(x.mean()) > -1e9 else -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = Scale(24)
        self.gate = Gate()
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.scale(torch.cat([self.a(x), self.b(x)], 1))))


@pytest.fixture
def registered():
    usnet.register_slimmable(Scale, SlimmableScale)
    usnet.register_op(Gate, pass_through)
    yield
    del SLIMMABLE_LAYERS[Scale]
    del MODULE_OPS[Gate]


def test_unregistered_layers_are_refused_with_what_to_do():
    with pytest.raises(usnet.ConversionError, match=r"'scale' \(Scale\).*register_slimmable"):
        usnet.slimmable(Net(), input_size=(1, 3, 8, 8), leaf_modules=(Scale, Gate))
    with pytest.raises(usnet.ConversionError, match=r"cannot trace Net.*usnet.register_op"):
        usnet.slimmable(Net(), input_size=(1, 3, 8, 8))


def test_a_registered_layer_converts_slims_exports_and_saves(registered, tmp_path):
    model = usnet.slimmable(Net(), input_size=(1, 3, 8, 8), divisor=4).eval()
    assert isinstance(model.scale, SlimmableScale) and isinstance(model.scale, Scale)
    usnet.set_width(model, 0.5)
    assert model.scale.active.count == 12
    assert model.scale.active.index.tolist() == [*range(8), *range(16, 20)]
    x = torch.randn(2, 3, 8, 8)
    plain = usnet.export(model, 0.5)
    assert type(plain.scale) is Scale and plain.scale.weight.shape == (12,)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(plain(x), expected, atol=1e-6)
    loaded = usnet.load(usnet.save(model, tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)
    assert (
        usnet.profile(model, 0.5, input_size=(1, 3, 8, 8)).macs
        < usnet.profile(model, 1.0, input_size=(1, 3, 8, 8)).macs
    )


def test_register_rejects_what_cannot_work():
    with pytest.raises(TypeError, match="must subclass both"):
        usnet.register_slimmable(Scale, SlimmableScale.__mro__[-2])
    with pytest.raises(TypeError, match="not an nn.Module class"):
        usnet.register_slimmable(int, SlimmableScale)
    with pytest.raises(TypeError, match="must be an nn.Module class, a function or a method name"):
        usnet.register_op(3, pass_through)
    with pytest.raises(TypeError, match="not callable"):
        usnet.register_op(Gate, None)
