"""The contract every registered zoo model keeps (as timm tests every registered model): it
builds, its plain export converts back to the same channel plan, it survives save/load, and its
exported plain model computes what the slimmable model computes at that width."""

from __future__ import annotations

import pytest
import torch
from usnet_testing import SMALL, liven, zoo_model

import usnet
from usnet.models import list_models
from usnet.state import get_state

WIDTH = 0.6


@pytest.fixture(scope="module", params=list_models())
def calibrated(request):
    """A 28 px zoo model with O(1) logits, calibrated at WIDTH and at full width."""
    torch.manual_seed(0)
    model = liven(zoo_model(request.param))
    usnet.calibrate(model, [torch.randn(8, 1, 28, 28)], [WIDTH, 1.0], num_images=8, progress=False)
    return request.param, model.eval()


def test_builds_with_its_architecture_record(calibrated):
    name, model = calibrated
    record = usnet.models.architecture(name)
    assert record.name == name and get_state(model).plan.width_range == record.default_width_range
    image_size = get_state(model).arch["kwargs"].get("image_size")  # the ViTs': 28 px
    assert usnet.models.model_input_size(model) == record.input_size(
        in_channels=1, small_input=True, image_size=image_size
    )


def test_convert_round_trip(calibrated):
    """The full-width export converts again (with the zoo's own ties, the same plan for models
    that need none) and computes the same outputs; the copy slims like the original."""
    name, model = calibrated
    plain = usnet.export(model, 1.0)
    lo, hi = get_state(model).plan.width_range
    again = usnet.slimmable(plain, (lo, hi), input_size=(1, 1, 28, 28))
    if name not in ("us_mobilenet_v2",):  # v2 ties its expansions by ratio_ties (zoo option)
        assert (
            get_state(again).plan.to_dict()["groups"] == get_state(model).plan.to_dict()["groups"]
        )
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x), rtol=1e-5, atol=1e-5)
        assert again.train()(x).shape == model(x).shape
        usnet.set_width(again, lo)
        assert again(x).shape == (2, 10)


def test_save_load_round_trip(calibrated, tmp_path):
    name, model = calibrated
    loaded = usnet.load(usnet.save(model, tmp_path / f"{name}.pt")).eval()
    x = torch.randn(2, 1, 28, 28)
    for w in (WIDTH, 1.0):
        with torch.no_grad(), usnet.width(model, w), usnet.width(loaded, w):
            assert torch.equal(loaded(x), model(x)), w


def test_export_equals_the_slimmable_model(calibrated):
    name, model = calibrated
    x = torch.randn(2, 1, 28, 28)
    for w in (WIDTH, 1.0):
        with torch.no_grad(), usnet.width(model, w):
            reference = model(x)
            torch.testing.assert_close(usnet.export(model, w)(x), reference, rtol=1e-5, atol=1e-5)


def test_the_zoo_refuses_a_duplicate_name():
    with pytest.raises(usnet.UsnetError, match="'us_convnet' is already registered"):

        @usnet.models.register_model((0.25, 1.0))
        def us_convnet(**kwargs):  # pragma: no cover
            raise AssertionError


def test_small_is_the_contracts_input():
    assert SMALL["in_channels"] == 1 and SMALL["small_input"] is True
