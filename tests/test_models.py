"""The model zoo: shapes at every width, plans, torchvision compatibility, MACs and parameters."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from usnet_testing import SMALL, check_bindings, grid, random_mapping, zoo_model

import usnet
from usnet.models import DEFAULT_WIDTH_RANGES, create_model, list_models

MODELS = list_models()
EXPECTED = {"us_mobilenet_v1", "us_mobilenet_v2", "us_resnet18", "us_resnet50"}


@functools.lru_cache(maxsize=None)
def imagenet_model(name: str):
    """A default (224 px, 1000 classes) zoo model, built once: building at 224 px is slow."""
    return create_model(name)


def test_list_models():
    assert EXPECTED <= set(MODELS)
    assert MODELS == sorted(MODELS)
    assert set(DEFAULT_WIDTH_RANGES) == set(MODELS)


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'nope'.*us_resnet18"):
        create_model("nope")


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_at_dense_width_grid(name):
    model = zoo_model(name).train()
    plan = usnet.channel_plan(model)
    assert plan.width_range == DEFAULT_WIDTH_RANGES[name]
    assert usnet.get_width(model) == plan.width_range[1]
    assert usnet.state.get_state(model).arch["name"] == name
    widths = grid(*plan.width_range, 0.025)
    assert len(widths) >= 27
    x = torch.randn(1, 1, 28, 28)
    firsts = []
    with torch.no_grad():
        for w in widths:
            usnet.set_width(model, w)
            check_bindings(model)
            y = model(x)
            assert y.shape == (1, 10)
            assert torch.isfinite(y).all()
            firsts.append(usnet.channels_at(model)[plan.root_names[0]])
    assert firsts == sorted(firsts) and firsts[0] < firsts[-1]


@pytest.mark.parametrize("name", MODELS)
def test_random_non_uniform_widths(name):
    """Tied groups must have matching tensor shapes: any per-group width runs."""
    model = zoo_model(name, in_channels=3).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        for _ in range(4):
            width = random_mapping(model, gen)
            usnet.set_width(model, width)
            check_bindings(model)
            assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_plan_structure(name):
    model = zoo_model(name)
    plan = usnet.channel_plan(model)
    state = usnet.state.get_state(model)
    fixed = [g for g in plan.groups.values() if g.fixed]
    # the image input and the logits never slim
    assert {g.size for g in fixed} >= {1, 10}
    bound = {b.layer for b in state.bindings}
    slim = {n for n, m in model.named_modules() if usnet.nn.base.is_slimmable_layer(m)}
    assert bound == slim and len(bound) > 10
    # every Conv2d / Linear / BatchNorm2d was converted
    assert not [n for n, m in model.named_modules() if type(m) in usnet.nn.base.SLIMMABLE_LAYERS]
    # full width is the plain network the model was built from
    assert plan.width_range[1] == 1.0
    assert plan.config(1.0) == tuple(g.size for g in plan.groups.values())


def test_default_224_input():
    model = imagenet_model("us_mobilenet_v2").train()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for w in (0.35, 1.0):
            usnet.set_width(model, w)
            assert model(x).shape == (1, 1000)


def test_resnet18_module_names_match_torchvision():
    ours = imagenet_model("us_resnet18").state_dict()
    theirs = torchvision.models.resnet18().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    torchvision.models.resnet18().load_state_dict(ours, strict=True)


def test_mobilenet_v2_module_names_match_torchvision():
    ours = imagenet_model("us_mobilenet_v2").state_dict()
    theirs = torchvision.models.mobilenet_v2().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("w", [0.35, 0.5, 0.75, 1.0, 0.4, 0.6, 0.85, 0.9])
def test_mobilenet_v2_export_is_torchvision_mobilenet_v2(w):
    model = imagenet_model("us_mobilenet_v2")
    plain = usnet.export(model, w, require_stats=False)
    assert not usnet.is_slimmable(plain)
    reference = torchvision.models.mobilenet_v2(width_mult=w)
    ours = plain.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    reference.load_state_dict(ours, strict=True)
    assert usnet.get_width(model) == 1.0  # export leaves the model's width alone


@pytest.mark.parametrize("w", [0.25, 0.4, 0.5, 0.8, 1.0])
def test_mobilenet_v1_export_is_plain_mobilenet_v1(w):
    model = zoo_model("us_mobilenet_v1")
    plain = usnet.export(model, w, require_stats=False)
    reference = usnet.models.mobilenet_v1(width_mult=w, **SMALL)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    reference.load_state_dict(plain.state_dict(), strict=True)


def test_mobilenet_v2_macs_and_params():
    model = imagenet_model("us_mobilenet_v2")
    expected = {1.0: 300.8, 0.75: 209.1, 0.5: 97.1, 0.35: 59.3}
    for w, macs in expected.items():
        p = usnet.profile(model, w, input_size=(1, 3, 224, 224))
        assert round(p.macs / 1e6, 1) == macs, w
        assert p.flops == 2 * p.macs
        assert p.config_id == usnet.config_id(usnet.channel_plan(model).config(w))
        n_ref = sum(t.numel() for t in torchvision.models.mobilenet_v2(width_mult=w).parameters())
        assert p.params == n_ref, w
    assert p.params == 1_677_128  # 0.35: the last conv stays at 1280 channels


def test_resnet50_macs_and_params():
    model = imagenet_model("us_resnet50")
    reference = torchvision.models.resnet50()
    assert list(model.state_dict()) == list(reference.state_dict())
    p = usnet.profile(model, 1.0)
    assert round(p.macs / 1e9, 2) == 4.09
    assert p.params == sum(t.numel() for t in reference.parameters()) == 25_557_032
    small = usnet.profile(model, 0.25)
    assert small.macs < p.macs / 8  # MACs scale ~ quadratically with width


def test_mobilenet_v1_macs():
    model = imagenet_model("us_mobilenet_v1")
    assert round(usnet.profile(model, 1.0).macs / 1e6) == 569
    assert round(usnet.profile(model, 0.25).macs / 1e6) == 41
    assert usnet.profile(model, 1.0).params == 4_231_976


def test_profile_small_input_and_mapping():
    model = zoo_model("us_resnet18")
    full = usnet.profile(model, 1.0, input_size=(1, 1, 28, 28))
    half = usnet.profile(model, 0.5, input_size=(1, 1, 28, 28))
    assert 0 < half.macs < full.macs and 0 < half.params < full.params
    roots = usnet.channel_plan(model).root_names
    mixed = usnet.profile(model, {roots[0]: 0.25}, input_size=(1, 1, 28, 28))
    assert mixed.width == {roots[0]: 0.25}
    assert half.macs < mixed.macs < full.macs
    with pytest.raises(ValueError, match="input_size"):
        usnet.profile(model, 1.0, input_size=(1, 28, 28))


def test_two_models_coexist():
    a, b = zoo_model("us_mobilenet_v2"), zoo_model("us_mobilenet_v2")
    a.train(), b.train()
    usnet.set_width(a, 0.35)
    usnet.set_width(b, 1.0)
    assert (usnet.get_width(a), usnet.get_width(b)) == (0.35, 1.0)
    assert a.features[0][0].active_out_channels == 16
    assert b.features[0][0].active_out_channels == 32
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert a(x).shape == b(x).shape == (2, 10)
    assert a.features[0][0].active_out_channels == 16  # running b never touched a
    check_bindings(a), check_bindings(b)
