"""ATen operations, for graphs from the torch.export fallback (:mod:`usnet.convert.trace`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ..nodes import first_arg, node_arg
from ..registry import ChannelDim, no_channels, pass_through, register_op
from .elementwise import binary, pad, reduce
from .functional import refuse_functional
from .shape import (
    CHUNKS,
    concatenate,
    flatten,
    permute,
    reshape,
    split,
    squeeze,
    transpose,
    unsqueeze,
)

if TYPE_CHECKING:
    from ..graph import GraphAnalysis


# ATen operations, for graphs from the torch.export fallback (usnet.convert.trace).
def _register_aten() -> None:
    aten = torch.ops.aten

    def overloads(name: str) -> list[Any]:
        packet = getattr(aten, name, None)
        return [] if packet is None else [getattr(packet, o) for o in packet.overloads()]

    table = {
        pass_through: (
            "relu",
            "relu_",
            "relu6",
            "gelu",
            "silu",
            "silu_",
            "sigmoid",
            "tanh",
            "hardswish",
            "hardswish_",
            "hardsigmoid",
            "hardtanh",
            "hardtanh_",
            "leaky_relu",
            "elu",
            "mish",
            "dropout",
            "feature_dropout",
            "max_pool2d",
            "avg_pool2d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool1d",
            "clone",
            "contiguous",
            "to",
            "_to_copy",
            "alias",
            "detach",
            "clamp",
            "upsample_bilinear2d",
            "upsample_nearest2d",
            "softmax",
            "log_softmax",
            "_softmax",
            "_log_softmax",
            "dropout_",
            "type_as",
        ),
        binary: ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"),
        concatenate: ("cat", "concat"),
        flatten: ("flatten",),
        reduce: ("mean", "sum", "amax"),
        split: ("split", "split_with_sizes", "chunk"),
        permute: ("permute",),
        transpose: ("transpose",),
        unsqueeze: ("unsqueeze",),
        squeeze: ("squeeze",),
        pad: ("pad", "constant_pad_nd"),
        no_channels: ("sym_size", "_assert_scalar", "_assert_tensor_metadata", "sym_numel"),
        reshape: ("view", "reshape", "_unsafe_view"),
        refuse_functional: (
            "conv2d",
            "conv1d",
            "linear",
            "batch_norm",
            "layer_norm",
            "group_norm",
        ),
        _aten_slice: ("slice",),
    }
    for handler, names in table.items():
        for name in names:
            for op in overloads(name):
                register_op(op, handler)
    for op in overloads("chunk"):
        CHUNKS.add(op)


def _aten_slice(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``aten.slice(x, dim, start, end)``: a crop of another dimension keeps the channels."""
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    shape = a.shape(first_arg(node))
    along = node_arg(node, 1, "dim", 0) % len(shape)
    start, end = node_arg(node, 2, "start", None), node_arg(node, 3, "end", None)
    whole = (
        start in (None, 0)
        and (end is None or end >= shape[along])
        and node_arg(node, 4, "step", 1) == 1
    )
    if along == dim.axis and not whole:
        a.refuse(node, "indexing a tensor that carries channels")
    return dim


_register_aten()
