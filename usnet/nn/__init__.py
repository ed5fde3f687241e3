"""Slimmable layers: one file per family, each class registered where it is defined.

Importing this package registers every built-in layer type (``SLIMMABLE_LAYERS``)."""

from .activation import SlimmablePReLU
from .attention import SlimmableMultiheadAttention
from .base import (
    SLIMMABLE_LAYERS,
    ActiveChannels,
    ChannelLayout,
    ChannelTensor,
    SlimmableLayer,
    is_slimmable_layer,
    lookup_by_class,
    make_slimmable_,
    register_slimmable,
    slimmable_class_of,
    take,
)
from .conv import SlimmableConv1d, SlimmableConv2d, SlimmableConvTranspose2d
from .linear import SlimmableLinear
from .norm import (
    SlimmableBatchNorm1d,
    SlimmableBatchNorm2d,
    SlimmableFrozenBatchNorm2d,
    SlimmableGroupNorm,
    SlimmableInstanceNorm2d,
    SlimmableLayerNorm,
    SlimmableLayerNorm2d,
)

__all__ = [
    "SLIMMABLE_LAYERS",
    "ActiveChannels",
    "ChannelLayout",
    "ChannelTensor",
    "SlimmableBatchNorm1d",
    "SlimmableBatchNorm2d",
    "SlimmableConv1d",
    "SlimmableConv2d",
    "SlimmableConvTranspose2d",
    "SlimmableFrozenBatchNorm2d",
    "SlimmableGroupNorm",
    "SlimmableInstanceNorm2d",
    "SlimmableLayer",
    "SlimmableLayerNorm",
    "SlimmableLayerNorm2d",
    "SlimmableLinear",
    "SlimmableMultiheadAttention",
    "SlimmablePReLU",
    "is_slimmable_layer",
    "lookup_by_class",
    "make_slimmable_",
    "register_slimmable",
    "slimmable_class_of",
    "take",
]
