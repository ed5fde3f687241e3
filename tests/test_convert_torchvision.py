"""Every torchvision classification and segmentation model that converts is the original
network at full width, and its export at a random width equals it there.

Parametrized over ``torchvision.models.list_models`` (random weights, at most 100M parameters,
a small input), not over a hand-picked list. Models the converter refuses are skipped with the
refusal as the reason, except those in ``MUST_CONVERT``, which fail.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import torchvision
from torch import nn

import usnet

MAX_PARAMS = 100_000_000
FIXED_SIZE = ("vit_", "swin", "maxvit")  # position embeddings / windows need 224 px

MUST_CONVERT = {
    "alexnet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18",
    "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf",
    "vgg11", "vgg11_bn", "mnasnet0_5", "mnasnet1_0",
    *(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s",
    "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1",
    "convnext_tiny", "convnext_small", "fcn_resnet50", "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
}  # fmt: skip


def _build(name: str, **extra) -> nn.Module:
    kwargs = {"weights": None, **extra}
    if name in SEGMENTATION:
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = (
            False  # scipy's truncated normal is slow; weights are random anyway
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, **kwargs)


SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)


def _small_models() -> list[str]:
    names = []
    for name in torchvision.models.list_models(module=torchvision.models) + SEGMENTATION:
        # the published weights' metadata counts the parameters without building the model
        params = list(torchvision.models.get_model_weights(name))[0].meta["num_params"]
        if params <= MAX_PARAMS:
            names.append(name)
    return names


@torch.no_grad()
def randomize_statistics(model: nn.Module) -> nn.Module:
    """Random running statistics marked as trained (initial ones count as never calibrated)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1)
    return model


def _size(name: str) -> int:
    return (
        224 if name.startswith(FIXED_SIZE) else 299 if name == "inception_v3" else 64
    )  # its aux head needs 299


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    return [t for o in out for t in _tensors(o)]


MODELS = _small_models()


_REFUSED: dict[str, str] = {}  # a model refused once is not built again by the next test


def _convert(name: str, model: nn.Module, size: int | None = None) -> nn.Module:
    size = size or _size(name)
    try:
        return usnet.slimmable(model, input_size=(1, 3, size, size))
    except usnet.ConversionError as err:
        if name in MUST_CONVERT:
            raise
        _REFUSED[name] = f"refused: {str(err)[:200]}"
        pytest.skip(_REFUSED[name])


@pytest.mark.parametrize("name", MODELS)
def test_full_width_is_the_original_model(name):
    model = randomize_statistics(_build(name)).eval()
    size = _size(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = _tensors(model(x))
    converted = _convert(name, copy.deepcopy(model))
    state = usnet.state.get_state(converted)
    assert state.plan.config(1.0) == state.full_config  # every group at its full size
    converted.eval()
    with torch.no_grad():
        got = _tensors(converted(x))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_export_at_a_random_width_equals_the_converted_model(name):
    if name in _REFUSED:
        pytest.skip(_REFUSED[name])
    size = _size(name)
    model = _convert(name, randomize_statistics(_build(name)), size)  # auxiliary heads included
    width = random.Random(name).uniform(0.25, 0.9)
    images = torch.randn(4, 3, size, size)
    usnet.calibrate(model, [images[:2], images[2:]], [width], num_images=4)
    plain = usnet.export(model, width)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), usnet.width(model.eval(), width):
        expected = _tensors(model(x))
        got = _tensors(plain(x))
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    state = usnet.state.get_state(model)
    assert state.plan.config(width) != state.full_config


def test_groups_not_divisible_by_their_divisor_are_full_at_width_one():
    """efficientnet_b3's squeeze-excitation layers have 34 channels (not a multiple of 8)."""
    model = usnet.slimmable(_build("efficientnet_b3"), input_size=(1, 3, 32, 32))
    fc1 = model.get_submodule("features.5.4.block.2.fc1")
    usnet.set_width(model, 1.0)
    assert fc1.out_channels == 34 and fc1.active_out_channels == 34
    usnet.set_width(model, 0.99)  # below the top of the range: torchvision's rounding as before
    assert fc1.active_out_channels == usnet.make_divisible(34 * 0.99, 8) == 32
