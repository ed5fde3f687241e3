"""usnet.state: set_width / get_width / width() context manager / channels_at."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from usnet_testing import check_bindings, tiny_slimmable, zoo_model

import usnet


@pytest.fixture
def model():
    return tiny_slimmable(channels=32)


def test_starts_at_top_of_range():
    m = tiny_slimmable((0.25, 0.75), channels=32)
    assert usnet.get_width(m) == 0.75
    assert m[0].active_out_channels == 24  # make_divisible(32 * 0.75)


def test_set_width_sets_layers(model):
    assert usnet.set_width(model, 0.5) is model
    assert usnet.get_width(model) == 0.5
    assert isinstance(usnet.get_width(model), float)
    conv, bn, linear = model[0], model[1], model[5]
    assert (conv.active_in_channels, conv.active_out_channels) == (3, 16)
    assert bn.active_features == 16
    assert (linear.active_in_features, linear.active_out_features) == (16, 10)
    check_bindings(model)
    usnet.set_width(model, 0.25)
    assert conv.active_out_channels == 8 and linear.active_in_features == 8
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    usnet.set_width(model, 1)
    assert usnet.get_width(model) == 1.0 and conv.active_out_channels == 32


def test_width_context_manager_restores(model):
    usnet.set_width(model, 0.75)
    with usnet.width(model, 0.25) as m:
        assert m is model
        assert usnet.get_width(model) == 0.25
        assert model[0].active_out_channels == 8
        with usnet.width(model, 0.5):
            assert model[0].active_out_channels == 16
        assert model[0].active_out_channels == 8
    assert usnet.get_width(model) == 0.75
    assert model[0].active_out_channels == 24


def test_width_context_manager_restores_on_exception(model):
    usnet.set_width(model, 0.5)
    with pytest.raises(KeyError, match="boom"):
        with usnet.width(model, 0.25):
            assert model[0].active_out_channels == 8
            raise KeyError("boom")
    assert usnet.get_width(model) == 0.5
    assert model[0].active_out_channels == 16


def test_width_context_manager_invalid_width(model):
    usnet.set_width(model, 0.5)
    with pytest.raises(ValueError, match="outside the width range"):
        with usnet.width(model, 3.0):
            pass  # pragma: no cover
    assert usnet.get_width(model) == 0.5 and model[0].active_out_channels == 16


def test_mapping_width():
    m = zoo_model("us_resnet18")
    plan = usnet.channel_plan(m)
    roots = plan.root_names
    assert len(roots) >= 5
    width = {roots[0]: 0.25, roots[2]: 0.5}
    usnet.set_width(m, width)
    assert usnet.get_width(m) == width
    channels = usnet.channels_at(m)
    assert channels[roots[0]] == usnet.make_divisible(plan.groups[roots[0]].size * 0.25, 8)
    assert channels[roots[2]] == usnet.make_divisible(plan.groups[roots[2]].size * 0.5, 8)
    for name in roots[3:]:
        assert channels[name] == plan.groups[name].size  # unnamed roots stay at the top (1.0)
    check_bindings(m)
    assert m.conv1.active_out_channels == channels[roots[0]] == 16
    m.train()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with usnet.width(m, 0.5):
        assert usnet.get_width(m) == 0.5
    assert usnet.get_width(m) == width


@pytest.mark.parametrize(
    "bad, error",
    [(1.5, ValueError), (0.1, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
     ("0.5", TypeError), (True, TypeError), (None, TypeError), ({"nope": 0.5}, ValueError),
     ({"0": 2.0}, ValueError)],
)  # fmt: skip
def test_set_width_errors_leave_width_unchanged(model, bad, error):
    usnet.set_width(model, 0.5)
    with pytest.raises(error):
        usnet.set_width(model, bad)
    assert usnet.get_width(model) == 0.5
    assert model[0].active_out_channels == 16


def test_unknown_group_lists_valid_names(model):
    with pytest.raises(ValueError, match=r"valid groups: 0"):
        usnet.set_width(model, {"conv": 0.5})


def test_not_a_slimmable_model():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3))
    assert not usnet.is_slimmable(plain)
    for fn in (usnet.get_width, usnet.channels_at, usnet.channel_plan):
        with pytest.raises(TypeError, match="not a slimmable model"):
            fn(plain)
    with pytest.raises(TypeError, match="not a slimmable model"):
        usnet.set_width(plain, 0.5)


def test_channels_at(model):
    usnet.set_width(model, 0.5)
    plan = usnet.channel_plan(model)
    assert usnet.is_slimmable(model)
    assert usnet.channels_at(model) == plan.channels(0.5)
    assert usnet.channels_at(model)["0"] == 16
    assert usnet.channels_at(model, 0.25)["0"] == 8
    assert usnet.channels_at(model, 1.0)["0"] == 32
    assert usnet.get_width(model) == 0.5  # querying another width changes nothing
    assert model[0].active_out_channels == 16
    assert usnet.channels_at(model, {"0": 0.75})["0"] == 24
    with pytest.raises(ValueError):
        usnet.channels_at(model, 1.1)


def test_models_have_independent_widths():
    a, b = tiny_slimmable(channels=32), tiny_slimmable(channels=32)
    usnet.set_width(a, 0.25)
    usnet.set_width(b, 1.0)
    assert (usnet.get_width(a), usnet.get_width(b)) == (0.25, 1.0)
    assert a[0].active_out_channels == 8 and b[0].active_out_channels == 32
    with usnet.width(b, 0.5):
        assert a[0].active_out_channels == 8


def test_set_width_follows_a_replaced_layer():
    """A new head (fine-tuning) is bound like the one it replaces, also for cached widths."""
    from usnet.nn.linear import SlimmableLinear

    model = usnet.models.us_convnet()
    usnet.set_width(model, 0.25)
    usnet.set_width(model, 1.0)
    model.classifier[1] = SlimmableLinear(128, 3)
    usnet.set_width(model, 0.25)
    assert model.classifier[1].active_in_features == 32
    assert model.train()(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    model.classifier[1] = nn.Linear(128, 3)
    with pytest.raises(TypeError, match="is a Linear, not a slimmable layer"):
        usnet.set_width(model, 0.5)


def test_state_pickled_before_the_width_cache_still_sets_widths():
    from usnet.state import SlimmableState

    model = usnet.models.us_convnet()
    # Unpickling an older checkpoint's state calls __setstate__ with a dict lacking the cache.
    old = SlimmableState.__new__(SlimmableState)
    old.__setstate__({k: v for k, v in model.usnet_state.__dict__.items() if k != "_updates"})
    model.usnet_state = old
    usnet.set_width(model, 0.5)
    assert model.features[0][0].active_out_channels == 16


def test_eval_forward_restores_mode_and_width_even_on_a_bad_width():
    from usnet.evaluation import eval_forward

    model = usnet.models.us_convnet().train()
    usnet.set_width(model, 0.5)
    with pytest.raises(ValueError, match="outside the width range"):
        eval_forward(model, 0.1, torch.randn(2, 1, 28, 28))
    assert model.training and usnet.get_width(model) == 0.5
