"""Correctness guards of the performance work (issue 5): every shortcut computes what it replaces.

* ``set_width`` applies per-configuration attribute updates cached on the model's state.
* ``SlimmableBatchNorm2d`` caches whether its own running statistics were ever set.
* ``WidthSampler(choices=...)``, ``ChannelPlan.distinct_widths`` and ``warm_up_widths``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from usnet_testing import liven, zoo_model

import usnet
from usnet.nn.conv import SlimmableConv2d
from usnet.nn.linear import SlimmableLinear
from usnet.nn.norm import SlimmableBatchNorm2d
from usnet.state import get_state
from usnet.train.distill import InplaceDistillationLoss
from usnet.train.recipe import make_optimizer
from usnet.train.samplers import WidthSampler
from usnet.train.sandwich import sandwich_step, warm_up_widths

ACTIVE_ATTRS = ("active_in_channels", "active_out_channels", "active_in_features",
                "active_out_features", "active_features", "stats_key", "width_label")  # fmt: skip


def active_attrs(model: nn.Module) -> dict[str, tuple]:
    return {
        name: tuple(getattr(m, a, None) for a in ACTIVE_ATTRS)
        for name, m in model.named_modules()
        if isinstance(m, (SlimmableConv2d, SlimmableLinear, SlimmableBatchNorm2d))
    }


def reference_attrs(model: nn.Module, width) -> dict[str, tuple]:
    """The layers' active attributes computed from the bindings directly, without set_width."""
    state = get_state(model)
    channels = state.plan.channels(width)
    config = tuple(channels.values())
    key = None if config == state.full_config else usnet.config_key(config)
    label = f"width {state.plan.check_width(width):g} (config {usnet.config_key(config)})"
    out = {}
    for b in state.bindings:
        layer = model.get_submodule(b.layer)
        cout = channels[b.outputs[0]] * b.outputs[1]
        if isinstance(layer, SlimmableBatchNorm2d):
            out[b.layer] = (None, None, None, None, cout, key, label)
            continue
        cin = channels[b.inputs[0]] * b.inputs[1]
        if isinstance(layer, SlimmableConv2d):
            out[b.layer] = (cin, cout, None, None, None, None, None)
        else:
            out[b.layer] = (None, None, cin, cout, None, None, None)
    return out


# -- set_width's cached updates ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["us_mobilenet_v2", "us_resnet18", "us_convnet"])
def test_set_width_cached_updates_equal_fresh_resolution(name):
    model = zoo_model(name)
    widths = usnet.channel_plan(model).distinct_widths()
    # every configuration twice, in an order that alternates wide and narrow: cache hits and misses
    order = [w for pair in zip(widths, reversed(widths)) for w in pair] * 2
    for w in order:
        usnet.set_width(model, w)
        assert active_attrs(model) == reference_attrs(model, w)
        assert usnet.get_width(model) == w


def test_set_width_cached_outputs_equal_uncached_copy():
    torch.manual_seed(0)
    model = liven(zoo_model("us_mobilenet_v2", dropout=0.0)).train()
    x = torch.randn(4, 1, 28, 28)
    widths = [1.0, 0.35, 0.6, 0.8, 0.35, 1.0, 0.6]
    for w in widths:  # warm the cache on `model`
        usnet.set_width(model, w)
    for w in widths:
        fresh = copy.deepcopy(model)  # a copy's cache starts empty
        assert get_state(fresh)._updates == {}
        usnet.set_width(model, w)
        usnet.set_width(fresh, w)
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_bind_their_own_layers():
    model = zoo_model("us_convnet")
    usnet.set_width(model, 0.5)
    usnet.set_width(model, 1.0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(buffer, weights_only=False)]  # fmt: skip
    for other in copies:
        usnet.set_width(other, 0.25)
        assert active_attrs(other) == reference_attrs(other, 0.25)
        assert active_attrs(model) == reference_attrs(model, 1.0)  # the original is untouched


def test_set_width_while_calibrating_changes_nothing():
    model = zoo_model("us_convnet")
    usnet.set_width(model, 0.5)
    before = active_attrs(model)
    bns = [m for m in model.modules() if isinstance(m, SlimmableBatchNorm2d)]
    bns[-1].start_calibration()  # the last layer: a check mid-loop would have changed the others
    with pytest.raises(RuntimeError, match="calibrating"):
        usnet.set_width(model, 1.0)
    assert active_attrs(model) == before
    bns[-1].cancel_calibration()


# -- BatchNorm's cached "own statistics set" answer ----------------------------------------------
def test_bn_stats_cache_follows_load_calibrate_and_to():
    torch.manual_seed(0)
    model = liven(zoo_model("us_convnet")).eval()
    x = torch.randn(8, 1, 28, 28)
    fresh_state = copy.deepcopy(model.state_dict())  # initial statistics: never calibrated
    with pytest.raises(usnet.UncalibratedWidthError):
        model(x)  # caches "not set"
    usnet.calibrate(model, [x], widths=[1.0], num_images=8)
    exported = usnet.export(model, 1.0)
    torch.testing.assert_close(model(x), exported(x), rtol=1e-5, atol=1e-5)  # caches "set"
    model.load_state_dict(fresh_state)  # copy_ bumps the version counters
    with pytest.raises(usnet.UncalibratedWidthError):
        model(x)
    model.load_state_dict(exported.state_dict())
    torch.testing.assert_close(model(x), exported(x), rtol=1e-5, atol=1e-5)
    model.double()  # .to() replaces the buffers
    torch.testing.assert_close(
        model(x.double()), exported.double()(x.double()), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():  # an in-place reset to the initial values is seen too
        for m in model.modules():
            if isinstance(m, SlimmableBatchNorm2d):
                m.reset_running_stats()
    with pytest.raises(usnet.UncalibratedWidthError):
        model(x.double())


def test_bn_stats_cache_is_not_shared_with_copies():
    model = zoo_model("us_convnet").eval()
    x = torch.randn(2, 1, 28, 28)
    usnet.calibrate(model, [x], widths=[1.0], num_images=2)
    model(x)  # caches "set" on the original
    other = copy.deepcopy(model)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, SlimmableBatchNorm2d):
                m.reset_running_stats()
    with pytest.raises(usnet.UncalibratedWidthError):
        other(x)
    model(x)  # the original still has its statistics


# -- sampler choices, distinct widths, warm-up ---------------------------------------------------
@pytest.mark.parametrize("name", ["us_mobilenet_v2", "us_convnet"])
def test_distinct_widths_are_one_per_config(name):
    plan = usnet.channel_plan(zoo_model(name))
    widths = plan.distinct_widths()
    assert [plan.config(w) for w in widths] == plan.distinct_configs()
    assert widths[0] == plan.width_range[0] and widths == sorted(widths)
    # every width of a fine scan maps to one of them
    configs = set(plan.distinct_configs())
    lo, hi = plan.width_range
    assert all(plan.config(lo + (hi - lo) * i / 997) in configs for i in range(998))


def test_width_sampler_choices():
    choices = [0.3, 0.5, 0.7]
    sampler = WidthSampler((0.25, 1.0), num_widths=6, seed=3, choices=choices)
    draws = [sampler.sample() for _ in range(50)]
    assert all(d[:2] == [1.0, 0.25] and set(d[2:]) <= set(choices) for d in draws)
    assert {w for d in draws for w in d[2:]} == set(choices)
    state = sampler.state_dict()
    resumed = WidthSampler((0.25, 1.0), num_widths=6, seed=3)
    resumed.load_state_dict(state)
    assert resumed.choices == choices
    assert [resumed.sample() for _ in range(5)] == [sampler.sample() for _ in range(5)]
    with pytest.raises(ValueError, match="choices"):
        WidthSampler((0.25, 1.0), choices=[0.2])
    with pytest.raises(ValueError, match="choices"):
        WidthSampler((0.25, 1.0), choices=[])
    # without choices the draws are the continuous ones they always were
    assert WidthSampler((0.25, 1.0), 4, seed=0).sample()[2:] != WidthSampler(
        (0.25, 1.0), 4, seed=0, choices=[0.5]).sample()[2:]  # fmt: skip


def test_warm_up_widths_leaves_training_unchanged():
    torch.manual_seed(0)
    model = liven(zoo_model("us_mobilenet_v2", dropout=0.5)).train()
    twin = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    usnet.set_width(model, 0.6)
    usnet.set_width(twin, 0.6)
    plan = usnet.channel_plan(model)
    rng = torch.get_rng_state()
    n = warm_up_widths(model, x, plan.distinct_widths()[::10] + [1.0, 1.0])
    assert n == len(plan.distinct_widths()[::10]) + 1
    assert torch.equal(torch.get_rng_state(), rng)
    assert usnet.get_width(model) == 0.6
    assert all(p.grad is None for p in model.parameters())
    criterion = InplaceDistillationLoss()
    opt_a, opt_b = make_optimizer(model, lr=0.1), make_optimizer(twin, lr=0.1)
    for _ in range(2):
        torch.manual_seed(1)
        sandwich_step(model, x, y, opt_a, [1.0, 0.35, 0.6, 0.8], criterion)
        torch.manual_seed(1)
        sandwich_step(twin, x, y, opt_b, [1.0, 0.35, 0.6, 0.8], criterion)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_full_width_stats_written_through_data_are_seen():
    """``.data`` writes bump no version counter: a cached "not set" must not outlive them."""
    from usnet.nn.norm import SlimmableBatchNorm2d, UncalibratedWidthError

    bn = SlimmableBatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(UncalibratedWidthError):
        bn(x)
    bn.running_mean.data.copy_(torch.arange(4.0))
    expected = (x - torch.arange(4.0).view(1, 4, 1, 1)) / (1 + bn.eps) ** 0.5
    torch.testing.assert_close(bn(x), expected)


# -- calibration statistics on the CPU from row reductions ---------------------------------------
def _calibrated_stats(model: nn.Module, batches, widths) -> dict[str, torch.Tensor]:
    usnet.calibrate(model, batches, widths=widths, num_images=sum(len(b) for b in batches))
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SlimmableBatchNorm2d):
            out[name + ".running_mean"], out[name + ".running_var"] = m.running_mean, m.running_var
            for key, (mean, var) in m.width_stats.items():
                out[f"{name}.{key}.mean"], out[f"{name}.{key}.var"] = mean, var
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_calibration_statistics_equal_native_kernel(monkeypatch, channels_last):
    import usnet.nn.norm

    torch.manual_seed(0)
    model = liven(zoo_model("us_mobilenet_v2", num_classes=10))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    batches = [torch.randn(6, 1, 32, 32).contiguous(memory_format=fmt) for _ in range(3)]
    widths = [0.35, 0.6, 1.0]
    calls = []
    fast = usnet.nn.norm._cpu_batch_stats
    monkeypatch.setattr(
        usnet.nn.norm, "_cpu_batch_stats", lambda x: calls.append(fast(x)) or calls[-1]
    )
    fast_stats = _calibrated_stats(model, batches, widths)
    used = sum(c is not None for c in calls)
    assert (used > 0) != channels_last  # NCHW takes the row reductions, channels-last never
    monkeypatch.setattr(usnet.nn.norm, "_cpu_batch_stats", lambda x: None)
    native = copy.deepcopy(model)
    native_stats = _calibrated_stats(native, batches, widths)
    assert fast_stats.keys() == native_stats.keys()
    for key in native_stats:
        torch.testing.assert_close(fast_stats[key], native_stats[key], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip
    # Outputs: the float rounding of 50 layers of a random network leaves both kernels about
    # 1e-5 from a float64 calibration; the row reductions are no further from it than the native.
    reference = copy.deepcopy(native).double()
    _calibrated_stats(reference, [b.double() for b in batches], widths)
    x = batches[0]
    for w in widths:
        with usnet.width(model, w), usnet.width(native, w), usnet.width(reference, w):
            exact = reference.eval()(x.double())
            fast_error = (model.eval()(x).double() - exact).abs().max().item()
            native_error = (native.eval()(x).double() - exact).abs().max().item()
            assert fast_error <= max(2 * native_error, 1e-5)


def test_fast_calibration_statistics_refuse_ill_conditioned_channels():
    from usnet.nn.norm import _cpu_batch_stats

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    mean, var, count = _cpu_batch_stats(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert count == 4 * 8 * 8
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    # A channel whose mean dwarfs its spread would lose its variance to cancellation in
    # E[x^2] - E[x]^2: the exact kernel takes the batch instead.
    shifted = x.float().clone()
    shifted[:, 1] += 1e3
    assert _cpu_batch_stats(shifted) is None
    # Channels-last, maps under 4x4 (short rows) and low-precision dtypes keep the native kernel.
    assert _cpu_batch_stats(x.float().contiguous(memory_format=torch.channels_last)) is None
    assert _cpu_batch_stats(torch.randn(4, 3, 2, 2)) is None
    assert _cpu_batch_stats(torch.randn(4, 3, 8, 8).bfloat16()) is None
