"""Universally slimmable models, built through the converter from plain torchvision-style models.

Every builder takes ``num_classes``, ``in_channels``, ``width_range`` and ``small_input`` (a stem
for 28-32 px images such as Fashion-MNIST or CIFAR), returns a slimmable model whose module names
match the plain model's, and records itself in the model so :func:`usnet.load` can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torchvision
from torch import nn

from ..convert import slimmable
from ..errors import UsnetValueError
from .convnet import DEFAULT_CHANNELS, DEFAULT_STRIDES, ConvNet
from .mobilenet_v1 import MobileNetV1


@dataclass(frozen=True)
class Architecture:
    """What the zoo records about a builder when it is registered (timm's model config): its
    default width range and the images it takes, so commands need not guess them."""

    name: str
    default_width_range: tuple[float, float]
    image_size: int = 224  # side of the images of the ImageNet-style stem
    small_image_size: int = 32  # side with ``small_input=True`` (28-32 px: Fashion-MNIST, CIFAR)

    def input_size(
        self, in_channels: int = 3, small_input: bool = False, image_size: int | None = None
    ) -> tuple[int, int, int, int]:
        """The ``(1, C, H, W)`` input the builder's model takes with these arguments
        (``image_size``: a builder argument of models made for one size, the ViTs)."""
        side = image_size or (self.small_image_size if small_input else self.image_size)
        return (1, in_channels, side, side)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_ARCHITECTURES: dict[str, Architecture] = {}
DEFAULT_WIDTH_RANGES: dict[str, tuple[float, float]] = {}


def register_model(default_width_range: tuple[float, float], *, image_size: int = 224,
                   small_image_size: int = 32):  # fmt: skip
    """Register a builder under its function name with its :class:`Architecture`; a name that
    is already registered is refused (as torchvision's registry does)."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _BUILDERS:
            raise UsnetValueError(
                f"a zoo model {name!r} is already registered; choose another name"
            )
        _BUILDERS[name] = fn
        _ARCHITECTURES[name] = Architecture(
            name, tuple(default_width_range), image_size, small_image_size
        )
        DEFAULT_WIDTH_RANGES[name] = tuple(default_width_range)
        return fn

    return decorator


def architecture(name: str) -> Architecture:
    """The architecture record of a zoo model by name."""
    if name not in _ARCHITECTURES:
        raise UsnetValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _ARCHITECTURES[name]


def model_input_size(model: nn.Module) -> tuple[int, int, int, int]:
    """The ``(1, C, H, W)`` input a slimmable model takes: from its zoo architecture record and
    the arguments it was built with; for a converted custom model, the shape of the example
    input it was converted with."""
    from ..state import get_state

    state = get_state(model)
    arch = state.arch or {}
    if arch.get("name") in _ARCHITECTURES:
        kwargs = arch.get("kwargs", {})
        return _ARCHITECTURES[arch["name"]].input_size(int(kwargs.get("in_channels", 3)),
                                                       bool(kwargs.get("small_input", False)),
                                                       kwargs.get("image_size"))  # fmt: skip
    if state.input_size is not None and len(state.input_size) == 4:
        return tuple(state.input_size)  # type: ignore[return-value]
    channels = next(
        (g.size for g in state.plan.groups.values() if g.name.startswith("input:")), None
    )
    if state.input_size is not None or channels is None:
        raise UsnetValueError(
            f"the input size of this {type(model).__name__} is not known (converted with "
            f"{'input ' + str(tuple(state.input_size)) if state.input_size else 'no recorded input'}); "
            "pass --input-size / input_size=(N, C, H, W)"
        )
    return (1, channels, 224, 224)  # converted before usnet recorded the example input


def list_models() -> list[str]:
    """Names of the zoo's builders."""
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name (e.g. ``create_model("us_mobilenet_v2", num_classes=10)``)."""
    if name not in _BUILDERS:
        raise UsnetValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)


def _finish(name: str, model: nn.Module, width_range, kwargs: dict, input_size, **convert_kw):
    arch = {"name": name, "kwargs": {**kwargs, "width_range": list(width_range)}}
    return slimmable(model, width_range, input_size=input_size, arch=arch, **convert_kw)


def _replace_stem(conv: nn.Conv2d, in_channels: int, small_input: bool, kernel: int) -> nn.Conv2d:
    """The first conv with another number of input channels and, for small images, stride 1."""
    stride = 1 if small_input else conv.stride
    padding = kernel // 2
    return nn.Conv2d(
        in_channels, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None
    )


def _input_size(name: str, in_channels: int, small_input: bool) -> tuple[int, int, int, int]:
    return _ARCHITECTURES[name].input_size(in_channels, small_input)


@register_model((0.25, 1.0))
def us_mobilenet_v1(
    num_classes: int = 1000,
    in_channels: int = 3,
    width_range: tuple[float, float] = (0.25, 1.0),
    small_input: bool = False,
    dropout: float = 0.0,
    input_averaging: bool = False,
) -> nn.Module:
    """US-MobileNetV1 (569M MACs at 1.0, 41M at 0.25 on 224 px)."""
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  dropout=dropout, input_averaging=input_averaging)  # fmt: skip
    model = MobileNetV1(num_classes, 1.0, in_channels, small_input, dropout)
    return _finish("us_mobilenet_v1", model, width_range, kwargs,
                   _input_size("us_mobilenet_v1", in_channels, small_input), input_averaging=input_averaging)  # fmt: skip


@register_model((0.35, 1.0))
def us_mobilenet_v2(
    num_classes: int = 1000,
    in_channels: int = 3,
    width_range: tuple[float, float] = (0.35, 1.0),
    small_input: bool = False,
    dropout: float = 0.2,
    input_averaging: bool = False,
) -> nn.Module:
    """US-MobileNetV2 with torchvision's layout: at every width w its channels equal
    ``torchvision.models.mobilenet_v2(width_mult=w)`` (expansions tied at t times their block's
    input, the last 1280-channel conv fixed)."""
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  dropout=dropout, input_averaging=input_averaging)  # fmt: skip
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, dropout=dropout)
    stem = model.features[0][0]
    if in_channels != 3 or small_input:
        model.features[0][0] = _replace_stem(stem, in_channels, small_input, 3)
    if small_input:  # keep 28-32 px images at full resolution through the first stride-2 block
        model.features[2].conv[1][0].stride = (1, 1)
    expansions = [
        f"features.{i}.conv.0.0"
        for i, block in enumerate(model.features)
        if isinstance(block, torchvision.models.mobilenetv2.InvertedResidual)
        and len(block.conv) == 4
    ]
    last = f"features.{len(model.features) - 1}.0"
    return _finish("us_mobilenet_v2", model, width_range, kwargs,
                   _input_size("us_mobilenet_v2", in_channels, small_input), ratio_ties=expansions,
                   fixed_outputs=[last], input_averaging=input_averaging)  # fmt: skip


def _us_resnet(name: str, depth: int, num_classes, in_channels, width_range, small_input,
               input_averaging) -> nn.Module:  # fmt: skip
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  input_averaging=input_averaging)  # fmt: skip
    model = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    if small_input:  # CIFAR-style stem: 3x3 stride-1 conv, no max pooling
        model.conv1 = _replace_stem(model.conv1, in_channels, True, 3)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return _finish(name, model, width_range, kwargs, _input_size(name, in_channels, small_input),
                   input_averaging=input_averaging)  # fmt: skip


@register_model((0.25, 1.0))
def us_resnet18(num_classes: int = 1000, in_channels: int = 3,
                width_range: tuple[float, float] = (0.25, 1.0), small_input: bool = False,
                input_averaging: bool = False) -> nn.Module:  # fmt: skip
    """US-ResNet-18 with torchvision's module names."""
    return _us_resnet("us_resnet18", 18, num_classes, in_channels, width_range, small_input,
                      input_averaging)  # fmt: skip


@register_model((0.25, 1.0))
def us_resnet50(num_classes: int = 1000, in_channels: int = 3,
                width_range: tuple[float, float] = (0.25, 1.0), small_input: bool = False,
                input_averaging: bool = False) -> nn.Module:  # fmt: skip
    """US-ResNet-50 with torchvision's module names (4.09G MACs at 1.0 on 224 px)."""
    return _us_resnet("us_resnet50", 50, num_classes, in_channels, width_range, small_input,
                      input_averaging)  # fmt: skip


@register_model((0.25, 1.0))
def us_convnet(
    num_classes: int = 10,
    in_channels: int = 1,
    width_range: tuple[float, float] = (0.25, 1.0),
    small_input: bool = True,
    channels: tuple[int, ...] | list[int] = DEFAULT_CHANNELS,
    strides: tuple[int, ...] | list[int] = DEFAULT_STRIDES,
    dropout: float = 0.0,
    pool_size: int = 1,
    input_averaging: bool = False,
) -> nn.Module:
    """US-ConvNet: a VGG-style 3x3 CNN for 28-32 px images (the Fashion-MNIST default).

    It has no stem to adapt: ``small_input`` is accepted for a uniform builder signature."""
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  channels=list(channels), strides=list(strides), dropout=dropout,
                  pool_size=pool_size, input_averaging=input_averaging)  # fmt: skip
    model = ConvNet(num_classes, in_channels, channels, strides, 1.0, dropout, pool_size)
    return _finish("us_convnet", model, width_range, kwargs,
                   _input_size("us_convnet", in_channels, small_input),
                   input_averaging=input_averaging)  # fmt: skip


# --- vision transformers -------------------------------------------------------------------------
# (hidden_dim, num_heads, mlp_dim, num_layers): timm's vit_tiny / vit_small (head dimension 64).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 3, 768, 12),
    "small": (384, 6, 1536, 12),
}


def _us_vit(name: str, size: str | None, num_classes: int, in_channels: int, width_range,
            small_input: bool, image_size: int | None, patch_size: int | None,
            dims: dict[str, int | None], dropout: float, attention_dropout: float) -> nn.Module:  # fmt: skip
    hidden, heads, mlp, layers = VIT_SIZES[size] if size else (None, None, None, None)
    hidden, heads = dims.get("hidden_dim") or hidden, dims.get("num_heads") or heads
    mlp, layers = dims.get("mlp_dim") or mlp, dims.get("num_layers") or layers
    if None in (hidden, heads, mlp, layers):
        raise UsnetValueError(f"{name} needs hidden_dim, num_heads, mlp_dim and num_layers")
    image_size = image_size or (32 if small_input else 224)
    patch_size = patch_size or (4 if small_input else 16)
    if image_size % patch_size or hidden % heads:
        raise UsnetValueError(
            f"{name}: image_size {image_size} must be a multiple of patch_size {patch_size} and "
            f"hidden_dim {hidden} of num_heads {heads}"
        )
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  image_size=image_size, patch_size=patch_size, hidden_dim=hidden,
                  num_heads=heads, mlp_dim=mlp, num_layers=layers, dropout=dropout,
                  attention_dropout=attention_dropout)  # fmt: skip
    if name != "us_vit":  # the presets record only what was asked of them
        for key in ("hidden_dim", "num_heads", "mlp_dim", "num_layers"):
            if dims.get(key) is None:
                kwargs.pop(key)
    model = torchvision.models.VisionTransformer(
        image_size, patch_size, layers, heads, hidden, mlp, dropout, attention_dropout,
        num_classes,
    )  # fmt: skip
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden, patch_size, patch_size)
        fan_in = in_channels * patch_size * patch_size  # torchvision's initialization of it
        nn.init.trunc_normal_(model.conv_proj.weight, std=(1 / fan_in) ** 0.5)
        nn.init.zeros_(model.conv_proj.bias)
    return _finish(name, model, width_range, kwargs, (1, in_channels, image_size, image_size))


@register_model((0.25, 1.0))
def us_vit(num_classes: int = 1000, in_channels: int = 3,
           width_range: tuple[float, float] = (0.25, 1.0), small_input: bool = False,
           image_size: int | None = None, patch_size: int | None = None,
           hidden_dim: int = 192, num_heads: int = 3, mlp_dim: int = 768, num_layers: int = 12,
           dropout: float = 0.0, attention_dropout: float = 0.0) -> nn.Module:  # fmt: skip
    """A universally slimmable torchvision ``VisionTransformer`` of any size.

    One width scales the embedding in whole heads (``nn.MultiheadAttention`` ties the embedding
    to heads x head dimension, so the head dimension ``hidden_dim / num_heads`` stays fixed and
    the embedding's divisor is a multiple of it) and each block's MLP (divisor 8). The class
    token, position embedding and every LayerNorm follow the embedding. ``small_input``: patch 4
    on 32 px images (``image_size=28`` for Fashion-MNIST). At width w the export is a torchvision
    ``VisionTransformer`` with ``hidden_dim``, ``num_heads`` and ``mlp_dim`` of that width."""
    return _us_vit("us_vit", None, num_classes, in_channels, width_range, small_input,
                   image_size, patch_size, dict(hidden_dim=hidden_dim, num_heads=num_heads,
                                                mlp_dim=mlp_dim, num_layers=num_layers),
                   dropout, attention_dropout)  # fmt: skip


@register_model((0.25, 1.0))
def us_vit_tiny(num_classes: int = 1000, in_channels: int = 3,
                width_range: tuple[float, float] = (0.25, 1.0), small_input: bool = False,
                image_size: int | None = None, patch_size: int | None = None,
                num_layers: int | None = None, dropout: float = 0.0,
                attention_dropout: float = 0.0) -> nn.Module:  # fmt: skip
    """US-ViT-Tiny: 192 channels, 3 heads of 64, MLP 768, 12 blocks (timm's vit_tiny; 1.26G
    MACs on 224 px at width 1.0). Whole heads make its embedding 64, 128 or 192 channels."""
    return _us_vit("us_vit_tiny", "tiny", num_classes, in_channels, width_range, small_input,
                   image_size, patch_size, dict(num_layers=num_layers), dropout,
                   attention_dropout)  # fmt: skip


@register_model((0.25, 1.0))
def us_vit_small(num_classes: int = 1000, in_channels: int = 3,
                 width_range: tuple[float, float] = (0.25, 1.0), small_input: bool = False,
                 image_size: int | None = None, patch_size: int | None = None,
                 num_layers: int | None = None, dropout: float = 0.0,
                 attention_dropout: float = 0.0) -> nn.Module:  # fmt: skip
    """US-ViT-Small: 384 channels, 6 heads of 64, MLP 1536, 12 blocks (timm's vit_small; 4.6G
    MACs on 224 px at width 1.0)."""
    return _us_vit("us_vit_small", "small", num_classes, in_channels, width_range, small_input,
                   image_size, patch_size, dict(num_layers=num_layers), dropout,
                   attention_dropout)  # fmt: skip
