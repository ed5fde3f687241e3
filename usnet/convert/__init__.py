"""Automatic conversion of an ordinary PyTorch model into a slimmable one.

Rooms: :mod:`.registry` (tables, ``register_op``, plugins), :mod:`.graph` (the union-find walk),
:mod:`.trace` (torch.fx and the torch.export fallback), :mod:`.ops` (the handlers, by family),
:mod:`.analyze` (``analyze``, ``slimmable``).

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

from . import ops  # noqa: F401 (registers the built-in handlers)
from .analyze import analyze, default_example_input, slimmable
from .graph import Analysis, GraphAnalysis
from .ops.layers import features_layer, layer_norm, transform_layer
from .registry import (
    FUNCTION_OPS,
    METHOD_OPS,
    MODULE_OPS,
    ChannelDim,
    ConversionError,
    OpHandler,
    no_channels,
    pass_through,
    register_op,
    register_plugin,
)

__all__ = [
    "FUNCTION_OPS",
    "METHOD_OPS",
    "MODULE_OPS",
    "Analysis",
    "ChannelDim",
    "ConversionError",
    "GraphAnalysis",
    "OpHandler",
    "analyze",
    "default_example_input",
    "features_layer",
    "layer_norm",
    "no_channels",
    "pass_through",
    "register_op",
    "register_plugin",
    "slimmable",
    "transform_layer",
]
