"""Vision transformers beyond conversion (issue 14): profiled MACs equal the hand count
(attention's matrix products included), save/load keeps the size attributes and the logits,
deployment artifacts verify, and channel reordering keeps the full-width function."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from usnet_testing import liven_vit, timm_vit, tv_vit

import usnet
from usnet.state import get_state

HAS_ONNXRUNTIME = importlib.util.find_spec("onnxruntime") is not None


def vit_macs(image: int, patch: int, channels: int, hidden: int, mlp: int, layers: int,
             classes: int) -> int:  # fmt: skip
    """Multiply-accumulates of a ViT: patch embedding, then per block q/k/v, the two attention
    matrix products (q k^T and attn v: 2 T^2 e), the output projection and the MLP; the head
    reads the class token. Norms, softmax and GELU are not multiply-accumulates."""
    patches = (image // patch) ** 2
    tokens = patches + 1
    embed = hidden * channels * patch * patch * patches
    block = (
        tokens * hidden * 3 * hidden
        + 2 * tokens * tokens * hidden
        + tokens * hidden * hidden
        + 2 * tokens * hidden * mlp
    )
    return embed + layers * block + hidden * classes


def test_profile_of_the_small_torchvision_vit_equals_the_hand_count():
    model = usnet.slimmable(tv_vit(), input_size=(1, 3, 32, 32))
    full, half = usnet.profile(model, 1.0), usnet.profile(model, 0.5)
    assert full.macs == vit_macs(32, 4, 3, 64, 128, 2, 10) == 5_538_688
    assert usnet.channels_at(model, 0.5)["conv_proj"] == 32
    assert half.macs == vit_macs(32, 4, 3, 32, 64, 2, 10)
    assert full.params == sum(p.numel() for p in tv_vit().parameters())
    exported = usnet.export(model, 0.5)
    assert half.params == sum(p.numel() for p in exported.parameters())


def test_profile_of_us_vit_tiny_at_224_equals_the_hand_count():
    model = usnet.models.create_model("us_vit_tiny")
    macs = usnet.profile(model, 1.0).macs
    assert macs == vit_macs(224, 16, 3, 192, 768, 12, 1000) == 1_253_683_200  # timm: 1.26G
    assert usnet.profile(model, 1.0).params == 5_717_416  # timm's vit_tiny_patch16_224


def _zoo_vit():
    model = usnet.models.create_model("us_vit", num_classes=10, in_channels=1, small_input=True,
                                      image_size=28, hidden_dim=64, num_heads=4, mlp_dim=128,
                                      num_layers=2)  # fmt: skip
    return liven_vit(model)


def _timm_converted():
    return usnet.slimmable(timm_vit(), input_size=(1, 3, 32, 32))


@pytest.mark.parametrize("kind", ["zoo", "timm"])
def test_save_load_round_trip_keeps_logits_and_size_attributes(kind, tmp_path):
    model, x = (
        (_zoo_vit(), torch.randn(2, 1, 28, 28))
        if kind == "zoo"
        else (_timm_converted(), torch.randn(2, 3, 32, 32))
    )
    assert (get_state(model).arch is None) == (kind == "timm")  # timm: the pickled module
    usnet.set_width(model, 0.3)
    loaded = usnet.load(usnet.save(model, tmp_path / "vit.pt")).eval()
    model.eval()
    assert get_state(loaded).shape_attrs == get_state(model).shape_attrs
    assert get_state(loaded).shape_attrs  # torchvision's hidden_dim, timm's num_heads/attn_dim
    for w in (0.3, 0.55, 1.0):
        with torch.no_grad(), usnet.width(model, w), usnet.width(loaded, w):
            assert torch.equal(loaded(x), model(x)), w
            for attr in get_state(model).shape_attrs:
                a = getattr(loaded.get_submodule(attr.module), attr.attr)
                assert a == getattr(model.get_submodule(attr.module), attr.attr)


@pytest.mark.parametrize(
    "fmt, suffix",
    [
        ("pt", "pt2"),
        ("torchscript", "torchscript.pt"),
        pytest.param(
            "onnx",
            "onnx",
            marks=pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="needs onnxruntime"),
        ),
    ],
)
def test_deployment_artifacts_of_a_narrow_vit_verify(fmt, suffix, tmp_path):
    model = _zoo_vit()
    result = usnet.export_artifact(model, 0.4, tmp_path / f"vit.{suffix}", format=fmt)
    assert result.max_abs_diff <= result.tolerance
    assert result.macs == usnet.profile(model, 0.4).macs < usnet.profile(model, 1.0).macs
    run = usnet.load_artifact(tmp_path / f"vit.{suffix}")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), usnet.width(model.eval(), 0.4):
        torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_reorder_keeps_full_width_and_changes_narrow_widths(kind):
    plain = tv_vit() if kind == "torchvision" else timm_vit()
    model = usnet.slimmable(copy.deepcopy(plain), input_size=(1, 3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = {}
        for w in (0.5, 1.0):
            usnet.set_width(model, w)
            before[w] = model(x)
    permutations = usnet.reorder_channels(model, importance="l1")
    assert any(not torch.equal(p, torch.arange(len(p))) for p in permutations.values())
    model.eval()
    with torch.no_grad():
        usnet.set_width(model, 1.0)
        torch.testing.assert_close(model(x), before[1.0], rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-5)
        usnet.set_width(model, 0.5)
        assert not torch.allclose(model(x), before[0.5], atol=1e-3)
        exported = usnet.export(model, 0.5)
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
