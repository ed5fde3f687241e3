"""Helpers shared by the usnet tests: tiny models, zoo builders, reference computations."""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torchvision.models import VisionTransformer

import usnet
from usnet.nn.attention import SlimmableMultiheadAttention
from usnet.nn.conv import SlimmableConv2d
from usnet.nn.linear import SlimmableLinear
from usnet.nn.norm import SlimmableBatchNorm2d
from usnet.nn.params import SlicedParameters

SMALL = dict(small_input=True, in_channels=1, num_classes=10)
"""Zoo builder arguments for the fast 28 px tests."""

SLIMMABLE_TYPES = (SlimmableConv2d, SlimmableLinear, SlimmableBatchNorm2d)


def zoo_model(name: str, **kwargs) -> nn.Module:
    """A zoo model for 28 px single-channel images (overridable). Builders of models made for
    one image size (the ViTs' position embeddings) get ``image_size=28``."""
    builder = getattr(usnet.models.zoo, name, None)
    if builder is not None and "image_size" in inspect.signature(builder).parameters:
        kwargs.setdefault("image_size", 28)
    return usnet.models.create_model(name, **{**SMALL, **kwargs})


def tiny_cnn(in_channels: int = 3, channels: int = 16, num_classes: int = 10, pool: int = 1):
    """conv -> bn -> relu -> pool -> flatten -> linear, as a plain nn.Sequential."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(channels * pool * pool, num_classes),
    )


def tiny_slimmable(width_range=(0.25, 1.0), spatial: int = 8, **kwargs) -> nn.Module:
    return usnet.slimmable(tiny_cnn(**kwargs), width_range, input_size=(1, 3, spatial, spatial))


def grid(lo: float, hi: float, step: float) -> list[float]:
    """lo, lo+step, ..., hi (hi always included), rounded to avoid float noise."""
    n = int(math.floor((hi - lo) / step + 1e-9))
    values = [round(lo + i * step, 6) for i in range(n + 1)]
    if hi - values[-1] > 1e-9:
        values.append(hi)
    return values


@torch.no_grad()
def liven(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize BN affine parameters and Linear weights so that logits are O(1), not ~0.

    Zoo models initialize classifiers at std 0.01 and BN at weight 1/bias 0, which would make
    tolerance-based comparisons of logits nearly vacuous.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.in_features))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


@torch.no_grad()
def liven_vit(model: nn.Module, seed: int = 0) -> nn.Module:
    """O(1) logits that depend on every part: random Linear weights (torchvision's ViT head
    starts at zero), LayerNorm affines, class token and position embedding (zero or ~0 at init)."""
    liven(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    for name, param in model.named_parameters():
        if name.rpartition(".")[2] in ("class_token", "pos_embedding", "cls_token", "pos_embed"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def tv_vit() -> nn.Module:
    """torchvision's ViT: 32 px, patch 4, 2 blocks of 64 channels in 4 heads, MLP 128."""
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                              hidden_dim=64, mlp_dim=128, num_classes=10)  # fmt: skip
    return liven_vit(model).eval()


def timm_vit() -> nn.Module:
    """timm's vit_tiny (192 channels in 3 heads of 64, MLP 768) with 2 blocks on 32 px."""
    import timm  # a test dependency, imported only where a test needs it

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=4, depth=2, num_classes=10)  # fmt: skip
    return liven_vit(model).eval()


def slimmable_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SLIMMABLE_TYPES)]


def group_of(model: nn.Module, layer: str) -> str:
    """Name of the channel group a layer's outputs are bound to."""
    for b in usnet.state.get_state(model).bindings:
        if b.layer == layer:
            return b.outputs[0]
    raise KeyError(layer)


def active_out(layer: nn.Module) -> int:
    if isinstance(layer, SlimmableConv2d):
        return layer.active_out_channels
    if isinstance(layer, SlimmableLinear):
        return layer.active_out_features
    if isinstance(layer, SlimmableMultiheadAttention):
        return layer.active_embed
    if isinstance(layer, SlicedParameters):  # class token, position embedding: their channels
        active = layer.__dict__["usnet_active"]
        if active is not None:
            return active.count
        name, dim = next(iter(layer.__dict__["usnet_sliced"].items()))
        return layer.get_parameter(name).shape[dim]
    if hasattr(layer, "active_features"):  # BatchNorm, LayerNorm, GroupNorm
        return layer.active_features
    raise TypeError(type(layer).__name__)


def active_in(layer: nn.Module) -> int:
    if isinstance(layer, SlimmableConv2d):
        return layer.active_in_channels
    if isinstance(layer, SlimmableMultiheadAttention):
        return layer.active_embed
    return layer.active_in_features


def check_bindings(model: nn.Module) -> None:
    """Every bound layer's active sizes equal its groups' channels at the current width."""
    state = usnet.state.get_state(model)
    channels = usnet.channels_at(model)
    for b in state.bindings:
        layer = model.get_submodule(b.layer)
        out = channels[b.outputs[0]] * b.outputs[1]
        assert active_out(layer) == out, b.layer
        if b.inputs is not None:
            cin = channels[b.inputs[0]] * b.inputs[1]
            assert active_in(layer) == cin, b.layer


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def params_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def random_mapping(model: nn.Module, gen: torch.Generator) -> dict[str, float]:
    """A random non-uniform width: one multiplier per root group, within the range."""
    plan = usnet.channel_plan(model)
    lo, hi = plan.width_range
    return {name: lo + (hi - lo) * torch.rand((), generator=gen).item() for name in plan.root_names}


def first_of(modules: Iterable[nn.Module], cls) -> nn.Module:
    return next(m for m in modules if isinstance(m, cls))


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (once per test session; the scripts import each
    other by name, as when run from that folder)."""
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
