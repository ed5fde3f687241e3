"""Descriptive size attributes of known model classes, kept at the active width.

Some modules record their sizes in integer attributes that their forward code never reads
(torchvision's ``VisionTransformer.mlp_dim``, ``EncoderBlock.num_heads``; timm's ``embed_dim`` and
``num_features``, which its ``reset_classifier`` builds a new head from). Sizes the forward code
reads are found by the converter (:class:`usnet.state.ShapeAttribute`); these are not in the
graph, so each class says how to compute them from its slimmable layers:
:func:`register_size_attributes`. ``set_width`` applies them after every layer has its active
channels, so the slimmable model and every export describe the width they run at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from .base import lookup_by_class

SizeAttributes = Callable[[nn.Module], dict[str, int]]

SIZE_ATTRIBUTES: dict[type, SizeAttributes] = {}
"""Registry: module class (exact type, or a generated subclass of it) -> ``fn(module)``, the
values of its size attributes at the width its layers are set to."""


def register_size_attributes(module_type: type, sizes: SizeAttributes | None = None) -> Any:
    """Keep ``module_type``'s descriptive size attributes at the active width: ``sizes(module)``
    returns ``{attribute: value}`` read from its (already updated) layers. Returns ``sizes``;
    without it, a decorator of ``sizes``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_size_attributes: {module_type!r} is not an nn.Module class")
    if sizes is None:
        return lambda fn: register_size_attributes(module_type, fn)
    SIZE_ATTRIBUTES[module_type] = sizes
    return sizes


def size_attributes_of(module: nn.Module) -> SizeAttributes | None:
    """The rule of ``module``'s class (or of the class a generated slimmable subclass wraps)."""
    return lookup_by_class(SIZE_ATTRIBUTES, type(module))


def _features(layer: nn.Module, attr: str, active: str) -> int:
    return int(getattr(layer, active, getattr(layer, attr)))


@register_size_attributes(VisionTransformer)
def _torchvision_vit(model: nn.Module) -> dict[str, int]:
    # mlp_dim: one value when every block has the same MLP (a uniform width); with per-block
    # widths, the largest (the layers hold each block's own).
    sizes = [_features(block.mlp[0], "out_features", "active_out_features")
             for block in model.encoder.layers]  # fmt: skip
    return {"mlp_dim": max(sizes)} if sizes else {}


@register_size_attributes(EncoderBlock)
def _torchvision_encoder_block(block: nn.Module) -> dict[str, int]:
    attention = block.self_attention
    return {"num_heads": int(getattr(attention, "active_heads", attention.num_heads))}
