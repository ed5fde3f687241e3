"""usnet.export: a plain model equal to the slimmable model at one width."""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.fx as fx
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from usnet_testing import (
    SLIMMABLE_TYPES,
    assert_same_tensors,
    liven,
    max_abs_diff,
    params_snapshot,
    random_mapping,
    zoo_model,
)

import usnet
from usnet import UncalibratedWidthError

CASES = {
    # name: (builder, input shape)
    "us_mobilenet_v1-1ch": (lambda: zoo_model("us_mobilenet_v1"), (1, 28, 28)),
    "us_mobilenet_v2-3ch": (lambda: zoo_model("us_mobilenet_v2", in_channels=3), (3, 28, 28)),
    "us_resnet18-1ch": (lambda: zoo_model("us_resnet18"), (1, 28, 28)),
    "us_resnet18-3ch": (lambda: zoo_model("us_resnet18", in_channels=3), (3, 32, 32)),
    "mobilenet_v3_large": (
        lambda: usnet.slimmable(
            torchvision.models.mobilenet_v3_large(num_classes=10), input_size=(1, 3, 64, 64)
        ),
        (3, 64, 64),
    ),
}


@functools.lru_cache(maxsize=None)
def case(name: str):
    torch.manual_seed(0)
    builder, shape = CASES[name]
    return liven(builder()), shape


def batch(shape, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen)


def check_export_equal(model, width, shape, seed=0, **export_kwargs):
    """Calibrate ``width``, export it, and compare eval logits with the slimmable model."""
    data = [batch(shape, 8, seed + 1), batch(shape, 8, seed + 2)]
    usnet.calibrate(model, data, widths=[width], num_images=16)
    plain = usnet.export(model, width, **export_kwargs)
    model.eval()
    x = batch(shape, 3, seed + 3)
    with torch.no_grad(), usnet.width(model, width):
        expected = model(x)
    got = plain(x)
    assert expected.shape == got.shape == (3, 10)
    assert expected.abs().max() > 0.05  # logits are not ~0
    assert max_abs_diff(got, expected) <= 1e-4
    return plain


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_export_equals_slimmable_at_random_width(name, data):
    model, shape = case(name)
    lo, hi = usnet.channel_plan(model).width_range
    width = data.draw(st.floats(min_value=lo, max_value=hi), label="width")
    previous = usnet.get_width(model)
    plain = check_export_equal(model, width, shape)
    assert usnet.get_width(model) == previous  # export leaves the width alone
    assert not any(isinstance(m, SLIMMABLE_TYPES) for m in plain.modules())
    assert not hasattr(plain, "usnet_state")
    assert not plain.training and not any(m.training for m in plain.modules())
    # the exported model has the active shapes
    channels = usnet.channels_at(model, width)
    first = usnet.channel_plan(model).root_names[0]
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == channels[first]


@pytest.mark.parametrize("name", ["us_mobilenet_v2-3ch", "us_resnet18-1ch", "mobilenet_v3_large"])
def test_export_non_uniform_width(name):
    model, shape = case(name)
    gen = torch.Generator().manual_seed(5)
    for i in range(2):
        width = random_mapping(model, gen)
        assert set(width) == set(usnet.channel_plan(model).root_names)
        check_export_equal(model, width, shape, seed=10 * i)
    # a mapping naming a single group
    first = usnet.channel_plan(model).root_names[0]
    check_export_equal(model, {first: usnet.channel_plan(model).width_range[0]}, shape)


def test_export_does_not_modify_model():
    model, shape = case("us_resnet18-1ch")
    usnet.calibrate(model, [batch(shape, 8, 0)], widths=[0.5], num_images=8)
    usnet.set_width(model, 0.8)
    snapshot = params_snapshot(model)
    stats = {k: [t.clone() for t in v] for k, v in model.bn1.width_stats.items()}
    plain = usnet.export(model, 0.5)
    assert usnet.get_width(model) == 0.8
    assert model.conv1.active_out_channels == usnet.channels_at(model)["conv1"]
    assert_same_tensors(params_snapshot(model), snapshot)
    assert stats.keys() == model.bn1.width_stats.keys()
    # the copy does not share storage with the model
    with torch.no_grad():
        plain.conv1.weight.add_(1.0)
    assert_same_tensors(params_snapshot(model), snapshot)


def test_export_default_width_is_current():
    model, shape = case("us_resnet18-1ch")
    usnet.calibrate(model, [batch(shape, 8, 0)], widths=[0.25], num_images=8)
    usnet.set_width(model, 0.25)
    plain = usnet.export(model)
    assert plain.conv1.out_channels == 16
    usnet.set_width(model, 1.0)


def test_export_uncalibrated_width_raises():
    model = zoo_model("us_resnet18")
    with pytest.raises(UncalibratedWidthError, match="calibrate"):
        usnet.export(model, 0.6)
    with pytest.raises(UncalibratedWidthError):
        usnet.export(model, 1.0)  # full width was never trained or calibrated either
    plain = usnet.export(model, 0.6, require_stats=False)  # for profiling
    assert plain.bn1.num_features == usnet.channels_at(model, 0.6)["conv1"]
    assert torch.equal(plain.bn1.running_mean, torch.zeros(plain.bn1.num_features))
    with pytest.raises(ValueError, match="width range"):
        usnet.export(model, 0.1)
    with pytest.raises(TypeError, match="not a slimmable model"):
        usnet.export(nn.Conv2d(3, 3, 1), 0.5)


@pytest.mark.parametrize("name", ["us_mobilenet_v1", "us_resnet18"])
def test_export_with_input_averaging(name):
    model = liven(zoo_model(name, input_averaging=True))
    assert usnet.state.get_state(model).input_averaging
    convs = [m for m in model.modules() if isinstance(m, usnet.SlimmableConv2d)]
    assert all(c.input_averaging for c in convs)
    plain = check_export_equal(model, 0.4, (1, 28, 28))
    # the averaging scale is folded into the exported weights
    usnet.set_width(model, 0.4)
    conv = next(c for c in convs if not c.is_depthwise and c.active_in_channels < c.in_channels)
    scale = conv.averaging_scale()
    assert scale > 1.0
    name_of = {m: n for n, m in model.named_modules()}
    exported = plain.get_submodule(name_of[conv])
    sliced = conv.weight[: conv.active_out_channels, : conv.active_in_channels // conv.groups]
    torch.testing.assert_close(exported.weight, sliced * scale)
    usnet.set_width(model, 1.0)


@pytest.mark.parametrize("name", ["us_mobilenet_v2-3ch", "mobilenet_v3_large"])
def test_export_trace(name):
    model, shape = case(name)
    plain = check_export_equal(model, 0.5, shape, trace=True)
    assert isinstance(plain, fx.GraphModule)
    classes = {type(m) for n, m in plain.named_modules() if n}
    assert classes
    for cls in classes:
        assert cls.__module__.startswith(("torch.nn.", "torchvision.")), cls
    assert nn.Conv2d in classes and nn.BatchNorm2d in classes
    assert not plain.training
    # round trip through pickle needs no class of the original model
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    x = batch(shape, 2, 7)
    with torch.no_grad():
        assert torch.equal(again(x), plain(x))


def test_export_batchnorm_without_affine_or_running_stats():
    from torch import nn

    plain = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16, affine=False, track_running_stats=False),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))  # fmt: skip
    model = usnet.slimmable(plain, (0.5, 1.0), input_size=(1, 3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with usnet.width(model, 0.5), torch.no_grad():
        reference = model(x)
    exported = usnet.export(model, 0.5)
    assert exported[1].num_features == 8
    assert torch.allclose(exported(x), reference, atol=1e-6)
