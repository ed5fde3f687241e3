"""Handlers of layers: convolutions, linear layers, norms, PReLU, ``nn.MultiheadAttention``, and
the default handlers of a registered slimmable layer's ``channel_role``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from ..nodes import first_arg, node_arg
from ..registry import ROLE_HANDLERS, ChannelDim, handles, pass_through

if TYPE_CHECKING:
    from ..graph import GraphAnalysis


@handles(nn.Conv2d, nn.Conv1d)
def _conv(a: "GraphAnalysis", node: fx.Node, conv: nn.Conv2d) -> ChannelDim:
    dim = a.single_input(node)
    a.check_size(node, dim, conv.in_channels)
    if dim.axis != 1 or any(f != 1 for _, f in dim.segments):
        a.refuse(node, "convolution on flattened features")
    name = node.target
    several = len(dim.segments) > 1
    if conv.groups > 1 and conv.groups == conv.in_channels:
        multiplier = conv.out_channels // conv.in_channels
        if multiplier == 1:
            out = dim
        elif several:
            a.refuse(node, "depthwise conv with a channel multiplier on a concatenation")
        else:
            parent = dim.segments[0][0]
            out = a.new_group(name, conv.out_channels, parent=parent, ratio=float(multiplier))
    elif name in a.ratio_ties:
        if several:
            a.refuse(node, "a ratio tie to a concatenation of several channel groups")
        out = a.new_group(name, conv.out_channels, parent=dim.segments[0][0],
                          ratio=conv.out_channels / conv.in_channels)  # fmt: skip
    else:
        out = a.new_group(name, conv.out_channels)
        if conv.groups > 1:
            if several:
                a.refuse(node, f"grouped conv ({conv.groups} groups) on a concatenation")
            root = a.elements[a.find(dim.segments[0][0])]
            root.divisor = math.lcm(root.divisor, conv.groups)
            a.elements[out.segments[0][0]].divisor = math.lcm(a.divisor, conv.groups)
    a.bind(node, dim, out)
    return out


@handles(nn.Linear)
def _linear(a: "GraphAnalysis", node: fx.Node, linear: nn.Linear) -> ChannelDim:
    dim = a.single_input(node, axis=-1)
    shape = a.shape(first_arg(node))
    rank = len(shape) if shape is not None else 2
    if dim.axis != rank - 1:
        a.refuse(node, f"Linear on a {rank}-d input whose last dimension is not its channels")
    a.check_size(node, dim, linear.in_features)
    name = node.target
    if name in a.ratio_ties:
        if len(dim.segments) > 1:
            a.refuse(node, "a ratio tie to a concatenation of several channel groups")
        # The ratio follows the input *group* (a flattened input is H*W times its channels).
        element = dim.segments[0][0]
        ratio = linear.out_features / a.elements[a.find(element)].size
        out = a.new_group(name, linear.out_features, parent=element, ratio=ratio, axis=dim.axis)
    else:
        out = a.new_group(name, linear.out_features, axis=dim.axis)
    a.bind(node, dim, out)
    return out


@handles(nn.BatchNorm2d)
def features_layer(a: "GraphAnalysis", node: fx.Node, module: nn.Module) -> ChannelDim:
    """A layer acting on each channel at dimension 1 (norms): its features are its input's."""
    dim = a.single_input(node)
    size = a.size(dim)
    expected = _features_of(module, size)
    a.check_size(node, dim, expected)
    flattened = any(f != 1 for _, f in dim.segments)
    if dim.axis != 1 or (flattened and not isinstance(module, nn.BatchNorm1d)):
        a.refuse(node, f"{type(module).__name__} on flattened features")
    a.bind(node, None, dim)
    return dim


@handles(nn.GroupNorm)
def group_norm(a: "GraphAnalysis", node: fx.Node, norm: nn.GroupNorm) -> ChannelDim:
    """GroupNorm keeps its group size: every segment is whole groups, and the group size divides
    its active channels (a plan divisor)."""
    dim = features_layer(a, node, norm)
    size = norm.num_channels // norm.num_groups
    for e, _ in dim.segments:
        root = a.elements[a.find(e)]
        if root.size % size:
            a.refuse(node, f"a segment of {root.size} channels is not whole groups of {size}")
        root.divisor = math.lcm(root.divisor, size)
    return dim


@handles(nn.InstanceNorm2d)
def instance_norm(a: "GraphAnalysis", node: fx.Node, norm: nn.InstanceNorm2d) -> Any:
    if norm.track_running_stats:
        a.refuse(node, "InstanceNorm2d with running statistics is not slimmable")
    return features_layer(a, node, norm) if norm.affine else pass_through(a, node)


@handles(nn.PReLU)
def prelu(a: "GraphAnalysis", node: fx.Node, act: nn.PReLU) -> Any:
    return features_layer(a, node, act) if act.num_parameters > 1 else pass_through(a, node)


@handles(nn.ConvTranspose2d)
def conv_transpose(a: "GraphAnalysis", node: fx.Node, conv: nn.ConvTranspose2d) -> ChannelDim:
    dim = a.single_input(node)
    a.check_size(node, dim, conv.in_channels)
    if dim.axis != 1 or any(f != 1 for _, f in dim.segments):
        a.refuse(node, "transposed convolution on flattened features")
    if conv.groups != 1:
        a.refuse(node, f"grouped transposed convolution ({conv.groups} groups)")
    out = a.new_group(node.target, conv.out_channels)
    a.bind(node, dim, out)
    return out


def _features_of(module: nn.Module, default: int) -> int:
    for attr in ("num_features", "num_channels", "num_parameters"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    return shape[0] if shape is not None and len(shape) == 1 else default


@handles(nn.LayerNorm)
def layer_norm(a: "GraphAnalysis", node: fx.Node, norm: nn.LayerNorm) -> ChannelDim | None:
    """``nn.LayerNorm(C)`` over the channels, which must be the last dimension."""
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    shape = a.shape(first_arg(node))
    if dim.axis < len(shape) - len(norm.normalized_shape):
        return dim  # over fixed features (per-head q/k norm): channels elsewhere pass through
    if len(norm.normalized_shape) != 1 or dim.axis != len(shape) - 1:
        a.refuse(
            node,
            f"LayerNorm over {tuple(norm.normalized_shape)} mixes the channels with other "
            "dimensions; only a LayerNorm over the channels (last) is slimmable",
        )
    a.check_size(node, dim, norm.normalized_shape[0])
    if any(f != 1 for _, f in dim.segments):
        a.refuse(node, "LayerNorm on flattened features")
    a.bind(node, None, dim)
    return dim


def transform_layer(a: "GraphAnalysis", node: fx.Node, module: nn.Module) -> ChannelDim:
    """A registered layer mapping the channels at dimension 1 to a channel group of its own."""
    dim = a.single_input(node)
    if dim.axis != 1 or len(dim.segments) > 1:
        a.refuse(node, f"{type(module).__name__} expects one channel group at dimension 1")
    shape = a.shape(node)
    if shape is None or len(shape) < 2:
        a.refuse(node, "no output shape")
    out = a.new_group(node.target, shape[1])
    a.bind(node, dim, out)
    return out


@handles(nn.MultiheadAttention)
def multihead_attention(a: "GraphAnalysis", node: fx.Node,
                        mha: nn.MultiheadAttention) -> tuple:  # fmt: skip
    """``nn.MultiheadAttention``: query, key and value share its embedding channels (last), the
    output has them too, and they slim in whole heads (divisor a multiple of ``head_dim``)."""
    if not mha._qkv_same_embed_dim:
        a.refuse(node, "attention with keys or values of another size than the embedding")
    dims = [a.value(node_arg(node, i, n)) for i, n in enumerate(("query", "key", "value"))]
    if not all(isinstance(d, ChannelDim) for d in dims):
        a.refuse(node, "attention whose query, key or value carries no known channels")
    query = dims[0]
    if query.axis != len(a.shape(first_arg(node))) - 1 or any(f != 1 for _, f in query.segments):
        a.refuse(node, "attention whose embedding is not the last dimension")
    a.check_size(node, query, mha.embed_dim)
    for d in dims[1:]:
        a.tie(query, d, node)
    for e, _ in a.expand(query).segments:
        root = a.elements[a.find(e)]
        if root.size % mha.head_dim:
            a.refuse(
                node, f"a segment of {root.size} channels is not whole heads of {mha.head_dim}"
            )
        root.divisor = math.lcm(root.divisor, mha.head_dim)
    a.bind(node, query, query)
    return (query, None)  # (output, attention weights: no channels)


ROLE_HANDLERS.update(transform=transform_layer, features=features_layer)
