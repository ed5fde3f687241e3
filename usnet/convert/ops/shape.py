"""Handlers of ops that move, cut or join channel dimensions: flatten, cat, split/chunk,
indexing, permute/transpose/squeeze/unsqueeze, reshape/view, unbind, expand.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ...nn.params import is_tensor_attr
from ..nodes import first_arg, flatten_args, node_arg, reshape_sizes
from ..registry import ChannelDim, handles
from .attention import split_heads

if TYPE_CHECKING:
    from ..graph import GraphAnalysis


@handles(nn.Flatten, torch.flatten, "flatten")
def flatten(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``flatten(start, end)`` over the channel dimension and the ones after it: each channel
    becomes ``prod(sizes after it)`` features, channel-major, so a prefix stays a prefix."""
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    shape = a.shape(first_arg(node))
    if shape is None:
        a.refuse(node, "no shape information")
    if isinstance(module, nn.Flatten):
        start, end = module.start_dim, module.end_dim
    else:
        start, end = flatten_args(node)
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


@handles(torch.cat, torch.concat)
def concatenate(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``torch.cat`` along channels: the output's segments are its inputs', in order (each input
    stays active on its own prefix); along any other dimension: the inputs' channels are tied."""
    tensors = list(node_arg(node, 0, "tensors"))
    values = [a.value(t) for t in tensors]
    if not any(isinstance(v, ChannelDim) for v in values):
        return None
    shape = a.shape(tensors[0])
    rank = len(shape) if shape is not None else 0
    along = int(node_arg(node, 1, "dim", 0)) % max(rank, 1)
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


CHUNKS: set[Any] = {torch.chunk, "chunk"}


@handles(torch.split, torch.chunk, "split", "chunk")
def split(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    """``split``/``chunk`` along a non-channel dimension keep the channels; along channels they
    are exact only where the pieces are segments (splitting a concatenation back into its
    inputs). Splitting one channel group would cut the active tensor elsewhere than at full width."""
    dim = a.value(first_arg(node))
    metas = node.meta.get("tensor_meta")
    if dim is None or not isinstance(metas, (list, tuple)):
        return None if dim is None else a.refuse(node, "no shape information")
    rank = len(a.shape(first_arg(node)))
    along = node_arg(node, 2, "dim", 0) % rank
    if along != dim.axis:
        return tuple(dim for _ in metas)
    sizes = [m.shape[along] for m in metas]
    if node.target in CHUNKS and len(dim.segments) == 1 and len(sizes) > 1:
        # chunk(n) of one channel group (a CSP block's conv): the group becomes n equal
        # segments of one new group, each active on its own prefix, so the runtime chunk of the
        # active tensor cuts exactly between them.
        element, factor = dim.segments[0]
        if factor == 1 and len(set(sizes)) == 1 and a.size(dim) == sum(sizes):
            a.refine(element, len(sizes), node)
            dim = a.value(first_arg(node))
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
    if node.target in CHUNKS:
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


@handles(operator.getitem)
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


@handles(torch.permute, "permute")
def permute(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    order = node.args[1:] if node.op == "call_method" else (node_arg(node, 1, "dims"),)
    if len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = tuple(order[0])
    rank = len(order)
    return dim.moved([d % rank for d in order].index(dim.axis))


@handles(torch.transpose, "transpose")
def transpose(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    rank = len(a.shape(first_arg(node)))
    d0, d1 = node_arg(node, 1, "dim0") % rank, node_arg(node, 2, "dim1") % rank
    return dim.moved(d1 if dim.axis == d0 else d0 if dim.axis == d1 else dim.axis)


@handles(torch.unsqueeze, "unsqueeze")
def unsqueeze(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    d = node_arg(node, 1, "dim") % (len(a.shape(first_arg(node))) + 1)
    return dim.moved(dim.axis + 1) if d <= dim.axis else dim


@handles(torch.squeeze, "squeeze")
def squeeze(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    shape = a.shape(first_arg(node))
    d = node_arg(node, 1, "dim")
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


def make_tuple(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> tuple:
    return tuple(a.value(x) for x in (*node.args, *node.kwargs.values()))


@handles(getattr)
def _builtin_getattr(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    if node.args[1] in ("T", "mT", "H", "mH", "real", "imag"):
        return a.refuse(node, f"tensor attribute .{node.args[1]} of channels")
    return None  # shape, ndim, dtype, device: queries


@handles("view", "reshape", torch.reshape)
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
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    before, after = a.shape(first_arg(node)), a.shape(node)
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
        out = split_heads(a, node, dim, before, after, j)
    sizes = reshape_sizes(node)
    if len(sizes) == len(after):
        a.follow_size(node, out.axis, sizes[out.axis], out)
    return out


@handles(torch.unbind, "unbind")
def unbind(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    """``unbind`` along another dimension than the channels (q, k, v out of one tensor)."""
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    shape = a.shape(first_arg(node))
    along = node_arg(node, 1, "dim", 0) % len(shape)
    if along == dim.axis:
        a.refuse(node, "unbind of the channel dimension")
    return tuple(dim.moved(dim.axis - (along < dim.axis)) for _ in range(shape[along]))


@handles("expand")
def expand(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``expand`` keeps the channels where their size is ``-1`` (or computed at run time)."""
    dim = a.value(first_arg(node))
    if dim is None:
        return None
    sizes = reshape_sizes(node)
    offset = len(sizes) - len(a.shape(first_arg(node)))
    size = sizes[dim.axis + offset] if 0 <= dim.axis + offset < len(sizes) else -1
    if isinstance(size, int) and size != -1:
        a.refuse(node, f"expand with the channels' size written as the constant {size}")
    return dim.moved(dim.axis + offset)
