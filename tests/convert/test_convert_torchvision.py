"""Every torchvision classification and segmentation model that converts is the original
network at full width, and its export at a random width equals it there.

Parametrized over ``torchvision.models.list_models`` (random weights, at most 100M parameters,
a small input), not over a hand-picked list. Models the converter refuses are skipped with the
refusal as the reason, except those in ``MUST_CONVERT``, which fail.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from usnet_testing import load_benchmark

import usnet

MAX_PARAMS = 100_000_000

MUST_CONVERT = {
    "alexnet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18",
    "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf",
    "vgg11", "vgg11_bn", "mnasnet0_5", "mnasnet1_0",
    *(f"efficientnet_b{i}" for i in range(8)), "efficientnet_v2_s",
    "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1",
    "convnext_tiny", "convnext_small", "fcn_resnet50", "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large", "vit_b_16", "vit_b_32",
}  # fmt: skip


# Model builders, input sizes, output flattening and trained-looking BN statistics: those of
# benchmarks/zoo_coverage.py, which runs the same comparison over the same zoo.
zoo = load_benchmark("zoo_coverage")
randomize_statistics, _size, _tensors = zoo.randomize_statistics, zoo.input_size, zoo.outputs


MODELS = [name for name, _ in zoo.families() if zoo.num_params(name) <= MAX_PARAMS]


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
    model = randomize_statistics(zoo.build(name)).eval()
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
    model = _convert(name, randomize_statistics(zoo.build(name)), size)  # auxiliary heads included
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
    model = usnet.slimmable(zoo.build("efficientnet_b3"), input_size=(1, 3, 32, 32))
    fc1 = model.get_submodule("features.5.4.block.2.fc1")
    usnet.set_width(model, 1.0)
    assert fc1.out_channels == 34 and fc1.active_out_channels == 34
    usnet.set_width(model, 0.99)  # below the top of the range: torchvision's rounding as before
    assert fc1.active_out_channels == usnet.make_divisible(34 * 0.99, 8) == 32
