"""The converter's tables: what each module type, function and method does to channels.

:func:`register_op` teaches the converter an operation; :class:`ChannelDim` is where a traced
tensor's channels are; :data:`OpHandler` is the handler signature. Third-party layer plugins
(:mod:`usnet.plugins`) register loaders here (:func:`register_plugin`) that :func:`load_plugins`
runs once their library is imported, so nothing here imports a plugin.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from ..errors import UsnetValueError
from .nodes import first_arg

if TYPE_CHECKING:
    from .graph import GraphAnalysis


class ConversionError(UsnetValueError):
    """The model cannot be converted; the message names the module and the operation."""


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


def handles(*targets: type[nn.Module] | Callable | str) -> Callable[[OpHandler], OpHandler]:
    """:func:`register_op` as a decorator on the handler, for one or several targets:
    ``@handles(nn.Conv2d, nn.Conv1d)``."""

    def register(handler: OpHandler) -> OpHandler:
        for target in targets:
            register_op(target, handler)
        return handler

    return register


def pass_through(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> Any:
    """The output has the channels of the first argument (activations, pooling, casts, ...)."""
    return a.value(first_arg(node))


def no_channels(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    """The result carries no channels (shape queries, assertions)."""
    return None


ROLE_HANDLERS: dict[str, OpHandler] = {}
"""The handler of a registered slimmable layer without a handler of its own, by its class's
``channel_role`` (``"transform"``, ``"features"``; filled by :mod:`usnet.convert.ops.layers`)."""

PLUGINS: dict[str, Callable[[], None]] = {}
"""Third-party library (top-level package name) -> the loader of usnet's plugin for it."""


def register_plugin(library: str, load: Callable[[], None]) -> None:
    """Run ``load()`` (which imports the plugin, registering its layers and handlers) before the
    first analysis after ``library`` has been imported by the user's code: a plugin costs
    nothing for users who never import its library."""
    PLUGINS[library] = load


def load_plugins() -> None:
    """Load the plugin of every registered library the user's code has imported."""
    for library, load in PLUGINS.items():
        if library in sys.modules:
            load()
