"""Reading torch.fx nodes: arguments, flatten ranges, reshape sizes, the source line of a node."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx


def first_arg(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def flatten_args(node: fx.Node) -> tuple[int, int]:
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    return int(start), int(end)


def stack_hint(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace")
    if not trace:
        return ""
    last = [line.strip() for line in trace.strip().splitlines() if line.strip()][-1:]
    return f" ({last[0]})" if last else ""


def reshape_sizes(node: fx.Node) -> list[Any]:
    """The target sizes of a ``reshape``/``view`` node, as written in the code (ints or nodes)."""
    rest = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        rest = list(rest[0])
    return rest


def shape_source(size: Any) -> tuple[fx.Node, int] | None:
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


def type_names(types: Iterable[type]) -> str:
    return ", ".join(t.__name__ for t in types)
