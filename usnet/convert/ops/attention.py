"""Handlers of attention written out: heads split by a reshape, ``scaled_dot_product_attention``,
``q @ k^T`` and ``@ v``; refusals of windowed attention (Swin) and ``einsum`` (MaxViT).
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..nodes import node_arg, reshape_sizes
from ..registry import ChannelDim, handles, pass_through, register_op

if TYPE_CHECKING:
    from ..graph import GraphAnalysis


def split_heads(a: "GraphAnalysis", node: fx.Node, dim: ChannelDim, before: tuple,
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
    sizes = reshape_sizes(node)
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


@handles(F.scaled_dot_product_attention)
def attention(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> ChannelDim | None:
    """``scaled_dot_product_attention(q, k, v)``: with channels as heads (a batch dimension of
    the attention) q, k and v have the same active heads and the output has v's; with channels
    as the last dimension q and k are contracted over them (as a narrower model would be) and
    the output has v's. Channels along the tokens are refused."""
    q, k, v = (a.value(node_arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
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


@handles(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
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


def _refuse_windowed_attention(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    if a.channel_inputs(node):
        a.refuse(
            node,
            "windowed attention (Swin) is not supported: its heads, window shifts and relative "
            "position tables live inside one function over the full channels; plain ViTs "
            "(nn.MultiheadAttention or a reshape into heads + scaled_dot_product_attention) are",
        )


@handles(torch.einsum)
def _refuse_einsum(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    if a.channel_inputs(node):
        a.refuse(
            node,
            f"einsum {node.args[0]!r} over channels is not supported (MaxViT's relative "
            "attention); write attention as reshape into heads + scaled_dot_product_attention",
        )


# PyTorch-Pruning-style leaves: torchvision's stochastic depth is an fx-wrapped function.
try:  # pragma: no cover - torchvision is a dependency, but keep the core importable without it
    from torchvision.models import swin_transformer as _tv_swin
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    register_op(_tv_stochastic_depth, pass_through)
    register_op(_tv_swin.shifted_window_attention, _refuse_windowed_attention)
    register_op(_tv_swin._get_relative_position_bias, _refuse_windowed_attention)  # Swin V2
except ImportError:  # pragma: no cover
    pass
