"""usnet.slimmable / usnet.analyze: converting torchvision and custom models."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from usnet_testing import (
    active_out,
    check_bindings,
    grid,
    group_of,
    liven,
    max_abs_diff,
    random_mapping,
    slimmable_modules,
    tiny_cnn,
)

import usnet
from usnet import ConversionError

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"]
SIZE = 32


@functools.lru_cache(maxsize=None)
def trained_pair(name: str):
    """(plain model, converted deep copy), with 'trained-looking' BN running statistics."""
    torch.manual_seed(0)
    plain = liven(getattr(torchvision.models, name)(num_classes=10))
    plain.train()
    with torch.no_grad():
        for i in range(3):
            plain(torch.randn(4, 3, SIZE, SIZE) * (1 + i) + 0.5)
    plain.eval()
    converted = usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, SIZE, SIZE))
    return plain, converted


@pytest.mark.parametrize("name", TORCHVISION)
def test_full_width_equals_plain_model(name):
    plain, model = trained_pair(name)
    model.eval()
    usnet.set_width(model, 1.0)
    assert usnet.get_width(model) == 1.0
    assert slimmable_modules(model)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    bn = next(m for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3 and bn.running_var.mean() != 1.0
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = plain(x)
        got = model(x)
    assert expected.abs().max() > 0.1  # non-trivial logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", TORCHVISION)
def test_random_widths_in_train_mode(name):
    _, model = trained_pair(name)
    model = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, SIZE, SIZE)
    widths = [0.25, 0.25 + 0.75 * torch.rand((), generator=gen).item(), 0.5, 0.8, 1.0]
    with torch.no_grad():
        for w in [*widths, random_mapping(model, gen)]:
            usnet.set_width(model, w)
            check_bindings(model)
            assert model(x).shape == (2, 10)
        usnet.set_width(model, 0.25)
        small = model(x)
        usnet.set_width(model, 1.0)
        assert max_abs_diff(small, model(x)) > 1e-3  # the width matters


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "mobilenet_v2"])
def test_converted_torchvision_export_equals_slimmable_at_reduced_widths(name):
    """Not only shapes: the plain network exported at a reduced width (uniform and non-uniform)
    computes what the converted model computes there, after calibration."""
    _, converted = trained_pair(name)
    model = copy.deepcopy(converted)
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(8, 3, SIZE, SIZE, generator=gen) * 1.5 + 0.3 for _ in range(2)]
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    widths = [0.25, 0.55, random_mapping(model, gen)]
    usnet.calibrate(model, calib, widths=widths, num_images=16)
    model.eval()
    for w in widths:
        with torch.no_grad(), usnet.width(model, w):
            expected = model(x)
        plain = usnet.export(model, w)
        assert not slimmable_modules(plain)
        with torch.no_grad():
            got = plain(x)
        assert expected.abs().max() > 0.05  # logits are not ~0
        assert max_abs_diff(got, expected) <= 1e-5, (name, w)
        with torch.no_grad(), usnet.width(model, 1.0):
            assert max_abs_diff(model(x), expected) > 1e-3  # the reduced width is a different net
    full = sum(p.numel() for p in converted.parameters())
    assert sum(p.numel() for p in usnet.export(model, 0.25).parameters()) < full / 4


def ties(model, layers, widths=(0.25, 0.4, 0.6, 0.85, 1.0)):
    """All ``layers`` share one group and have equal active outputs at each width."""
    groups = {group_of(model, name) for name in layers}
    assert len(groups) == 1, groups
    for w in widths:
        usnet.set_width(model, w)
        counts = {active_out(model.get_submodule(name)) for name in layers}
        assert len(counts) == 1, (w, counts)
    return groups.pop()


def test_resnet_residual_ties():
    _, model = trained_pair("resnet18")
    ties(model, ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.0.bn2"])
    ties(model, ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"])
    ties(model, ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"])
    # convs inside a block are free
    assert group_of(model, "layer1.0.conv1") != group_of(model, "layer1.0.conv2")
    assert group_of(model, "layer1.0.conv1") != group_of(model, "layer1.1.conv1")
    _, model = trained_pair("resnet50")
    ties(model, ["layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3", "layer1.2.conv3"])
    ties(model, ["layer3.0.conv3", "layer3.0.downsample.0", "layer3.5.conv3"])
    assert group_of(model, "layer1.0.conv3") != group_of(model, "layer2.0.conv3")
    usnet.set_width(model, 1.0)


def test_mobilenet_and_efficientnet_residual_ties():
    _, model = trained_pair("mobilenet_v2")
    ties(model, ["features.2.conv.2", "features.3.conv.2"])
    # depthwise convs tie their output to their input (the expansion)
    ties(model, ["features.2.conv.0.0", "features.2.conv.1.0"])
    _, model = trained_pair("efficientnet_b0")
    ties(model, ["features.2.0.block.3.0", "features.2.1.block.3.0"])
    ties(model, ["features.2.1.block.0.0", "features.2.1.block.1.0", "features.2.1.block.2.fc2"])
    usnet.set_width(model, 1.0)


def test_squeeze_excitation_ties_channels():
    _, model = trained_pair("mobilenet_v3_large")
    block = "features.4.block"
    assert isinstance(model.get_submodule(f"{block}.2"), torchvision.ops.misc.SqueezeExcitation)
    group = ties(model, [f"{block}.0.0", f"{block}.1.0", f"{block}.2.fc2"])
    assert group_of(model, f"{block}.2.fc1") != group
    # the squeeze conv reads the excited channels
    usnet.set_width(model, 0.5)
    fc1 = model.get_submodule(f"{block}.2.fc1")
    assert fc1.active_in_channels == model.get_submodule(f"{block}.1.0").active_out_channels
    assert fc1.active_in_channels < fc1.in_channels
    # residual connections of mobilenet_v3 (features.3 adds to features.2)
    ties(model, ["features.2.block.2.0", "features.3.block.2.0"])
    usnet.set_width(model, 1.0)


def test_conversion_keeps_parameter_objects_and_names():
    plain = torchvision.models.resnet18(num_classes=10)
    ids = {name: id(p) for name, p in plain.named_parameters()}
    model = usnet.slimmable(plain, input_size=(1, 3, SIZE, SIZE))
    assert model is plain
    assert {name: id(p) for name, p in model.named_parameters()} == ids
    assert isinstance(model.conv1, usnet.SlimmableConv2d)
    assert isinstance(model.bn1, usnet.SlimmableBatchNorm2d)
    assert isinstance(model.fc, usnet.SlimmableLinear)
    assert model.bn1.usnet_name == "bn1"
    assert usnet.state.get_state(model).arch is None


def test_analyze_does_not_modify_model():
    plain = tiny_cnn()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    analysis = usnet.analyze(plain, (0.5, 1.0), example_input=torch.zeros(1, 3, 8, 8))
    assert not usnet.is_slimmable(plain) and not slimmable_modules(plain)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, before[k])
    assert analysis.plan.width_range == (0.5, 1.0)
    assert analysis.plan.root_names == ["0"]
    assert [b.layer for b in analysis.bindings] == ["0", "1", "5"]
    converted = usnet.slimmable(plain, (0.5, 1.0), input_size=(1, 3, 8, 8))
    assert usnet.channel_plan(converted) == analysis.plan


def test_width_range_and_divisor_arguments():
    model = usnet.slimmable(tiny_cnn(channels=40), (0.3, 0.9), input_size=(1, 3, 8, 8), divisor=4)
    assert usnet.get_width(model) == 0.9
    assert model[0].active_out_channels == 36  # make_divisible(40 * 0.9, 4)
    usnet.set_width(model, 0.3)
    assert model[0].active_out_channels == 12
    with pytest.raises(ValueError, match="width_range"):
        usnet.slimmable(tiny_cnn(), (0.5, 1.2), input_size=(1, 3, 8, 8))


# --- refusals ---------------------------------------------------------------------------------
class ShuffleNet(nn.Module):
    """A channel shuffle (ShuffleNetV2): a view of the channels into groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


class ViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.size(0), -1))


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 8, 8])

    def forward(self, x):
        return self.norm(self.conv(x))


class Linear3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean(3))


class BranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1))

    def forward(self, x):
        return F.conv2d(self.conv(x), self.w)


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(self.stem(x)))


class IndexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.head(self.conv(x)[:, :4])


class ReshapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(-1, 8 * 8 * 8))


class Wrapped(nn.Module):
    """conv -> ``layer``: a layer that sees the conv's channels."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = layer

    def forward(self, x):
        return self.layer(self.conv(x))


def test_view_to_batch_by_features_is_a_flatten():
    """``y.view(y.size(0), -1)`` merges the channels with the spatial dimensions after them, as
    ``torch.flatten(y, 1)`` does: each width is the plain model of its active channels."""
    model = ViewNet()
    usnet.slimmable(model, input_size=(1, 3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for width in (0.25, 0.5, 1.0):
            usnet.set_width(model, width)
            assert model.fc.active_in_features == 8 * 8 * model.conv.active_out_channels
            assert torch.equal(usnet.export(model, width)(x), model(x))


@pytest.mark.parametrize(
    "net, pattern",
    [
        (ShuffleNet, r"\.view\(\).*channel shuffle"),
        (LayerNormNet, r"'norm' \(LayerNorm\)"),
        (Linear3dNet, r"'fc' \(Linear\).*3-d input"),
        (BranchNet, r"cannot trace BranchNet.*control flow"),
        (FunctionalNet, r"conv2d.*functional layer"),
        (SharedNet, r"'conv'.*more than once"),
        (IndexNet, r"getitem.*indexing"),
        (ReshapeNet, r"\.reshape\(\).*reshape"),
    ],
    ids=[
        "shuffle",
        "layernorm",
        "linear3d",
        "control-flow",
        "functional-conv",
        "called-twice",
        "indexing",
        "reshape",
    ],
)
def test_refusals_name_module_and_operation(net, pattern):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match=pattern):
        usnet.slimmable(model, input_size=(1, 3, 8, 8))
    # a refused model is left as it was
    assert not usnet.is_slimmable(model) and not slimmable_modules(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert issubclass(ConversionError, ValueError)


def test_already_slimmable_and_non_module():
    model = usnet.slimmable(tiny_cnn(), input_size=(1, 3, 8, 8))
    with pytest.raises(ValueError, match="already slimmable"):
        usnet.slimmable(model, input_size=(1, 3, 8, 8))
    with pytest.raises(TypeError, match="nn.Module"):
        usnet.slimmable(lambda x: x)
    with pytest.raises(TypeError, match="nn.Module"):
        usnet.slimmable(torch.randn(3))


def test_unknown_or_wrong_names_in_ratio_ties_and_fixed_outputs():
    with pytest.raises(ConversionError, match="ratio_ties names unknown modules: nope"):
        usnet.slimmable(tiny_cnn(), input_size=(1, 3, 8, 8), ratio_ties=["nope"])
    with pytest.raises(ConversionError, match="fixed_outputs names unknown modules: layer9"):
        usnet.slimmable(tiny_cnn(), input_size=(1, 3, 8, 8), fixed_outputs=["layer9"])
    # a module that exists but is not a slimmable layer ("2" is the ReLU)
    with pytest.raises(ConversionError, match=r"fixed_outputs.*not slimmable layers.*'2'"):
        usnet.slimmable(tiny_cnn(), input_size=(1, 3, 8, 8), fixed_outputs=["2"])


def test_input_size_mismatch_is_a_conversion_error():
    with pytest.raises(ConversionError, match=r"cannot run Sequential on an input of shape"):
        usnet.slimmable(tiny_cnn(in_channels=3), input_size=(1, 5, 8, 8))


# --- ratio ties, fixed outputs, flatten, grouped convs ----------------------------------------
def expansion_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 96, 1), nn.BatchNorm2d(96), nn.ReLU(),
        nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.BatchNorm2d(96), nn.ReLU(),
        nn.Conv2d(96, 24, 1), nn.BatchNorm2d(24),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )  # fmt: skip


def test_ratio_ties_and_fixed_outputs():
    model = usnet.slimmable(
        expansion_net(), input_size=(1, 3, 8, 8), ratio_ties=["3"], fixed_outputs=["9"]
    )
    plan = usnet.channel_plan(model)
    assert plan.groups["3"].parent == "0" and plan.groups["3"].ratio == 6.0
    assert plan.groups["9"].fixed
    assert plan.root_names == ["0"]
    x = torch.randn(2, 3, 8, 8)
    for w in grid(0.25, 1.0, 0.05):
        usnet.set_width(model, w)
        first = model[0].active_out_channels
        assert model[3].active_out_channels == 6 * first
        assert model[6].active_out_channels == 6 * first  # depthwise follows
        assert model[9].active_out_channels == 24
        with torch.no_grad():
            assert model(x).shape == (2, 10)


def flatten_net():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def test_flatten_into_linear_is_channel_major():
    model = liven(usnet.slimmable(flatten_net(), input_size=(1, 3, 16, 16)))
    fc = model[5]
    for w, c in [(0.25, 8), (0.5, 16), (0.75, 24), (1.0, 32)]:
        usnet.set_width(model, w)
        assert model[0].active_out_channels == c
        assert fc.active_in_features == c * 16
    data = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    usnet.calibrate(model, data, [0.5], num_images=32)
    model.eval()
    usnet.set_width(model, 0.5)
    plain = usnet.export(model, 0.5)
    assert plain[5].in_features == 256
    assert torch.equal(plain[5].weight, fc.weight[:, :256])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        assert y.abs().max() > 0.1
        assert max_abs_diff(y, plain(x)) <= 1e-5
        # channel-major: the features of the first 16 channels are the first 256 features
        features = nn.Sequential(*model[:5])(x)
        assert features.shape == (3, 256)
        assert torch.allclose(F.linear(features, fc.weight[:, :256], fc.bias), y, atol=1e-6)


@pytest.mark.parametrize(
    "groups, divisor, channels", [(4, 2, 32), (4, 1, 36), (3, 8, 48), (16, 8, 64)]
)
def test_grouped_conv_divisors(groups, divisor, channels):
    plain = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=groups), nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 1, groups=groups), nn.BatchNorm2d(2 * channels),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, 10),
    )  # fmt: skip
    model = usnet.slimmable(plain, input_size=(1, 3, 8, 8), divisor=divisor).train()
    plan = usnet.channel_plan(model)
    for name in plan.root_names:
        assert plan.groups[name].divisor % groups == 0
    grouped = [model[3], model[6]]
    x = torch.randn(2, 3, 8, 8)
    seen = set()
    for w in grid(0.25, 1.0, 0.01):
        usnet.set_width(model, w)
        for conv in grouped:
            assert conv.active_in_channels % groups == 0, (w, conv.active_in_channels)
            assert conv.active_out_channels % groups == 0, (w, conv.active_out_channels)
            assert conv.active_groups == groups
        seen.add(model[3].active_out_channels)
        with torch.no_grad():
            assert model(x).shape == (2, 10)
    assert len(seen) >= 2


def test_linear_ratio_tie_after_spatial_flatten():
    """A ratio-tied Linear fed by flatten(N, C, 4, 4): its outputs follow its active inputs at
    the full-width ratio (128 / 256), and the slimmed model runs and exports exactly."""
    plain = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    model = usnet.slimmable(plain, input_size=(1, 3, 8, 8), ratio_ties=["5"])
    usnet.set_width(model, 1.0)
    assert model[5].active_out_features == 128
    usnet.set_width(model, 0.5)
    assert model[0].active_out_channels == 8 and model[5].active_in_features == 8 * 16
    assert model[5].active_out_features == 64 and model[7].active_in_features == 64
    x = torch.randn(4, 3, 8, 8)
    usnet.calibrate(model, [x], widths=[0.5], num_images=4)
    with torch.no_grad(), usnet.width(model, 0.5):
        out = model.eval()(x)
    assert out.shape == (4, 10)
    assert (usnet.export(model, 0.5)(x) - out).abs().max() <= 1e-5


class GrayNormalizeNet(nn.Module):
    """A Fashion-MNIST style model that normalizes its 1-channel input inside forward."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = (x - 0.5) / 0.5
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1), 1))


def test_elementwise_op_on_multichannel_input():
    model = usnet.slimmable(GrayNormalizeNet(3), input_size=(1, 3, 8, 8))
    usnet.set_width(model, 0.5)
    assert model.conv.active_in_channels == 3 and model.conv.active_out_channels == 8
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_elementwise_op_on_single_channel_input():
    model = usnet.slimmable(GrayNormalizeNet(1), input_size=(1, 1, 8, 8))
    usnet.set_width(model, 0.5)
    assert model.conv.active_in_channels == 1 and model.conv.active_out_channels == 8
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_spatial_attention_broadcast_ties_nothing():
    """y * sigmoid(conv(y)) with a 1-channel attention map broadcasts along channels."""

    class SpatialAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.attn = nn.Conv2d(16, 1, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = self.conv(x)
            y = y * torch.sigmoid(self.attn(y))
            return self.fc(y.mean((2, 3)))

    model = usnet.slimmable(SpatialAttention(), input_size=(1, 3, 8, 8))
    usnet.set_width(model, 0.5)
    assert model.attn.active_in_channels == 8
    assert model.attn.active_out_channels == 1  # a 1-channel output is never slimmed below 1
    assert model.fc.active_in_features == 8
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_pretrained_statistics_without_batch_counter_work_at_full_width():
    """Weights saved before PyTorch 0.4 load with num_batches_tracked == 0 (some published
    torchvision ones): their statistics are real and must be used at full width."""
    import torchvision

    plain = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.zero_()
    x = torch.randn(2, 3, 64, 64)
    expected = plain.eval()(x)
    model = usnet.slimmable(copy.deepcopy(plain), (0.25, 1.0))
    assert torch.equal(model.eval()(x), expected)
    fresh = usnet.slimmable(torchvision.models.resnet18(num_classes=10), (0.25, 1.0)).eval()
    with pytest.raises(usnet.UncalibratedWidthError):
        fresh(x)
