"""usnet.calibrate: per-width BatchNorm statistics from a sample of images."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from usnet_testing import assert_same_tensors, liven, params_snapshot, tiny_slimmable, zoo_model

import usnet
from usnet import UncalibratedWidthError

CH = 32  # tiny model channels: width 0.5 -> 16, 0.25 -> 8


@pytest.fixture
def model():
    return liven(tiny_slimmable(channels=CH, spatial=8))


def images(n=40, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen) * 2 + 0.5


@torch.no_grad()
def reference_stats(model, batches, active):
    """Per-batch mean and unbiased var of the conv output at ``active`` channels, averaged."""
    conv = model[0]
    means, variances = [], []
    for x in batches:
        y = F.conv2d(x, conv.weight[:active], conv.bias[:active], padding=1)
        means.append(y.mean((0, 2, 3)))
        variances.append(y.var((0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


@torch.no_grad()
def reference_output(model, x, active, mean, var):
    conv, bn, fc = model[0], model[1], model[5]
    y = F.conv2d(x, conv.weight[:active], conv.bias[:active], padding=1)
    y = F.batch_norm(y, mean, var, bn.weight[:active], bn.bias[:active], False, 0.0, bn.eps)
    y = F.relu(y).mean((2, 3))
    return F.linear(y, fc.weight[:, :active], fc.bias)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_matches_hand_computed_reference(model):
    data = images(40).split(16)  # batches of 16, 16, 8
    keys = usnet.calibrate(model, list(data), widths=[0.5], num_images=40)
    key = usnet.config_key(usnet.channel_plan(model).config(0.5))
    assert keys == [key]
    bn = model[1]
    mean, var = reference_stats(model, data, 16)
    assert set(bn.width_stats) == {key}
    assert_close(bn.width_stats[key][0], mean)
    assert_close(bn.width_stats[key][1], var)
    # eval at that width uses them
    model.eval()
    usnet.set_width(model, 0.5)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    assert y.abs().max() > 0.1
    assert_close(y, reference_output(model, x, 16, mean, var))
    assert usnet.is_calibrated(model, 0.5)
    assert not usnet.is_calibrated(model, 0.25)


def test_empty_batches_count_for_nothing(model):
    """An empty batch in the user's data adds no statistics and no weight to the average, on the
    fast CPU path (8x8 maps) and the native one (2x2 maps) alike; a direct forward of one leaves
    a calibrating layer as it was."""
    for size in (8, 2):
        data = list(
            (
                torch.randn(40, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
            ).split(16)
        )
        with_empty = [data[0], data[0][:0], data[1], data[2][:0], data[2]]
        mean, var = reference_stats(model, data, 16)
        usnet.calibrate(model, with_empty, widths=[0.5], num_images=40)
        key = usnet.config_key(usnet.channel_plan(model).config(0.5))
        assert_close(model[1].width_stats[key][0], mean)
        assert_close(model[1].width_stats[key][1], var)
    bn = model[1]
    usnet.set_width(model, 1.0)
    bn.start_calibration()
    with torch.no_grad():
        assert bn(torch.empty(0, CH, 8, 8)).shape == (0, CH, 8, 8)
        bn(torch.randn(8, CH, 8, 8))
        bn(torch.empty(0, CH, 8, 8))
    assert bn._calibration.batches == 1 and torch.isfinite(bn._calibration.var).all()
    bn.cancel_calibration()


def test_uses_only_num_images(model):
    data = list(images(40).split(16))
    usnet.calibrate(model, data, widths=[0.25], num_images=20)
    mean, var = reference_stats(model, [data[0], data[1][:4]], 8)
    key = usnet.config_key(usnet.channel_plan(model).config(0.25))
    assert_close(model[1].width_stats[key][0], mean)
    assert_close(model[1].width_stats[key][1], var)


def test_full_width_writes_running_buffers(model):
    data = list(images(40).split(16))
    assert int(model[1].num_batches_tracked) == 0
    keys = usnet.calibrate(model, data, widths=1.0, num_images=40)
    assert keys == [usnet.config_key(usnet.channel_plan(model).config(1.0))]
    bn = model[1]
    mean, var = reference_stats(model, data, CH)
    assert_close(bn.running_mean, mean)
    assert_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 3
    assert not bn.width_stats  # full width lives in the plain buffers
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(model(x), reference_output(model, x, CH, mean, var))


def test_changes_no_parameter(model):
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = params_snapshot(model)
    usnet.calibrate(model, [images(32)], widths=[0.25, 0.5, 0.75], num_images=32)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].grad is None
    # partial widths leave the full-width running buffers alone as well
    assert_same_tensors(params_snapshot(model), buffers)
    assert len(model[1].width_stats) == 3


def test_deterministic_for_a_seed(model):
    dataset = TensorDataset(images(200), torch.zeros(200, dtype=torch.long))

    def stats(seed):
        usnet.calibrate(model, dataset, widths=[0.5], num_images=24, seed=seed, batch_size=8)
        key = usnet.config_key(usnet.channel_plan(model).config(0.5))
        return [t.clone() for t in model[1].width_stats[key]]

    a, b, c = stats(0), stats(0), stats(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])
    s0 = usnet.sample_images(dataset, 24, seed=0, batch_size=8)
    s0b = usnet.sample_images(dataset, 24, seed=0, batch_size=8)
    s1 = usnet.sample_images(dataset, 24, seed=1, batch_size=8)
    assert [x.shape[0] for x in s0] == [8, 8, 8]
    assert all(torch.equal(x, y) for x, y in zip(s0, s0b))
    assert not torch.equal(torch.cat(s0), torch.cat(s1))
    # a random sample, not the first images
    assert not torch.equal(torch.cat(s0), dataset.tensors[0][:24])


@pytest.mark.parametrize("kind", ["loader", "dataset", "tensors", "tuples", "dicts"])
def test_accepted_data_types(model, kind):
    x = images(32)
    y = torch.arange(32)
    data = {
        "loader": DataLoader(TensorDataset(x, y), batch_size=32),
        "dataset": TensorDataset(x, y),
        "tensors": [x[:32]],
        "tuples": [(x, y)],
        "dicts": [{"image": x, "label": y}],
    }[kind]
    # one batch holding every image: the statistics do not depend on the sample's order
    usnet.calibrate(model, data, widths=[0.5], num_images=32, batch_size=32)
    mean, var = reference_stats(model, [x], 16)
    key = usnet.config_key(usnet.channel_plan(model).config(0.5))
    assert_close(model[1].width_stats[key][0], mean)
    assert_close(model[1].width_stats[key][1], var)


def test_same_config_calibrated_once(model):
    plan = usnet.channel_plan(model)
    assert plan.config(0.5) == plan.config(0.51) == plan.config(0.52)
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    data = list(images(32).split(8))
    keys = usnet.calibrate(model, data, widths=[0.5, 0.51, 0.52, 1.0], num_images=32)
    assert len(keys) == 2
    assert keys == [usnet.config_key(plan.config(0.5)), usnet.config_key(plan.config(1.0))]
    assert len(calls) == 2 * 4  # two configurations x four batches


def test_restores_width_and_mode(model):
    usnet.set_width(model, 0.75)
    model.train()
    usnet.calibrate(model, [images(16)], widths=[0.25, 0.5], num_images=16)
    assert usnet.get_width(model) == 0.75
    assert model[0].active_out_channels == 24
    assert all(m.training for m in model.modules())
    model.eval()
    roots = usnet.channel_plan(model).root_names
    usnet.set_width(model, {roots[0]: 0.5})
    usnet.calibrate(model, [images(16)], widths=[1.0], num_images=16)
    assert usnet.get_width(model) == {roots[0]: 0.5}
    assert not any(m.training for m in model.modules())
    assert not any(m.is_calibrating for m in model.modules() if hasattr(m, "is_calibrating"))


@pytest.mark.parametrize("momentum", [0.0, None, 0.9])
def test_layers_momentum_and_mode_do_not_matter(model, momentum):
    data = list(images(40).split(16))
    model[1].momentum = momentum
    model.train()
    model[1].train(True)
    usnet.calibrate(model, data, widths=[0.5, 1.0], num_images=40)
    key = usnet.config_key(usnet.channel_plan(model).config(0.5))
    mean, var = reference_stats(model, data, 16)
    assert_close(model[1].width_stats[key][0], mean)
    assert_close(model[1].width_stats[key][1], var)
    mean, var = reference_stats(model, data, CH)
    assert_close(model[1].running_mean, mean)
    assert_close(model[1].running_var, var)


def test_recalibration_replaces_statistics(model):
    key = usnet.config_key(usnet.channel_plan(model).config(0.5))
    usnet.calibrate(model, [images(16, seed=1)], widths=[0.5], num_images=16)
    usnet.calibrate(model, [images(16, seed=2) * 5], widths=[0.5], num_images=16)
    mean, var = reference_stats(model, [images(16, seed=2) * 5], 16)
    assert_close(model[1].width_stats[key][0], mean)
    assert_close(model[1].width_stats[key][1], var)


@pytest.mark.parametrize("bad", [42, torch.randn(4, 3, 8, 8), "images", [["a"]], [42]])
def test_bad_data_type(model, bad):
    with pytest.raises(TypeError, match="calibration"):
        usnet.calibrate(model, bad, widths=[0.5])
    assert not model[1].width_stats


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_images(model, bad):
    with pytest.raises(ValueError, match="num_images"):
        usnet.calibrate(model, [images(8)], widths=[0.5], num_images=bad)
    assert not model[1].width_stats and usnet.get_width(model) == 1.0


def test_bad_images(model):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        usnet.calibrate(model, [torch.randn(3, 8, 8)], widths=[0.5])
    with pytest.raises(ValueError, match="no images"):
        usnet.calibrate(model, [], widths=[0.5])


@pytest.mark.parametrize("widths", [[0.5, 2.0], [0.1], [0.5, "x"], [], [{"nope": 0.5}]])
def test_invalid_width_before_anything_changes(model, widths):
    usnet.set_width(model, 0.75)
    snapshot = params_snapshot(model)
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises((ValueError, TypeError)):
        usnet.calibrate(model, [images(16)], widths=widths, num_images=16)
    assert calls == []
    assert not model[1].width_stats
    assert_same_tensors(params_snapshot(model), snapshot)
    assert usnet.get_width(model) == 0.75


def test_failure_during_calibration_restores_model(model):
    usnet.set_width(model, 0.75)
    model.train()
    snapshot = params_snapshot(model)
    data = [images(8), torch.randn(8, 5, 8, 8)]  # the second batch has the wrong channels
    with pytest.raises(RuntimeError):
        usnet.calibrate(model, data, widths=[0.5], num_images=16)
    assert usnet.get_width(model) == 0.75 and model[0].active_out_channels == 24
    assert model.training and model[1].training
    assert not model[1].is_calibrating
    assert not model[1].width_stats  # nothing half-calibrated is stored
    assert_same_tensors(params_snapshot(model), snapshot)
    usnet.set_width(model, 0.5)  # and the model is usable again


def test_warns_when_data_is_short(model):
    with pytest.warns(UserWarning, match="only 8 images"):
        usnet.calibrate(model, [images(8)], widths=[0.5], num_images=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        usnet.calibrate(model, [images(8)], widths=[0.5], num_images=8)


def test_zoo_model_calibrated_widths_only():
    model = zoo_model("us_mobilenet_v2")
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    keys = usnet.calibrate(model, data, widths=[0.35, 0.6, 1.0], num_images=16)
    assert len(keys) == 3
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    for w in (0.35, 0.6, 1.0):
        assert usnet.is_calibrated(model, w)
        usnet.set_width(model, w)
        assert torch.isfinite(model(x)).all()
    assert not usnet.is_calibrated(model, 0.8)
    usnet.set_width(model, 0.8)
    with pytest.raises(UncalibratedWidthError, match="0.8"):
        model(x)


def test_numpy_scalar_width(model):
    usnet.set_width(model, np.float32(0.5))  # accepted as a width everywhere else
    keys = usnet.calibrate(model, [images(16)], widths=np.float32(0.5), num_images=16)
    assert keys == [usnet.config_key(usnet.channel_plan(model).config(0.5))]


def test_float64_model(model):
    model.double()
    data = [images(16).double()]
    usnet.calibrate(model, data, widths=[0.5], num_images=16)
    key = usnet.config_key(usnet.channel_plan(model).config(0.5))
    mean, var = reference_stats(model, data, 16)
    assert model[1].width_stats[key][0].dtype == torch.float64
    torch.testing.assert_close(model[1].width_stats[key][0], mean)
    torch.testing.assert_close(model[1].width_stats[key][1], var)


def test_bn_without_running_stats():
    plain = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    model = usnet.slimmable(plain, input_size=(1, 3, 8, 8))
    assert usnet.is_calibrated(model, 1.0)  # nothing to calibrate: batch statistics always
    usnet.calibrate(model, [images(8)], widths=[0.5, 1.0], num_images=8)
    model.eval()
    x = images(4)
    with torch.no_grad():
        assert torch.equal(model(x), usnet.export(model, 1.0)(x))


@pytest.mark.parametrize("name, width", [("us_mobilenet_v2", 0.6), ("us_resnet18", 0.4)])
def test_every_bn_layer_equals_pytorch_cumulative_batchnorm(name, width):
    """The statistics an export carries, at every BatchNorm layer, are PyTorch's own cumulative
    BatchNorm (``momentum=None``, train mode) on the same images: the plain exported network,
    its statistics reset, run over the same batches in the same order."""
    torch.manual_seed(0)
    model = liven(zoo_model(name))
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(16, 1, 28, 28, generator=gen) * 1.5 + 0.2 for _ in range(4)]
    usnet.calibrate(model, batches, widths=[width], num_images=64)
    exported = usnet.export(model, width)
    reference = usnet.export(model, width)  # the same plain network, to be re-estimated by torch
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: the mean of the per-batch statistics
    reference.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    got = dict(exported.named_modules())
    assert len(bns) >= 20
    checked = 0
    for layer, bn in reference.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        assert int(bn.num_batches_tracked) == len(batches), layer
        torch.testing.assert_close(got[layer].running_mean, bn.running_mean, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, layer=layer: f"{layer} mean: {m}")  # fmt: skip
        torch.testing.assert_close(got[layer].running_var, bn.running_var, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, layer=layer: f"{layer} var: {m}")  # fmt: skip
        checked += 1
    assert checked == len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
