"""Every torchvision classification and segmentation model that converts is the original
network at full width, and its export at a random width equals it there.

Parametrized over ``torchvision.models.list_models`` (random weights, at most 100M parameters,
a small input), not over a hand-picked list. Every model must convert, except those listed in
``KNOWN_REFUSED``, whose refusal (and its reason) is asserted instead: a refusal of any other
model fails, and a listed model that starts converting fails too, so the list (and the README's
count) must follow the converter. No model is skipped.
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

KNOWN_REFUSED: dict[str, str] = {
    **{f"shufflenet_v2_x{s}": "channel shuffle" for s in ("0_5", "1_0", "1_5", "2_0")},
    **{f"swin_{s}": "windowed attention" for s in ("t", "s", "b", "v2_t", "v2_s", "v2_b")},
    "maxvit_t": "einsum",
}  # fmt: skip
"""Models the converter refuses today, with a phrase of the refusal (issue 26 is to convert them)."""


# Model builders, input sizes, output flattening and trained-looking BN statistics: those of
# benchmarks/zoo_coverage.py, which runs the same comparison over the same zoo.
zoo = load_benchmark("zoo_coverage")
randomize_statistics, _size, _tensors = zoo.randomize_statistics, zoo.input_size, zoo.outputs


ALL_MODELS = [name for name, _ in zoo.families() if zoo.num_params(name) <= MAX_PARAMS]
MODELS = [name for name in ALL_MODELS if name not in KNOWN_REFUSED]


def _convert(name: str, model: nn.Module, size: int | None = None) -> nn.Module:
    size = size or _size(name)
    return usnet.slimmable(model, input_size=(1, 3, size, size))


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n in KNOWN_REFUSED])
def test_known_refusals_are_refused_naming_the_reason(name):
    size = _size(name)
    with pytest.raises(usnet.ConversionError, match=KNOWN_REFUSED[name]):
        usnet.slimmable(zoo.build(name), input_size=(1, 3, size, size))


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
