"""Slimmable counterparts of timm's own layer classes, registered when a timm model is converted.

timm subclasses ``nn.LayerNorm`` (its ``forward`` calls ``F.layer_norm`` on the parameters, which
the converter cannot slice); the registry is by exact type, so each such class gets a slimmable
subclass here. This module imports timm: :func:`usnet.convert.analyze` loads it only once the
user's code has imported timm (:mod:`usnet.plugins`), and pickled models find the classes here by
name.
"""

from __future__ import annotations

from timm.layers import LayerNorm as _TimmLayerNorm
from timm.models.vision_transformer import VisionTransformer as _TimmVisionTransformer

from ..convert import layer_norm, register_op
from ..nn import SlimmableLayerNorm, register_slimmable
from ..nn.attributes import register_size_attributes


class SlimmableTimmLayerNorm(SlimmableLayerNorm, _TimmLayerNorm):
    """timm's ``LayerNorm`` (channels last) over its active channels."""


register_slimmable(_TimmLayerNorm, SlimmableTimmLayerNorm)
register_op(_TimmLayerNorm, layer_norm)  # over the last dimension, as nn.LayerNorm


def _vision_transformer_sizes(model: _TimmVisionTransformer) -> dict[str, int]:
    """``embed_dim``, ``num_features``, ``head_hidden_size``: the active embedding (the final
    norm's features; ``reset_classifier`` builds a new head of that size)."""
    tokens = model.__dict__.get("usnet_active")  # the class token / position embedding's
    size = tokens.count if tokens is not None else getattr(model.norm, "active_features", None)
    if size is None:
        return {}  # neither is slimmable: the embedding does not slim
    return {"embed_dim": size, "num_features": size, "head_hidden_size": size}


register_size_attributes(_TimmVisionTransformer, _vision_transformer_sizes)
