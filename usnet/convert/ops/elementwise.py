"""Handlers of elementwise ops: activations, pooling, dropout, casts (channels pass through),
binary ops (tie their operands), reductions over other dimensions, spatial padding.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...nn.params import is_tensor_attr
from ..nodes import first_arg, node_arg
from ..registry import ChannelDim, handles, no_channels, pass_through, register_op

if TYPE_CHECKING:
    from ..graph import GraphAnalysis


def binary(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """Elementwise ops tie their operands' channels; an operand broadcast along channels (size 1
    there, or missing) ties nothing."""
    out_shape = a.shape(node)
    operands = [x for x in (*node.args[:2], *node.kwargs.values()) if isinstance(x, fx.Node)]
    dims = [(x, a.value(x)) for x in operands]
    first = next((d for _, d in dims if isinstance(d, ChannelDim)), None)
    if first is None or out_shape is None:
        for x, d in dims:
            if d is not None and not isinstance(d, ChannelDim):
                a.refuse(node, "elementwise op on a tuple of tensors")
        return None
    rank = len(out_shape)
    out_axis = first.axis + (rank - len(a.shape(next(x for x, d in dims if d is first))))
    out_channels = out_shape[out_axis]
    tied: list[ChannelDim] = []
    params: list[tuple[fx.Node, int]] = []
    for x, d in dims:
        shape = a.shape(x)
        if shape is None:
            continue
        axis = out_axis - (rank - len(shape))
        if axis < 0 or (shape[axis] == 1 and out_channels != 1):
            continue  # broadcast along channels (e.g. a spatial attention map) ties nothing
        if isinstance(d, ChannelDim) and d.axis != axis:
            a.refuse(node, "operands with their channels at different dimensions")
        if not isinstance(d, ChannelDim):
            if shape[axis] == 1:
                continue  # a one-channel constant on a one-channel tensor
            if x.op == "get_attr" and is_tensor_attr(a.gm, x.target):
                params.append((x, axis))  # a parameter along channels: it follows them
                continue
            a.refuse(node, f"operand {x.name!r} has {shape[axis]} channels from a constant")
        tied.append(d)
    for x, axis in params:
        a.bind_parameter(node, x.target, axis, first)
    for other in tied[1:]:
        a.tie(tied[0], other, node)
    a.check_size(node, first, out_channels)
    return first.moved(out_axis)


@handles(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")
def reduce(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    dims = node_arg(node, 1, "dim")
    keepdim = bool(node_arg(node, 2, "keepdim", False))
    rank = len(a.shape(first_arg(node)) or ())
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    dims = tuple(d % rank for d in dims)
    if not dims or dim.axis in dims:
        a.refuse(node, "reduction over the channel dimension")
    return dim if keepdim else dim.moved(dim.axis - sum(d < dim.axis for d in dims))


@handles(F.pad)
def pad(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """Padding the trailing (spatial) dimensions keeps the channels."""
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    widths = node_arg(node, 1, "pad", ())
    rank = len(a.shape(first_arg(node)))
    if dim.axis >= rank - len(widths) // 2:
        a.refuse(node, "padding of the channel dimension")
    return dim


PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.Softmax, nn.LogSoftmax, nn.Softmax2d,  # over the active channels, like a narrower model
)  # fmt: skip

PASS_THROUGH_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.clone, F.interpolate, F.upsample, F.upsample_bilinear,
    F.upsample_nearest, torch.clamp, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
}  # fmt: skip

PASS_THROUGH_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "clone",
    "float", "half", "double", "bfloat16", "to", "type", "type_as", "detach", "softmax",
    "log_softmax",
}  # fmt: skip

BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
    operator.truediv, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
}  # fmt: skip

BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}

for _module in PASS_THROUGH_MODULES:
    register_op(_module, pass_through)

for _function in PASS_THROUGH_FUNCTIONS:
    register_op(_function, pass_through)

for _method in PASS_THROUGH_METHODS:
    register_op(_method, pass_through)

for _function in BINARY_FUNCTIONS:
    register_op(_function, binary)

for _method in BINARY_METHODS:
    register_op(_method, binary)


register_op(torch._assert, no_channels)

for _query in ("size", "dim"):
    register_op(_query, no_channels)
