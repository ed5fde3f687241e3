"""Automatic conversion of an ordinary PyTorch model into a slimmable one.

Graph analysis is separate from mechanics: :func:`analyze` traces the model with ``torch.fx``,
propagates example shapes, and derives which channel dimensions are tied (a union-find over channel
dimensions). :func:`slimmable` then swaps the layers in place (keeping their parameter objects) and
attaches the plan. Whatever the analysis does not understand is refused with a
:class:`ConversionError` naming the module and the operation: a wrong plan would fail silently.

The analysis is a walk over the graph with a union-find over channel dimensions; what each op
does to channels is a handler in a table keyed by module type, function or method name
(:func:`register_op`; layers registered with :func:`usnet.register_slimmable` get the handler of
their ``channel_role``). A traced tensor's channels are a :class:`ChannelDim`: the tensor
dimension holding them and an ordered list of segments, each active on a prefix of its own.
The built-in handlers:

* image inputs and model outputs (tensors, tuples, lists, dicts) are fixed (never slimmed);
* ``Conv2d`` creates a new group for its outputs; a depthwise conv ties its output to its input
  (a channel multiplier m makes the output a derived group, m times the input); a grouped conv
  raises both sides' divisors to a multiple of its group count;
* ``Linear`` consumes features on the last dimension and creates a new group for its outputs;
* ``BatchNorm2d`` (a "features" layer), activations, pooling, dropout, stochastic depth,
  casts, ``contiguous``, spatial padding and ``interpolate``/``Upsample`` pass channels through;
  shape queries (``x.shape``, ``x.size(1)``, ``x.ndim``) and ``torch._assert`` carry none;
* elementwise binary ops tie the channels of their operands; an operand broadcast along
  channels (size 1) ties nothing;
* ``torch.cat`` along channels concatenates its inputs' segments (a layer consuming several
  segments takes its weight columns by an index cached per configuration); along another
  dimension it ties its inputs; ``chunk`` of a concatenation back into pieces of the same groups
  gives the pieces; cutting inside a group is refused (the active tensor would be cut elsewhere);
* ``flatten`` turns ``(N, C, H, W)`` into features that are ``H*W`` times the channels
  (channel-major, so a prefix of channels is a prefix of features); ``permute``, ``transpose``,
  ``squeeze``/``unsqueeze`` and reductions over other dimensions move the channel dimension;
* ``ratio_ties`` name layers whose outputs follow their inputs at a fixed ratio (an inverted
  residual's expansion layer is ``t`` times its block's input).

Refused: reshapes other than flatten (channel shuffle), channel indexing, functional layers on
parameters, constants with as many channels as a slimmable tensor, and any module type that sees
channels and has neither a slimmable counterpart nor a handler.
"""

from __future__ import annotations

import importlib
import math
import operator
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .channels import ChannelGroup, ChannelPlan
from .errors import UsnetTypeError, UsnetValueError
from .layers import SLIMMABLE_LAYERS, SlimmableLayer, make_slimmable_
from .params import is_tensor_attr, slice_parameters_
from .state import (
    STATE_ATTR,
    Binding,
    ShapeAttribute,
    SlimmableState,
    is_slimmable,
    set_width,
)
from .tracing import export_graph


class ConversionError(UsnetValueError):
    """The model cannot be converted; the message names the module and the operation."""


# --- channel dimensions during analysis ----------------------------------------------------------
@dataclass(frozen=True)
class ChannelDim:
    """Where a traced tensor's slimmable channels are: tensor dimension ``axis`` holds the
    ordered ``segments``, each ``(element, factor)``: ``factor`` entries per channel of one
    union-find element (``factor`` > 1 after flattening spatial dims into features). One segment
    is the usual case; a concatenation along channels has one per input, each active on a
    prefix of its own."""

    segments: tuple[tuple[int, int], ...]
    axis: int = 1

    def moved(self, axis: int) -> "ChannelDim":
        return ChannelDim(self.segments, axis)


OpHandler = Callable[["GraphAnalysis", fx.Node, Any], Any]
"""``handler(analysis, node, module)`` -> the :class:`ChannelDim` of the node's output (None: no
slimmable channels; a tuple/list of them for ops returning several tensors). ``module`` is the
called module for ``call_module`` nodes, else None. It ties channels with
``analysis.tie``, creates groups with ``analysis.new_group``, binds slimmable layers with
``analysis.bind`` and refuses with ``analysis.refuse``."""

MODULE_OPS: dict[type[nn.Module], OpHandler] = {}
FUNCTION_OPS: dict[Any, OpHandler] = {}
METHOD_OPS: dict[str, OpHandler] = {}


def register_op(target: type[nn.Module] | Callable | str, handler: OpHandler) -> OpHandler:
    """Teach the converter an operation: ``target`` is a module class (its instances are traced
    as leaves and handled as a whole), a function (``torch.cat``, ``F.pad``, ...) or a tensor
    method name (``"permute"``). ``handler`` follows :data:`OpHandler`; the built-in ones
    (:func:`pass_through`, :func:`no_channels`, ...) cover most needs. Returns ``handler``."""
    if not callable(handler):
        raise TypeError(f"register_op: handler {handler!r} is not callable")
    if isinstance(target, str):
        METHOD_OPS[target] = handler
    elif isinstance(target, type) and issubclass(target, nn.Module):
        MODULE_OPS[target] = handler
    elif callable(target):
        FUNCTION_OPS[target] = handler
    else:
        raise TypeError(
            f"register_op: target {target!r} must be an nn.Module class, a function or a method name"
        )
    return handler


# --- built-in handlers ---------------------------------------------------------------------------
def _first_arg(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def pass_through(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    """The output has the channels of the first argument (activations, pooling, casts, ...)."""
    return a.value(_first_arg(node))


def no_channels(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    """The result carries no channels (shape queries, assertions)."""
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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


def _linear(a: "GraphAnalysis", node: fx.Node, linear: nn.Linear) -> ChannelDim:
    dim = a.single_input(node, axis=-1)
    shape = a.shape(_first_arg(node))
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


def instance_norm(a: "GraphAnalysis", node: fx.Node, norm: nn.InstanceNorm2d) -> Any:
    if norm.track_running_stats:
        a.refuse(node, "InstanceNorm2d with running statistics is not slimmable")
    return features_layer(a, node, norm) if norm.affine else pass_through(a, node)


def prelu(a: "GraphAnalysis", node: fx.Node, act: nn.PReLU) -> Any:
    return features_layer(a, node, act) if act.num_parameters > 1 else pass_through(a, node)


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


def layer_norm(a: "GraphAnalysis", node: fx.Node, norm: nn.LayerNorm) -> ChannelDim | None:
    """``nn.LayerNorm(C)`` over the channels, which must be the last dimension."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    shape = a.shape(_first_arg(node))
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


def multihead_attention(a: "GraphAnalysis", node: fx.Node,
                        mha: nn.MultiheadAttention) -> tuple:  # fmt: skip
    """``nn.MultiheadAttention``: query, key and value share its embedding channels (last), the
    output has them too, and they slim in whole heads (divisor a multiple of ``head_dim``)."""
    if not mha._qkv_same_embed_dim:
        a.refuse(node, "attention with keys or values of another size than the embedding")
    dims = [a.value(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value"))]
    if not all(isinstance(d, ChannelDim) for d in dims):
        a.refuse(node, "attention whose query, key or value carries no known channels")
    query = dims[0]
    if query.axis != len(a.shape(_first_arg(node))) - 1 or any(f != 1 for _, f in query.segments):
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


_ROLE_HANDLERS = {"transform": transform_layer, "features": features_layer}


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


def flatten(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``flatten(start, end)`` over the channel dimension and the ones after it: each channel
    becomes ``prod(sizes after it)`` features, channel-major, so a prefix stays a prefix."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    shape = a.shape(_first_arg(node))
    if shape is None:
        a.refuse(node, "no shape information")
    if isinstance(module, nn.Flatten):
        start, end = module.start_dim, module.end_dim
    else:
        start, end = _flatten_args(node)
    rank = len(shape)
    start, end = start % rank, end % rank
    if dim.axis < start:
        return dim
    if dim.axis > end:
        return dim.moved(dim.axis - (end - start))
    if dim.axis != start:
        a.refuse(node, "flatten that merges the channels into a preceding dimension")
    spatial = math.prod(shape[dim.axis + 1 : end + 1])
    return ChannelDim(tuple((e, f * spatial) for e, f in dim.segments), start)


def reduce(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    dims = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    rank = len(a.shape(_first_arg(node)) or ())
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    dims = tuple(d % rank for d in dims)
    if not dims or dim.axis in dims:
        a.refuse(node, "reduction over the channel dimension")
    return dim if keepdim else dim.moved(dim.axis - sum(d < dim.axis for d in dims))


def concatenate(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``torch.cat`` along channels: the output's segments are its inputs', in order (each input
    stays active on its own prefix); along any other dimension: the inputs' channels are tied."""
    tensors = list(_arg(node, 0, "tensors"))
    values = [a.value(t) for t in tensors]
    if not any(isinstance(v, ChannelDim) for v in values):
        return None
    shape = a.shape(tensors[0])
    rank = len(shape) if shape is not None else 0
    along = int(_arg(node, 1, "dim", 0)) % max(rank, 1)
    axis = next(v.axis for v in values if isinstance(v, ChannelDim))
    if any(isinstance(v, ChannelDim) and v.axis != axis for v in values):
        a.refuse(node, "concatenation of tensors whose channels are at different dimensions")
    if along != axis:
        known = [v for v in values if isinstance(v, ChannelDim)]
        for other in known[1:]:
            a.tie(known[0], other, node)
        for t, v in zip(tensors, values):
            if isinstance(v, ChannelDim):
                continue
            source = _parameter_source(a, t)  # a class token: self.cls_token.expand(n, -1, -1)
            if source is None:
                a.refuse(node, "concatenation of slimmable channels with constant ones")
            target, rank = source
            a.bind_parameter(node, target, axis - (len(a.shape(t)) - rank), known[0])
        return known[0]
    segments: list[tuple[int, int]] = []
    for t, v in zip(tensors, values):
        if isinstance(v, ChannelDim):
            segments.extend(v.segments)
        else:  # a tensor without slimmable channels: a fixed segment of its own
            size = a.shape(t)[axis]
            segments.append(
                (a.new_group(f"{node.name}:{t.name}", size, fixed=True).segments[0][0], 1)
            )
    return ChannelDim(tuple(segments), axis)


def _parameter_source(a: "GraphAnalysis", arg: Any) -> tuple[str, int] | None:
    """``(target, rank)`` of the parameter ``arg`` is, or is an ``expand`` of."""
    while isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target in ("expand",
                                                                                 "expand_as"):  # fmt: skip
        arg = arg.args[0]
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and is_tensor_attr(a.gm, arg.target):
        return arg.target, len(a.shape(arg) or ())
    return None


def split(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    """``split``/``chunk`` along a non-channel dimension keep the channels; along channels they
    are exact only where the pieces are segments (splitting a concatenation back into its
    inputs). Splitting one channel group would cut the active tensor elsewhere than at full width."""
    dim = a.value(_first_arg(node))
    metas = node.meta.get("tensor_meta")
    if dim is None or not isinstance(metas, (list, tuple)):
        return None if dim is None else a.refuse(node, "no shape information")
    rank = len(a.shape(_first_arg(node)))
    along = _arg(node, 2, "dim", 0) % rank
    if along != dim.axis:
        return tuple(dim for _ in metas)
    sizes = [m.shape[along] for m in metas]
    if node.target in _CHUNKS and len(dim.segments) == 1 and len(sizes) > 1:
        # chunk(n) of one channel group (a CSP block's conv): the group becomes n equal
        # segments of one new group, each active on its own prefix, so the runtime chunk of the
        # active tensor cuts exactly between them.
        element, factor = dim.segments[0]
        if factor == 1 and len(set(sizes)) == 1 and a.size(dim) == sum(sizes):
            a.refine(element, len(sizes), node)
            dim = a.value(_first_arg(node))
    pieces, segments = [], list(dim.segments)
    for size in sizes:
        taken: list[tuple[int, int]] = []
        while segments and sum(a.elements[a.find(e)].size * f for e, f in taken) < size:
            taken.append(segments.pop(0))
        if sum(a.elements[a.find(e)].size * f for e, f in taken) != size:
            a.refuse(
                node,
                f"{node.target} of {a.size(dim)} channels into {sizes}: the pieces are not whole "
                "channel groups, so at a narrower width the active tensor would be cut in another "
                "place than at full width (mark the producing layers fixed with fixed_outputs, "
                "or register a handler with usnet.register_op)",
            )
        pieces.append(ChannelDim(tuple(taken), dim.axis))
    # The op runs on the active tensor with the arguments of the model's code: chunk(n) cuts it
    # into n equal pieces, which are the segments only if every piece is the same groups;
    # split(sizes) cuts at constant sizes, right only for channels that never slim.
    structure = [tuple((a.find(e), f) for e, f in p.segments) for p in pieces]
    if node.target in _CHUNKS:
        exact = all(s == structure[0] for s in structure)
    else:
        exact = all(a.elements[a.find(e)].fixed for e, _ in dim.segments)
    if not exact:
        a.refuse(
            node,
            f"{node.target if isinstance(node.target, str) else node.target.__name__} into {sizes} "
            "cuts at the same place at every width, which is not where these channel groups "
            "end at a narrower width (use torch.chunk into pieces of the same groups, mark the "
            "producing layers fixed with fixed_outputs, or register a handler with usnet.register_op)",
        )
    return tuple(pieces)


def getitem(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    source, index = node.args[0], node.args[1]
    value = a.value(source)
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and isinstance(index, int):
        return value[index]
    if isinstance(value, dict):
        return value.get(index)
    if isinstance(value, ChannelDim) and isinstance(index, tuple):
        # Slices and single positions of other dimensions keep the channels: crops
        # x[:, :, 1:-1], x[..., :h, :w]; a class token x[:, 0] (that dimension is dropped).
        rank = len(a.shape(source) or ())
        plain = (slice, int)
        if all(isinstance(i, plain) for i in index):
            entries = dict(enumerate(index))
        elif index and index[0] is Ellipsis and all(isinstance(i, plain) for i in index[1:]):
            entries = {rank - len(index) + 1 + k: i for k, i in enumerate(index[1:])}
        else:
            entries = None
        if entries is not None and entries.get(value.axis, slice(None)) == slice(None):
            dropped = sum(isinstance(i, int) for d, i in entries.items() if d < value.axis)
            return value.moved(value.axis - dropped)
    a.refuse(node, "indexing a tensor that carries channels")


def permute(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    order = node.args[1:] if node.op == "call_method" else (_arg(node, 1, "dims"),)
    if len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = tuple(order[0])
    rank = len(order)
    return dim.moved([d % rank for d in order].index(dim.axis))


def transpose(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    rank = len(a.shape(_first_arg(node)))
    d0, d1 = _arg(node, 1, "dim0") % rank, _arg(node, 2, "dim1") % rank
    return dim.moved(d1 if dim.axis == d0 else d0 if dim.axis == d1 else dim.axis)


def unsqueeze(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    d = _arg(node, 1, "dim") % (len(a.shape(_first_arg(node))) + 1)
    return dim.moved(dim.axis + 1) if d <= dim.axis else dim


def squeeze(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    shape = a.shape(_first_arg(node))
    d = _arg(node, 1, "dim")
    dims = (
        [i for i, s in enumerate(shape) if s == 1]
        if d is None
        else [
            x % len(shape)
            for x in ((d,) if isinstance(d, int) else d)
            if shape[x % len(shape)] == 1
        ]
    )
    if dim.axis in dims:
        a.refuse(node, "squeeze of the channel dimension")
    return dim.moved(dim.axis - sum(x < dim.axis for x in dims))


def pad(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """Padding the trailing (spatial) dimensions keeps the channels."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    widths = _arg(node, 1, "pad", ())
    rank = len(a.shape(_first_arg(node)))
    if dim.axis >= rank - len(widths) // 2:
        a.refuse(node, "padding of the channel dimension")
    return dim


def _make_tuple(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> tuple:
    return tuple(a.value(x) for x in (*node.args, *node.kwargs.values()))


def _builtin_getattr(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    if node.args[1] in ("T", "mT", "H", "mH", "real", "imag"):
        return a.refuse(node, f"tensor attribute .{node.args[1]} of channels")
    return None  # shape, ndim, dtype, device: queries


def _refuse_functional(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    if a.channel_inputs(node):
        a.refuse(node, "functional layer on parameters; use the nn.Module layer instead")


def _reshape_sizes(node: fx.Node) -> list[Any]:
    """The target sizes of a ``reshape``/``view`` node, as written in the code (ints or nodes)."""
    rest = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        rest = list(rest[0])
    return rest


def reshape(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``reshape``/``view`` of a tensor with channels. The dimensions before and after the
    channels may be merged or split freely; the channel dimension itself may

    * stay one dimension (``(N, C, H, W) -> (N, C, H*W)``),
    * be merged with the dimensions after it (each channel becomes that many features,
      channel-major, as ``flatten`` does: attention heads back into features), or
    * when channels are the last dimension (tokens), be split into ``(..., heads, head_dim)``:
      the **last** new dimension is per-head features and stays fixed, the one before it is the
      heads, which slim as a channel group of whole heads (divisor 1), and any before that are
      equal pieces (``3`` for q, k, v: the producing group is cut into that many segments).

    A size written as a constant where the channels are (``self.num_heads``, ``self.attn_dim``)
    must follow the width: :func:`analyze` finds the module attribute it was read from
    (:class:`~usnet.state.ShapeAttribute`), which ``set_width`` then keeps at the active count."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    before, after = a.shape(_first_arg(node)), a.shape(node)
    if before is None or after is None:
        a.refuse(node, "reshape without shape information")
    axis, size = dim.axis, before[dim.axis]
    lead = math.prod(before[:axis])
    starts = [j for j in range(len(after)) if math.prod(after[:j]) == lead]
    if not starts:
        a.refuse(
            node,
            f"merges the {size} channels with a preceding dimension of {tuple(before)} -> "
            f"{tuple(after)} (a channel shuffle, or channels moved into the batch): at a narrower "
            "width the groups would hold other channels; not supported",
        )
    j = max(starts)
    if after[j] == size:  # the channel dimension stays one dimension
        out = dim.moved(j)
    elif after[j] > size:  # merged with the dimensions after it: features, channel-major
        k = axis + 1
        while k < len(before) and math.prod(before[axis : k + 1]) < after[j]:
            k += 1
        if k >= len(before) or math.prod(before[axis : k + 1]) != after[j]:
            a.refuse(node, f"reshape {tuple(before)} -> {tuple(after)} cuts across the channels")
        per = math.prod(before[axis + 1 : k + 1])
        out = ChannelDim(tuple((e, f * per) for e, f in dim.segments), j)
    else:
        out = _split_heads(a, node, dim, before, after, j)
    sizes = _reshape_sizes(node)
    if len(sizes) == len(after):
        a.follow_size(node, out.axis, sizes[out.axis], out)
    return out


def _shape_source(size: Any) -> tuple[fx.Node, int] | None:
    """``(tensor, dim)`` when ``size`` is ``tensor.shape[dim]`` or ``tensor.size(dim)``."""
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        return size.args[0], int(size.args[1])
    if size.op == "call_function" and size.target is operator.getitem:
        shape, index = size.args
        if (isinstance(shape, fx.Node) and isinstance(index, int) and shape.op == "call_function"
                and shape.target is getattr and shape.args[1] == "shape"):  # fmt: skip
            return shape.args[0], index
    return None


def _split_heads(a: "GraphAnalysis", node: fx.Node, dim: ChannelDim, before: tuple,
                 after: tuple, j: int) -> ChannelDim:  # fmt: skip
    """Channels (last) split into ``(pieces..., heads, head_dim)``; see :func:`reshape`."""
    size, end = before[dim.axis], j + 1
    while end < len(after) and math.prod(after[j:end]) < size:
        end += 1
    if dim.axis != len(before) - 1:
        a.refuse(
            node,
            f"splits the {size} channels into {tuple(after[j:end])} (a channel shuffle): at a "
            "narrower width the groups would hold other channels, and a chunk of the shuffled "
            "result would cut the active tensor elsewhere than at full width (ShuffleNetV2); "
            "only channels that are the last dimension (tokens) split into attention heads",
        )
    if math.prod(after[j:end]) != size or end - j < 2:
        a.refuse(node, f"reshape {tuple(before)} -> {tuple(after)} cuts across the channels")
    head_dim, heads = after[end - 1], after[end - 2]
    pieces = math.prod(after[j : end - 2])
    sizes = _reshape_sizes(node)
    fixed_sizes = sizes[j : end - 2] + sizes[end - 1 : end] if len(sizes) == len(after) else []
    if any(isinstance(x, fx.Node) for x in fixed_sizes):
        a.refuse(
            node,
            "the per-head size (or the number of pieces) of this split into heads is computed at "
            "run time, e.g. from the embedding's size: at a narrower width it would change the "
            "head dimension; write it as a constant or a module attribute (self.head_dim)",
        )
    segments = a.expand(dim).segments
    if len(segments) == 1 and segments[0][1] == 1:
        a.refine(segments[0][0], pieces, node, factor=head_dim, divisor=1)
    elif len(segments) == pieces and all(f == 1 for _, f in segments):
        for e, _ in segments:  # q, k and v from separate layers: one head count for all three
            a.refine(e, 1, node, factor=head_dim, divisor=1)
    segments = a.expand(dim).segments
    roots = {a.find(e) for e, _ in segments}
    if len(segments) != pieces or any(f != head_dim for _, f in segments) or any(
        a.elements[r].size != heads for r in roots
    ):  # fmt: skip
        a.refuse(
            node,
            f"splits channels {[a.elements[r].size for r in roots]} into {tuple(after[j:end])}, "
            "which are not whole heads of the groups that produce them",
        )
    first = segments[0][0]
    for e, _ in segments[1:]:
        a.union(first, e, a.where(node))
    return ChannelDim(((a.find(first), 1),), end - 2)


def unbind(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    """``unbind`` along another dimension than the channels (q, k, v out of one tensor)."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    shape = a.shape(_first_arg(node))
    along = _arg(node, 1, "dim", 0) % len(shape)
    if along == dim.axis:
        a.refuse(node, "unbind of the channel dimension")
    return tuple(dim.moved(dim.axis - (along < dim.axis)) for _ in range(shape[along]))


def expand(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``expand`` keeps the channels where their size is ``-1`` (or computed at run time)."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    sizes = _reshape_sizes(node)
    offset = len(sizes) - len(a.shape(_first_arg(node)))
    size = sizes[dim.axis + offset] if 0 <= dim.axis + offset < len(sizes) else -1
    if isinstance(size, int) and size != -1:
        a.refuse(node, f"expand with the channels' size written as the constant {size}")
    return dim.moved(dim.axis + offset)


def attention(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``scaled_dot_product_attention(q, k, v)``: with channels as heads (a batch dimension of
    the attention) q, k and v have the same active heads and the output has v's; with channels
    as the last dimension q and k are contracted over them (as a narrower model would be) and
    the output has v's. Channels along the tokens are refused."""
    q, k, v = (a.value(_arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
    dims = [d for d in (q, k, v) if d is not None]
    if not dims:
        return None
    rank = len(a.shape(node))
    if any(not isinstance(d, ChannelDim) or d.axis == rank - 2 for d in dims):
        a.refuse(node, "attention with channels along the tokens")
    if q is not None and k is not None:
        a.tie(q, k, node)
    heads = [d for d in dims if d.axis < rank - 2]
    for d in heads[1:]:
        a.tie(heads[0], d, node)
    if v is None:
        return heads[0] if heads else None
    if v.axis == rank - 1 and q is not None and q.axis != rank - 1:
        a.refuse(node, "attention whose values have channels last but queries as heads")
    return v


def matmul(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``x @ y`` of two tensors: channels along the batch dimensions are tied and kept (heads),
    along the contracted dimension tied and dropped, along x's rows or y's columns kept."""
    x, y = node.args[0], node.args[1]
    dx, dy = a.value(x), a.value(y)
    if dx is None and dy is None:
        return None
    sx, sy, out = a.shape(x), a.shape(y), a.shape(node)
    if sx is None or sy is None or out is None or len(sx) < 2 or len(sy) < 2:
        a.refuse(node, "matrix product of channels without shape information (or of vectors)")
    contract_x = isinstance(dx, ChannelDim) and dx.axis == len(sx) - 1
    contract_y = isinstance(dy, ChannelDim) and dy.axis == len(sy) - 2
    if contract_x != contract_y:
        a.refuse(
            node, "matrix product contracting channels with a constant or another dimension "
            "(a functional layer: use nn.Linear)"
        )  # fmt: skip
    if contract_x:
        a.tie(dx, dy, node)
    kept: list[ChannelDim] = []
    if isinstance(dx, ChannelDim) and not contract_x:
        kept.append(dx.moved(dx.axis + len(out) - len(sx)))
    if isinstance(dy, ChannelDim) and not contract_y:
        last = dy.axis == len(sy) - 1
        kept.append(dy.moved(len(out) - 1 if last else dy.axis + len(out) - len(sy)))
    if len({d.axis for d in kept}) > 1:
        a.refuse(node, "matrix product whose result has channels along two dimensions")
    for d in kept[1:]:
        a.tie(kept[0], d, node)
    return kept[0] if kept else None


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
register_op(nn.Conv2d, _conv)
register_op(nn.Linear, _linear)
register_op(nn.BatchNorm2d, features_layer)
register_op(nn.LayerNorm, layer_norm)
register_op(nn.Conv1d, _conv)
register_op(nn.ConvTranspose2d, conv_transpose)
register_op(nn.GroupNorm, group_norm)
register_op(nn.InstanceNorm2d, instance_norm)
register_op(nn.PReLU, prelu)
register_op(nn.MultiheadAttention, multihead_attention)
register_op(nn.Flatten, flatten)
register_op(torch.flatten, flatten)
register_op("flatten", flatten)
for _reduce in (torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"):
    register_op(_reduce, reduce)
register_op(torch.cat, concatenate)
register_op(torch.concat, concatenate)
for _split in (torch.split, torch.chunk, "split", "chunk"):
    register_op(_split, split)
register_op(operator.getitem, getitem)
register_op(torch.permute, permute)
register_op("permute", permute)
register_op(torch.transpose, transpose)
register_op("transpose", transpose)
register_op(torch.unsqueeze, unsqueeze)
register_op("unsqueeze", unsqueeze)
register_op(torch.squeeze, squeeze)
register_op("squeeze", squeeze)
register_op(F.pad, pad)
for _unbind in (torch.unbind, "unbind"):
    register_op(_unbind, unbind)
for _expand in ("expand",):
    register_op(_expand, expand)
register_op(F.scaled_dot_product_attention, attention)
for _matmul in (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"):
    register_op(_matmul, matmul)
register_op(getattr, _builtin_getattr)
register_op(torch._assert, no_channels)
for _query in ("size", "dim"):
    register_op(_query, no_channels)
for _function in (F.conv1d, F.conv2d, F.conv_transpose2d, F.linear, F.batch_norm, F.layer_norm,
                  F.group_norm):  # fmt: skip
    register_op(_function, _refuse_functional)
for _method in ("view", "reshape"):
    register_op(_method, reshape)
register_op(torch.reshape, reshape)


# ATen operations, for graphs from the torch.export fallback (usnet.tracing).
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
        _refuse_functional: (
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
        _CHUNKS.add(op)


def _aten_slice(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``aten.slice(x, dim, start, end)``: a crop of another dimension keeps the channels."""
    dim = a.value(_first_arg(node))
    if dim is None:
        return None
    shape = a.shape(_first_arg(node))
    along = _arg(node, 1, "dim", 0) % len(shape)
    start, end = _arg(node, 2, "start", None), _arg(node, 3, "end", None)
    whole = (
        start in (None, 0)
        and (end is None or end >= shape[along])
        and _arg(node, 4, "step", 1) == 1
    )
    if along == dim.axis and not whole:
        a.refuse(node, "indexing a tensor that carries channels")
    return dim


_CHUNKS: set[Any] = {torch.chunk, "chunk"}
_register_aten()


def _refuse_windowed_attention(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    if a.channel_inputs(node):
        a.refuse(
            node,
            "windowed attention (Swin) is not supported: its heads, window shifts and relative "
            "position tables live inside one function over the full channels; plain ViTs "
            "(nn.MultiheadAttention or a reshape into heads + scaled_dot_product_attention) are",
        )


def _refuse_einsum(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    if a.channel_inputs(node):
        a.refuse(
            node,
            f"einsum {node.args[0]!r} over channels is not supported (MaxViT's relative "
            "attention); write attention as reshape into heads + scaled_dot_product_attention",
        )


register_op(torch.einsum, _refuse_einsum)

# PyTorch-Pruning-style leaves: torchvision's stochastic depth is an fx-wrapped function.
try:  # pragma: no cover - torchvision is a dependency, but keep the core importable without it
    from torchvision.models import swin_transformer as _tv_swin
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    register_op(_tv_stochastic_depth, pass_through)
    register_op(_tv_swin.shifted_window_attention, _refuse_windowed_attention)
    register_op(_tv_swin._get_relative_position_bias, _refuse_windowed_attention)  # Swin V2
except ImportError:  # pragma: no cover
    pass


# --- analysis ------------------------------------------------------------------------------------
@dataclass
class _Element:
    """A channel dimension before union: the raw material of a ChannelGroup."""

    name: str
    size: int
    divisor: int
    fixed: bool = False
    parent: int | None = None
    ratio: float = 1.0


@dataclass
class Analysis:
    """Result of graph analysis: the plan and which group each layer's dimensions belong to."""

    plan: ChannelPlan
    bindings: list[Binding]
    layer_names: list[str] = field(default_factory=list)
    sliced_params: dict[str, dict[str, int]] = field(default_factory=dict)
    shape_attrs: list[ShapeAttribute] = field(default_factory=list)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Sequence[type[nn.Module]]):
        super().__init__()
        self._extra_leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        kind = type(m)
        if kind in SLIMMABLE_LAYERS or kind in MODULE_OPS or isinstance(m, self._extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


class GraphAnalysis:
    """One walk over a traced graph with a union-find over channel dimensions; the op handlers
    (:func:`register_op`) read and extend it through the methods below."""

    def __init__(
        self, gm: fx.GraphModule, divisor: int, ratio_ties: set[str], fixed_outputs: set[str],
        slim_outputs: bool = False,
    ):  # fmt: skip
        self.gm = gm
        self.divisor = divisor
        self.ratio_ties = ratio_ties
        self.fixed_outputs = fixed_outputs
        self.slim_outputs = slim_outputs
        self.elements: list[_Element] = []
        self.parent_of: list[int] = []  # union-find
        self.values: dict[fx.Node, Any] = {}
        self.layer_dims: dict[str, tuple[ChannelDim | None, ChannelDim]] = {}
        self.sliced_params: dict[str, dict[str, int]] = {}  # owner module -> {parameter: dim}
        self.refined: dict[int, tuple[tuple[int, int], ...]] = {}  # see refine()
        self.called: set[str] = set()  # modules called in the graph
        self.seen_layers: set[str] = set()
        # sizes written as constants along channels: (node, position among its sizes, channels)
        self.constant_sizes: list[tuple[fx.Node, int, ChannelDim]] = []
        self.shape_attrs: list[tuple[str, str, ChannelDim]] = []  # set by analyze()

    # union-find ------------------------------------------------------------------------------
    def new(self, name: str, size: int, **kw) -> int:
        self.elements.append(_Element(name, size, kw.pop("divisor", None) or self.divisor, **kw))
        self.parent_of.append(len(self.parent_of))
        return len(self.elements) - 1

    def new_group(self, name: str, size: int, *, axis: int = 1, **kw) -> ChannelDim:
        """A channel dimension of ``size`` channels of its own (``fixed``, ``divisor``, or a
        ``parent`` element it follows at ``ratio``)."""
        return ChannelDim(((self.new(name, size, **kw), 1),), axis)

    def find(self, i: int) -> int:
        while self.parent_of[i] != i:
            self.parent_of[i] = self.parent_of[self.parent_of[i]]
            i = self.parent_of[i]
        return i

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a > b:
            a, b = b, a
        ea, eb = self.elements[a], self.elements[b]
        if ea.size != eb.size:
            raise ConversionError(f"{where}: ties {ea.size} channels to {eb.size} channels")
        if ea.parent is not None and eb.parent is not None:
            pa, pb = self.find(ea.parent), self.find(eb.parent)
            if pa != pb or ea.ratio != eb.ratio:
                raise ConversionError(f"{where}: ties two groups that follow different groups")
        if ea.parent is None and eb.parent is not None:
            ea.parent, ea.ratio = eb.parent, eb.ratio
        ea.fixed = ea.fixed or eb.fixed
        ea.divisor = math.lcm(ea.divisor, eb.divisor)
        self.parent_of[b] = a
        return a

    def refine(self, element: int, pieces: int, node: fx.Node, *, factor: int = 1,
               divisor: int | None = None) -> None:  # fmt: skip
        """From now on, the channels of ``element`` are ``pieces`` equal segments of one new
        group (every dimension tied to it, before or after, reads so through :meth:`expand`),
        each entry of which is ``factor`` channels (whole attention heads of ``factor``)."""
        root = self.find(element)
        e = self.elements[root]
        if e.parent is not None and not e.fixed:
            self.refuse(node, "cutting a group that follows another at a ratio")
        for other in self.elements:
            if other.parent is not None and self.find(other.parent) == root:
                self.refuse(node, "cutting a group that other groups follow at a ratio")
        if e.size % (pieces * factor):
            self.refuse(node, f"{e.size} channels do not cut into {pieces} equal pieces")
        name = f"{e.name}:{pieces}" if factor == 1 else f"{e.name}:heads"
        part = self.new(name, e.size // (pieces * factor), divisor=divisor or e.divisor,
                        fixed=e.fixed)  # fmt: skip
        self.refined[root] = ((part, factor),) * pieces

    def expand(self, value: Any) -> Any:
        """``value`` with refined groups replaced by their segments (see :meth:`refine`)."""
        if isinstance(value, ChannelDim):
            if not self.refined:
                return value
            out: list[tuple[int, int]] = []
            for e, f in value.segments:
                r = self.find(e)
                if r in self.refined:
                    inner = self.expand(ChannelDim(self.refined[r], value.axis))
                    out.extend((p, f * g) for p, g in inner.segments)
                else:
                    out.append((r, f))
            return ChannelDim(tuple(out), value.axis)
        if isinstance(value, (tuple, list)):
            return type(value)(self.expand(v) for v in value)
        if isinstance(value, dict):
            return {k: self.expand(v) for k, v in value.items()}
        return value

    def tie(self, a: ChannelDim, b: ChannelDim, node: fx.Node) -> None:
        """The two dimensions always have equal active channels (segment by segment)."""
        a, b = self.expand(a), self.expand(b)
        if len(b.segments) > len(a.segments) == 1 and a.segments[0][1] == 1:
            self._refine_like(a, b, node)
            a = self.expand(a)
        elif len(a.segments) > len(b.segments) == 1 and b.segments[0][1] == 1:
            self._refine_like(b, a, node)
            b = self.expand(b)
        sizes_a = [(self.elements[self.find(e)].size, f) for e, f in a.segments]
        sizes_b = [(self.elements[self.find(e)].size, f) for e, f in b.segments]
        if len(a.segments) != len(b.segments) and self.size(a) == self.size(b):
            split_a, split_b = [s * f for s, f in sizes_a], [s * f for s, f in sizes_b]
            self.refuse(
                node, f"ties a concatenation to channels split differently ({split_a} vs {split_b})"
            )
        if self.size(a) != self.size(b):
            self.refuse(node, f"ties {self.size(a)} channels to {self.size(b)} channels")
        for (ea, fa), (eb, fb) in zip(a.segments, b.segments):
            if fa != fb:
                self.refuse(node, "ties channels to flattened features")
            self.union(ea, eb, self.where(node))

    def _refine_like(self, single: ChannelDim, several: ChannelDim, node: fx.Node) -> None:
        """One group tied to a concatenation: it becomes segments of the same sizes (each tied
        to its counterpart), provided the pieces are equal copies of one group."""
        roots = {self.find(e) for e, _ in several.segments}
        copies = len(roots) == 1 and all(f == 1 for _, f in several.segments)
        if self.size(single) == self.size(several) and copies:
            self.refine(single.segments[0][0], len(several.segments), node)
            return
        sizes = [self.elements[self.find(e)].size * f for e, f in several.segments]
        self.refuse(node, f"ties one channel group to a concatenation of different groups {sizes}")

    def fix(self, value: Any) -> None:
        """Never slim the channels of ``value`` (a ChannelDim, or a nest of them)."""
        value = self.expand(value)
        if isinstance(value, ChannelDim):
            for e, _ in value.segments:
                self.elements[self.find(e)].fixed = True
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.fix(v)
        elif isinstance(value, dict):
            for v in value.values():
                self.fix(v)

    # helpers ---------------------------------------------------------------------------------
    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return f"module {node.target!r} ({type(mod).__name__})"
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            return f"function {name} at node {node.name!r}{_stack_hint(node)}"
        if node.op == "call_method":
            return f"method .{node.target}() at node {node.name!r}{_stack_hint(node)}"
        return f"{node.op} {node.target!r}"

    def refuse(self, node: fx.Node, reason: str) -> None:
        raise ConversionError(f"cannot convert {self.where(node)}: {reason}")

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape)

    def value(self, arg: Any) -> Any:
        """The channels of a node's output (None when it carries none)."""
        return self.expand(self.values.get(arg)) if isinstance(arg, fx.Node) else None

    def size(self, dim: ChannelDim) -> int:
        dim = self.expand(dim)
        return sum(self.elements[self.find(e)].size * f for e, f in dim.segments)

    def channel_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg(
            (node.args, node.kwargs), lambda n: found.append(n) if self.values.get(n) else None
        )
        return found

    def single_input(self, node: fx.Node, axis: int = 1) -> ChannelDim:
        """The channels of the node's input; an input computed from constants alone (a
        position table) gets a fixed group of its own along ``axis``."""
        arg = _first_arg(node)
        dim = self.value(arg)
        if isinstance(dim, ChannelDim):
            return dim
        shape = self.shape(arg)
        if dim is not None or shape is None or len(shape) < 2:
            self.refuse(node, "its input carries no known channels")
        axis %= len(shape)
        return self.new_group(f"{node.name}:input", shape[axis], fixed=True, axis=axis)

    def check_size(self, node: fx.Node, dim: ChannelDim, expected: int) -> None:
        size = self.size(dim)
        if size != expected:
            self.refuse(node, f"expects {expected} channels but its input has {size}")

    def bind(self, node: fx.Node, inputs: ChannelDim | None, outputs: ChannelDim) -> None:
        """Record a slimmable layer's input and output channels."""
        if node.target in self.fixed_outputs:
            self.fix(outputs)
        if node.target in self.seen_layers:
            self.refuse(
                node, "the same layer is called more than once; shared layers are unsupported"
            )
        self.seen_layers.add(node.target)
        self.layer_dims[node.target] = (inputs, outputs)

    def follow_size(self, node: fx.Node, position: int, size: Any, dim: ChannelDim) -> None:
        """The size argument ``size`` (the ``position``-th of ``node``'s sizes) is along the
        channels ``dim``: ``-1`` follows by itself; a constant must come from a module attribute
        that ``set_width`` can keep at the active size (recorded here, found by ``analyze``); a
        size computed at run time must be the size of a tensor with these very channels
        (``x.shape[-1]`` of a tensor of the same groups), else it would not follow them."""
        if isinstance(size, int) and not isinstance(size, bool):
            if size != -1:
                self.constant_sizes.append((node, position, dim))
            return
        source = _shape_source(size)
        if source is not None:
            tensor, axis = source
            other = self.value(tensor)
            shape = self.shape(tensor)
            if (isinstance(other, ChannelDim) and shape is not None
                    and other.axis == axis % len(shape) and self._same(other, dim)):  # fmt: skip
                return
        name = size.name if isinstance(size, fx.Node) else repr(size)
        self.refuse(
            node,
            f"its size {name!r} along channels is computed at run time from something that does "
            "not have these channels (e.g. the embedding's size used for the attention's width), "
            "so it would not follow them at a narrower width; write -1 there or read it from a "
            "module attribute (self.attn_dim), which usnet keeps at the active size",
        )

    def _same(self, a: ChannelDim, b: ChannelDim) -> bool:
        a, b = self.expand(a), self.expand(b)
        return [(self.find(e), f) for e, f in a.segments] == [
            (self.find(e), f) for e, f in b.segments
        ]

    def bind_parameter(self, node: fx.Node, target: str, axis: int, dim: ChannelDim) -> None:
        """A parameter read in the forward code whose dimension ``axis`` follows ``dim``."""
        owner, _, name = target.rpartition(".")
        module = self.gm.get_submodule(owner)
        if isinstance(module, SlimmableLayer) or type(module) in SLIMMABLE_LAYERS:
            self.refuse(node, f"parameter {target!r} of a slimmable layer used in the graph")
        if any(f != 1 for _, f in dim.segments):
            self.refuse(node, f"parameter {target!r} along flattened features")
        if owner in self.sliced_params:  # several parameters of one owner: the same channels
            self.tie(self.layer_dims[owner][1], dim, node)
            self.sliced_params[owner][name] = axis
            return
        if owner in self.seen_layers:
            self.refuse(node, f"{owner!r} is also a layer bound elsewhere")
        self.sliced_params[owner] = {name: axis}
        self.seen_layers.add(owner)
        self.layer_dims[owner] = (None, dim)

    # per node --------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.values[node] = self.visit(node)

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self.shape(node)
            if shape is None or len(shape) < 2:
                return None
            return self.new_group(f"input:{node.name}", shape[1], fixed=True)
        if node.op == "get_attr":
            return None  # constants carry no slimmable channels; binary ops check their shapes
        if node.op == "output":
            if not self.slim_outputs:
                fx.node.map_arg(node.args, lambda n: self.fix(self.values.get(n)))
            return None
        module = None
        if node.op == "call_module":
            self.called.add(node.target)
            module = self.gm.get_submodule(node.target)
            handler = MODULE_OPS.get(type(module))
            if handler is None and type(module) in SLIMMABLE_LAYERS:
                handler = _ROLE_HANDLERS[SLIMMABLE_LAYERS[type(module)].channel_role]
        elif node.op == "call_function":
            handler = FUNCTION_OPS.get(node.target)
            if handler is None and isinstance(node.target, type) and issubclass(node.target, tuple):
                handler = _make_tuple  # a namedtuple of outputs (GoogLeNetOutputs, ...)
        else:
            handler = METHOD_OPS.get(node.target)
        if handler is not None:
            return handler(self, node, module)
        if not self.channel_inputs(node):
            return None
        if module is not None:
            self.refuse(
                node,
                f"{type(module).__name__} has no slimmable counterpart and does not simply pass "
                f"channels through (supported layers: {_names(SLIMMABLE_LAYERS)}; "
                "usnet.register_slimmable or usnet.register_op can add it)",
            )
        kind = "method" if node.op == "call_method" else "operation"
        self.refuse(
            node, f"{kind} not known to preserve or tie channels (usnet.register_op can teach it)"
        )

    # result ----------------------------------------------------------------------------------
    def build(self, width_range: tuple[float, float]) -> Analysis:
        self.layer_dims = {
            k: (self.expand(i), self.expand(o)) for k, (i, o) in self.layer_dims.items()
        }
        roots = sorted({self.find(i) for i in range(len(self.elements))} - set(self.refined))
        used = set()
        for inputs, outputs in self.layer_dims.values():
            for d in (inputs, outputs):
                if d is not None:
                    used.update(self.find(e) for e, _ in d.segments)
        # A derived group's parent must be listed first: order by creation, parents before children.
        order: list[int] = []
        visiting: set[int] = set()

        def visit(r: int) -> None:
            if r in order:
                return
            if r in visiting:
                raise ConversionError("cyclic ratio ties between channel groups")
            visiting.add(r)
            element = self.elements[r]
            if element.parent is not None and not element.fixed:
                parent = self.find(element.parent)
                used.add(parent)
                visit(parent)
            visiting.discard(r)
            order.append(r)

        for r in roots:
            if r in used:
                visit(r)
        groups = []
        for r in order:
            e = self.elements[r]
            derived = e.parent is not None and not e.fixed
            groups.append(
                ChannelGroup(
                    name=e.name,
                    size=e.size,
                    divisor=e.divisor,
                    fixed=e.fixed,
                    parent=self.elements[self.find(e.parent)].name if derived else None,
                    ratio=e.ratio if derived else 1.0,
                )
            )
        plan = ChannelPlan(groups, width_range)
        names = {r: self.elements[r].name for r in order}

        def named(d: ChannelDim | None):
            if d is None:
                return None
            found = tuple((names[self.find(e)], f) for e, f in d.segments)
            return found[0] if len(found) == 1 else found

        bindings = [Binding(layer, named(i), named(o)) for layer, (i, o) in self.layer_dims.items()]
        shape_attrs = []
        for module, attr, dim in self.shape_attrs:
            dim = self.expand(dim)
            if all(self.elements[self.find(e)].fixed for e, _ in dim.segments):
                continue  # never changes
            for e, _ in dim.segments:
                if self.find(e) not in names:
                    raise ConversionError(f"{module}.{attr}: follows channels of no layer")
            shape_attrs.append(ShapeAttribute(module, attr, named(dim)))
        return Analysis(plan, bindings, list(self.layer_dims), dict(self.sliced_params),
                        shape_attrs)  # fmt: skip


def _find_size_attributes(model: nn.Module, tracer: fx.Tracer, analyzer: GraphAnalysis) -> None:
    """Where each constant size along channels (``analyzer.constant_sizes``) comes from: the
    integer attributes of the modules whose code ran it that hold that value are each given a
    distinct stand-in value and the model is traced again; an attribute whose stand-in appears
    in that place is the source (``self.num_heads``), and ``set_width`` will keep it at the
    active size. A size written as a literal in the code cannot follow the width: refused."""
    modules = dict(model.named_modules())
    candidates: dict[tuple[str, str], int] = {}
    for node, position, _ in analyzer.constant_sizes:
        value = _reshape_sizes(node)[position]
        stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        for path in [*reversed(stack), ""]:
            owner = modules.get(path)
            for attr, v in vars(owner).items() if owner is not None else ():
                if type(v) is int and v == value:
                    candidates.setdefault((path, attr), v)
    taken = {v for v in candidates.values()}
    stand_ins: dict[tuple[str, str], int] = {}
    next_value = 10007
    for key in candidates:
        while next_value in taken:
            next_value += 1
        stand_ins[key] = next_value
        next_value += 1
    modes = {m: m.training for m in model.modules()}
    try:
        for (path, attr), v in stand_ins.items():
            modules[path].__dict__[attr] = v
        model.train()
        graph = tracer.trace(model)
    except Exception:  # a stand-in the code could not run with: that size stays unexplained
        graph = None
    finally:
        for (path, attr), v in candidates.items():
            modules[path].__dict__[attr] = v
        for module, training in modes.items():
            module.training = training
    twins = {n.name: n for n in graph.nodes} if graph is not None else {}
    found: dict[tuple[str, str], ChannelDim] = {}
    for node, position, dim in analyzer.constant_sizes:
        twin = twins.get(node.name)
        sizes = _reshape_sizes(twin) if twin is not None else []
        hits = [k for k, v in stand_ins.items() if position < len(sizes) and sizes[position] == v]
        if len(hits) != 1:
            analyzer.refuse(
                node,
                f"reshapes to the constant size {_reshape_sizes(node)[position]} along channels, "
                "which are fewer at a narrower width; write -1 there, compute it from the input's "
                "shape, or read it from a module attribute (self.num_heads), which usnet keeps at "
                "the active size",
            )
        if hits[0] in found:  # one attribute for two sizes: they are always equal
            analyzer.tie(found[hits[0]], dim, node)
        found[hits[0]] = dim
    analyzer.shape_attrs = [(path, attr, dim) for (path, attr), dim in found.items()]


def _flatten_args(node: fx.Node) -> tuple[int, int]:
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    return int(start), int(end)


def _stack_hint(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace")
    if not trace:
        return ""
    last = [line.strip() for line in trace.strip().splitlines() if line.strip()][-1:]
    return f" ({last[0]})" if last else ""


def _export_fallback(model: nn.Module, inputs: tuple, tracer: "_Tracer",
                     fx_error: Exception) -> fx.GraphModule:  # fmt: skip
    """The graph of ``model`` from non-strict ``torch.export`` when ``torch.fx`` cannot trace it
    (Python control flow over shapes), in the form the handlers expect (usnet.tracing)."""
    try:
        with torch.no_grad():
            return export_graph(
                model, inputs, lambda m: tracer.is_leaf_module(m, "") and _is_layer(m)
            )
    except Exception as err:
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(fx_error).__name__}: "
            f"{str(fx_error).splitlines()[0] if str(fx_error) else ''}) nor with torch.export "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "data-dependent control flow is unsupported; make the module that holds it a leaf "
            "with usnet.register_op(ModuleClass, handler) or leaf_modules=..."
        ) from err


def _is_layer(module: nn.Module) -> bool:
    """Leaves that export collapses back into modules: not torch.nn containers or activations
    (fx's default leaves), whose ATen operations the function handlers know."""
    kind = type(module)
    return kind in SLIMMABLE_LAYERS or (kind in MODULE_OPS and kind not in PASS_THROUGH_MODULES)


def _names(types: Iterable[type]) -> str:
    return ", ".join(t.__name__ for t in types)


def _shapes(example: Any) -> Any:
    if isinstance(example, (tuple, list)):
        return tuple(_shapes(e) for e in example)
    return tuple(example.shape) if isinstance(example, torch.Tensor) else example


def default_example_input(model: nn.Module, spatial: int = 224) -> torch.Tensor:
    """A (1, C, spatial, spatial) zero image, C taken from the model's first Conv2d."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            param = module.weight
            return torch.zeros(1, module.in_channels, spatial, spatial, dtype=param.dtype,
                               device=param.device)  # fmt: skip
    raise ConversionError(
        f"cannot convert {type(model).__name__}: it has no Conv2d layer to infer the input from; "
        "pass input_size=(1, C, H, W)"
    )


def analyze(
    model: nn.Module,
    width_range: tuple[float, float] = (0.25, 1.0),
    *,
    example_input: torch.Tensor | None = None,
    ratio_ties: Iterable[str] = (),
    fixed_outputs: Iterable[str] = (),
    divisor: int = 8,
    leaf_modules: Sequence[type[nn.Module]] = (),
    slim_outputs: bool = False,
) -> Analysis:
    """Derive the channel plan of a plain model without changing it."""
    if "timm" in sys.modules:  # timm's layer classes, once the user's code has imported timm
        importlib.import_module("usnet.timm_layers")
    ratio_ties, fixed_outputs = set(ratio_ties), set(fixed_outputs)
    names = dict(model.named_modules())
    for what, given in (("ratio_ties", ratio_ties), ("fixed_outputs", fixed_outputs)):
        unknown = sorted(given - names.keys())
        if unknown:
            raise ConversionError(f"{what} names unknown modules: {', '.join(unknown)}")
    guessed = example_input is None
    if guessed:
        example_input = default_example_input(model)
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    modes = {m: m.training for m in model.modules()}
    # Traced in training mode, so that training-only branches (auxiliary heads) are in the graph
    # and their layers are bound; shapes are then propagated in eval mode.
    model.train()
    tracer = _Tracer(leaf_modules)
    traced_by_fx = True
    try:
        gm = fx.GraphModule(model, tracer.trace(model))
    except Exception as fx_error:  # fx raises many types; try torch.export, then one clear error
        gm = _export_fallback(model, inputs, tracer, fx_error)
        traced_by_fx = False
    finally:
        for module, training in modes.items():  # restore each module's own mode
            module.training = training
    modes = {m: m.training for m in model.modules()}
    gm.eval()  # shape propagation only; eval avoids touching BN running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as err:
        guess = (" (guessed from its first registered Conv2d, which need not be the first to run)"
                 if guessed else "")  # fmt: skip
        raise ConversionError(
            f"cannot run {type(model).__name__} on an input of shape {_shapes(example_input)}"
            f"{guess} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "pass input_size=(1, C, H, W) that the model accepts"
        ) from err
    finally:
        for module, training in modes.items():  # restore each module's own mode
            module.training = training
    analyzer = GraphAnalysis(gm, divisor, ratio_ties, fixed_outputs, slim_outputs)
    analyzer.run()
    if analyzer.constant_sizes:
        if not traced_by_fx:
            node = analyzer.constant_sizes[0][0]
            analyzer.refuse(
                node,
                "a constant size along channels in a graph from torch.export, "
                "which does not say where it came from; make the model fx-traceable",
            )
        _find_size_attributes(model, tracer, analyzer)
    missing = [
        name
        for name, m in model.named_modules()
        if type(m) in SLIMMABLE_LAYERS and name not in analyzer.called
    ]
    if missing:
        raise ConversionError(
            f"cannot convert {type(model).__name__}: layers {', '.join(missing[:5])} are not used "
            "in the traced forward pass"
        )
    for what, given in (("ratio_ties", ratio_ties), ("fixed_outputs", fixed_outputs)):
        unused = sorted(given - analyzer.layer_dims.keys())
        if unused:
            raise ConversionError(f"{what} names modules that are not slimmable layers: {unused}")
    return analyzer.build(width_range)


def slimmable(
    model: nn.Module,
    width_range: tuple[float, float] = (0.25, 1.0),
    *,
    input_size: Sequence[int] | None = None,
    example_input: torch.Tensor | None = None,
    ratio_ties: Iterable[str] = (),
    fixed_outputs: Iterable[str] = (),
    input_averaging: bool = False,
    divisor: int = 8,
    leaf_modules: Sequence[type[nn.Module]] = (),
    arch: dict[str, Any] | None = None,
    slim_outputs: bool = False,
) -> nn.Module:
    """Convert ``model`` in place into a universally slimmable model and return it.

    Args:
        model: an ordinary CNN built from ``Conv2d``/``Linear``/``BatchNorm2d`` and the
            operations listed in this module's documentation.
        width_range: the (lo, hi) width multipliers the model must run at, ``0 < lo <= hi <= 1``.
        input_size: shape of an example input for shape propagation (default ``(1, C, 224, 224)``
            with C from the first conv); needed when a flatten feeds a Linear at another size.
        example_input: an example tensor instead of ``input_size`` (a tuple of tensors for a
            model with several inputs).
        ratio_ties: names of layers whose outputs follow their inputs at a fixed ratio.
        fixed_outputs: names of layers whose outputs never slim (e.g. MobileNetV2's last conv,
            which torchvision keeps at 1280 channels below width 1.0).
        input_averaging: scale outputs by full/active fan-in (the seed paper's option; off).
        divisor: active channel counts are multiples of this (torchvision uses 8).
        leaf_modules: extra module types to treat as opaque leaves during tracing.
        slim_outputs: let the model's outputs slim with the plan (a backbone whose consumer
            follows its width) instead of fixing them (class logits); ``fixed_outputs`` still
            fixes the layers it names.
        arch: how to rebuild the model (``{"name": zoo builder, "kwargs": {...}}``), for
            :func:`usnet.load`; the zoo builders set it.

    The converted model starts at the top of its width range. Its full-width BatchNorm statistics
    are the layers' own running buffers, so a trained model is evaluated exactly as before at
    full width.
    """
    if not isinstance(model, nn.Module):
        raise UsnetTypeError(f"usnet.slimmable expects an nn.Module, got {type(model).__name__}")
    if is_slimmable(model):
        raise UsnetValueError("model is already slimmable; convert the plain model once")
    if input_size is not None and example_input is None:
        param = next(model.parameters(), None)
        example_input = torch.zeros(
            tuple(int(s) for s in input_size),
            dtype=param.dtype if param is not None else None,
            device=param.device if param is not None else None,
        )
    # the input shape is recorded with the model (profile/select/export use it by default)
    shown = example_input if example_input is not None else default_example_input(model)
    analysis = analyze(
        model,
        width_range,
        example_input=example_input,
        ratio_ties=ratio_ties,
        fixed_outputs=fixed_outputs,
        divisor=divisor,
        leaf_modules=leaf_modules,
        slim_outputs=slim_outputs,
    )
    for name in analysis.layer_names:
        if name in analysis.sliced_params:
            slice_parameters_(model.get_submodule(name), analysis.sliced_params[name])
            continue
        layer = make_slimmable_(model.get_submodule(name), input_averaging)
        if "usnet_name" in vars(layer):  # layers that name themselves in their errors
            layer.usnet_name = name
    state = SlimmableState(
        plan=analysis.plan,
        bindings=analysis.bindings,
        arch=arch,
        input_averaging=input_averaging,
        width=analysis.plan.width_range[1],
        input_size=(1, *shown.shape[1:]) if isinstance(shown, torch.Tensor) else None,
        shape_attrs=analysis.shape_attrs,
    )
    setattr(model, STATE_ATTR, state)
    set_width(model, state.width)
    return model
