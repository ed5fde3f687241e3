"""Slimmable counterparts of timm's own layer classes, registered when a timm model is converted.

timm subclasses ``nn.LayerNorm`` (its ``forward`` calls ``F.layer_norm`` on the parameters, which
the converter cannot slice); the registry is by exact type, so each such class gets a slimmable
subclass here. This module imports timm: :func:`usnet.convert.analyze` imports it only once the
user's code has imported timm, and pickled models find the classes here by name.
"""

from __future__ import annotations

from timm.layers import LayerNorm as _TimmLayerNorm

from .convert import layer_norm, register_op
from .layers import SlimmableLayerNorm, register_slimmable


class SlimmableTimmLayerNorm(SlimmableLayerNorm, _TimmLayerNorm):
    """timm's ``LayerNorm`` (channels last) over its active channels."""


register_slimmable(_TimmLayerNorm, SlimmableTimmLayerNorm)
register_op(_TimmLayerNorm, layer_norm)  # over the last dimension, as nn.LayerNorm
