"""usnet.layers: slimmable Conv2d / Linear / BatchNorm2d vs plain layers of the active shape."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from usnet import SlimmableBatchNorm2d, SlimmableConv2d, SlimmableLinear, UncalibratedWidthError
from usnet.nn.base import make_slimmable_


def assert_close(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def plain_conv_like(layer: SlimmableConv2d, cin: int, cout: int, groups: int) -> nn.Conv2d:
    """A plain conv of the active shape holding the first channels of ``layer``'s weights."""
    ref = nn.Conv2d(cin, cout, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                    groups, layer.bias is not None, layer.padding_mode)  # fmt: skip
    with torch.no_grad():
        ref.weight.copy_(layer.weight[:cout, : cin // groups])
        if layer.bias is not None:
            ref.bias.copy_(layer.bias[:cout])
    return ref


# --- class and state_dict compatibility -------------------------------------------------------
@pytest.mark.parametrize(
    "cls, base, args",
    [
        (SlimmableConv2d, nn.Conv2d, (8, 16, 3)),
        (SlimmableLinear, nn.Linear, (8, 16)),
        (SlimmableBatchNorm2d, nn.BatchNorm2d, (8,)),
    ],
)
def test_subclass_and_state_dict(cls, base, args):
    layer, plain = cls(*args), base(*args)
    assert issubclass(cls, base) and isinstance(layer, base)
    sd, plain_sd = layer.state_dict(), plain.state_dict()
    assert list(sd) == list(plain_sd)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in plain_sd.items()}
    # a plain layer's weights load strictly and the round trip is exact
    layer.load_state_dict(plain_sd, strict=True)
    for k in plain_sd:
        assert torch.equal(layer.state_dict()[k], plain_sd[k])


def test_make_slimmable_keeps_parameters():
    conv = nn.Conv2d(4, 8, 3)
    weight = conv.weight
    out = make_slimmable_(conv)
    assert out is conv and type(conv) is SlimmableConv2d
    assert conv.weight is weight
    assert conv.active_in_channels == 4 and conv.active_out_channels == 8
    assert conv.input_averaging is False

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match="MyConv"):
        make_slimmable_(MyConv(4, 8, 3))


# --- convolutions -----------------------------------------------------------------------------
CONV_CASES = [
    # (in, out, groups, extra kwargs, [(active in, active out), ...])
    pytest.param(
        16, 24, 1, dict(kernel_size=3, stride=2, padding=1),
        [(16, 24), (8, 16), (5, 3), (1, 1)], id="standard",
    ),
    pytest.param(
        12, 8, 1, dict(kernel_size=(3, 1), padding=(1, 0), dilation=2, bias=False),
        [(6, 4), (12, 8)], id="dilated-nobias",
    ),
    pytest.param(
        16, 32, 4, dict(kernel_size=3, padding=1),
        [(16, 32), (8, 16), (12, 8), (4, 4)], id="grouped4",
    ),
    pytest.param(
        16, 16, 16, dict(kernel_size=3, padding=1), [(16, 16), (8, 8), (3, 3)], id="depthwise",
    ),
    pytest.param(
        8, 16, 8, dict(kernel_size=3, padding=1, stride=2),
        [(8, 16), (4, 8), (1, 2)], id="depthwise-x2",
    ),
    pytest.param(
        8, 8, 1, dict(kernel_size=3, padding=1, padding_mode="reflect"),
        [(4, 6), (8, 8)], id="reflect",
    ),
    pytest.param(
        8, 8, 1, dict(kernel_size=3, padding=2, padding_mode="circular"), [(4, 6)], id="circular",
    ),
    pytest.param(
        8, 8, 8, dict(kernel_size=3, padding=1, padding_mode="replicate"),
        [(4, 4)], id="depthwise-replicate",
    ),
]  # fmt: skip


@pytest.mark.parametrize("cin_full, cout_full, groups, kwargs, actives", CONV_CASES)
def test_conv_equals_plain_conv_of_active_shape(cin_full, cout_full, groups, kwargs, actives):
    kwargs = dict(kwargs)
    kernel = kwargs.pop("kernel_size")
    layer = SlimmableConv2d(cin_full, cout_full, kernel, groups=groups, **kwargs)
    depthwise = groups > 1 and groups == cin_full
    assert layer.is_depthwise == depthwise
    for cin, cout in actives:
        layer.active_in_channels, layer.active_out_channels = cin, cout
        active_groups = cin if depthwise else groups
        assert layer.active_groups == active_groups
        x = torch.randn(2, cin, 9, 10)
        ref = plain_conv_like(layer, cin, cout, active_groups)
        y = layer(x)
        assert y.shape[1] == cout
        assert_close(y, ref(x))
        # the exported weight is the same slice
        weight, _ = layer.active_weight_and_bias()
        assert tuple(weight.shape) == tuple(ref.weight.shape)


def test_conv_prefix_semantics_standard():
    """At k active channels: the full conv on zero-padded input, first k outputs."""
    layer = SlimmableConv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 8, 7, 7)
    full = layer(torch.cat([x, torch.zeros(2, 8, 7, 7)], 1))
    layer.active_in_channels, layer.active_out_channels = 8, 10
    assert_close(layer(x), full[:, :10])


@pytest.mark.parametrize("multiplier", [1, 2])
def test_conv_prefix_semantics_depthwise(multiplier):
    """A depthwise conv's output channel j only reads input channel j // multiplier."""
    layer = SlimmableConv2d(8, 8 * multiplier, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 6, 6)
    full = layer(x)
    layer.active_in_channels, layer.active_out_channels = 3, 3 * multiplier
    assert_close(layer(x[:, :3]), full[:, : 3 * multiplier])


def test_conv_groups_not_dividing_active_channels():
    layer = SlimmableConv2d(16, 16, 3, groups=4)
    layer.active_in_channels = 6
    with pytest.raises(ValueError, match="divisible by 4 groups"):
        layer(torch.randn(1, 6, 5, 5))


def test_conv_wrong_input_channels():
    layer = SlimmableConv2d(16, 8, 3)
    layer.active_in_channels = 8
    with pytest.raises(RuntimeError, match="expects 8 active input channels"):
        layer(torch.randn(1, 16, 5, 5))
    with pytest.raises(RuntimeError, match="expects 8"):
        layer(torch.randn(5, 5))


# --- linear -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("active", [(20, 12), (10, 5), (1, 1), (7, 12)])
def test_linear_equals_plain_linear(bias, active):
    layer = SlimmableLinear(20, 12, bias=bias)
    cin, cout = active
    layer.active_in_features, layer.active_out_features = cin, cout
    ref = nn.Linear(cin, cout, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(layer.weight[:cout, :cin])
        if bias:
            ref.bias.copy_(layer.bias[:cout])
    x = torch.randn(3, cin)
    assert_close(layer(x), ref(x))
    x3 = torch.randn(2, 4, cin)  # any leading dims, like nn.Linear
    assert_close(layer(x3), ref(x3))


def test_linear_wrong_input_features():
    layer = SlimmableLinear(20, 12)
    layer.active_in_features = 10
    with pytest.raises(RuntimeError, match="expects 10 active input features"):
        layer(torch.randn(2, 20))


# --- input averaging --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cin_full, cout_full, groups, cin, cout, scale",
    [(16, 8, 1, 4, 8, 4.0), (16, 8, 1, 16, 8, 1.0), (16, 32, 4, 8, 16, 2.0),
     (16, 16, 16, 4, 4, 1.0), (8, 16, 8, 2, 4, 1.0)],
)  # fmt: skip
def test_conv_input_averaging(cin_full, cout_full, groups, cin, cout, scale):
    plain = SlimmableConv2d(cin_full, cout_full, 3, padding=1, groups=groups)
    assert plain.input_averaging is False  # off by default
    averaged = copy.deepcopy(plain)
    averaged.input_averaging = True
    for layer in (plain, averaged):
        layer.active_in_channels, layer.active_out_channels = cin, cout
    assert averaged.averaging_scale() == pytest.approx(scale)
    assert plain.averaging_scale() == 1.0
    x = torch.randn(2, cin, 5, 5)
    assert_close(averaged(x), plain(x) * scale)
    # without averaging the output is exactly the plain conv of the active shape
    groups_now = cin if plain.is_depthwise else groups
    assert_close(plain(x), plain_conv_like(plain, cin, cout, groups_now)(x))


def test_conv_input_averaging_constructor_flag():
    layer = SlimmableConv2d(8, 4, 1, input_averaging=True)
    layer.active_in_channels = 2
    assert layer.averaging_scale() == 4.0
    assert "input_averaging" in repr(layer)


def test_linear_input_averaging():
    plain = SlimmableLinear(20, 6)
    averaged = SlimmableLinear(20, 6, input_averaging=True)
    averaged.load_state_dict(plain.state_dict())
    for layer in (plain, averaged):
        layer.active_in_features = 5
    x = torch.randn(3, 5)
    assert averaged.averaging_scale() == 4.0
    assert_close(averaged(x), plain(x) * 4.0)
    for layer in (plain, averaged):
        layer.active_in_features = 20
    x = torch.randn(3, 20)
    assert_close(averaged(x), plain(x))


# --- batch norm -------------------------------------------------------------------------------
def random_bn(n=16) -> SlimmableBatchNorm2d:
    bn = SlimmableBatchNorm2d(n)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n) + 0.5)
        bn.bias.copy_(torch.randn(n))
        bn.running_mean.copy_(torch.randn(n))
        bn.running_var.copy_(torch.rand(n) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("active", [16, 8, 1])
def test_bn_train_mode_equals_plain_and_keeps_running_stats(active):
    bn = random_bn(16)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.active_features = active
    ref = nn.BatchNorm2d(active)
    with torch.no_grad():
        ref.weight.copy_(bn.weight[:active])
        ref.bias.copy_(bn.bias[:active])
    bn.train(), ref.train()
    x = torch.randn(4, active, 5, 5) * 3 + 1
    assert_close(bn(x), ref(x))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k  # no running statistic moved
    assert not bn.width_stats


def test_bn_eval_full_width_uses_own_buffers():
    bn = random_bn(16).eval()
    ref = nn.BatchNorm2d(16).eval()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(2, 16, 3, 3)
    assert torch.equal(bn(x), ref(x))


def test_bn_eval_uses_width_stats_of_its_key():
    bn = random_bn(16).eval()
    mean, var = torch.randn(6), torch.rand(6) + 0.1
    bn.active_features, bn.stats_key = 6, "k6"
    bn.width_stats["k6"] = (mean, var)
    x = torch.randn(2, 6, 3, 3)
    expected = F.batch_norm(x, mean, var, bn.weight[:6], bn.bias[:6], False, 0.0, bn.eps)
    assert_close(bn(x), expected)
    ref = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        ref.weight.copy_(bn.weight[:6]), ref.bias.copy_(bn.bias[:6])
        ref.running_mean.copy_(mean), ref.running_var.copy_(var)
    assert_close(bn(x), ref(x))


def test_bn_eval_uncalibrated_raises():
    bn = SlimmableBatchNorm2d(8).eval()  # fresh: full-width buffers never tracked a batch
    with pytest.raises(UncalibratedWidthError, match="calibrate"):
        bn(torch.randn(2, 8, 3, 3))
    bn = random_bn(8).eval()
    bn.active_features, bn.stats_key = 4, "never-calibrated"
    with pytest.raises(UncalibratedWidthError):
        bn(torch.randn(2, 4, 3, 3))
    assert issubclass(UncalibratedWidthError, RuntimeError)
    bn.train()  # train mode needs no statistics
    assert bn(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


def test_bn_wrong_channels():
    bn = SlimmableBatchNorm2d(8)
    bn.active_features = 4
    with pytest.raises(RuntimeError, match="expects 4 active channels"):
        bn(torch.randn(2, 8, 3, 3))


def test_bn_to_dtype_moves_width_stats():
    bn = random_bn(8)
    bn.width_stats["k"] = (torch.randn(4), torch.rand(4) + 0.5)
    bn.to(torch.float64)
    assert bn.running_mean.dtype == torch.float64
    mean, var = bn.width_stats["k"]
    assert mean.dtype == torch.float64 and var.dtype == torch.float64
    bn.eval()
    bn.active_features, bn.stats_key = 4, "k"
    y = bn(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert y.dtype == torch.float64
    # through a parent module too
    nn.Sequential(bn).half()
    assert bn.width_stats["k"][0].dtype == torch.float16
    assert torch.equal(bn.width_stats["k"][0].float(), mean.half().float())


def test_bn_calibration_protocol_cumulative_average():
    bn = random_bn(8)
    bn.active_features, bn.stats_key = 4, "k4"
    batches = [torch.randn(5, 4, 3, 3) * (i + 1) + i for i in range(3)]
    bn.start_calibration()
    assert bn.is_calibrating
    bn.train(False)
    for x in batches:
        bn(x)
    bn.finish_calibration()
    assert not bn.is_calibrating
    mean = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches]).mean(0)
    assert_close(bn.width_stats["k4"][0], mean)
    assert_close(bn.width_stats["k4"][1], var)
    with pytest.raises(RuntimeError, match="finish_calibration"):
        bn.finish_calibration()
    bn.start_calibration()
    with pytest.raises(RuntimeError, match="no batch"):
        bn.finish_calibration()
