"""Automatic conversion of an ordinary PyTorch model into a slimmable one.

Graph analysis is separate from mechanics: :func:`analyze` traces the model with ``torch.fx``,
propagates example shapes, and derives which channel dimensions are tied (a union-find over channel
dimensions). :func:`slimmable` then swaps the layers in place (keeping their parameter objects) and
attaches the plan. Whatever the analysis does not understand is refused with a
:class:`ConversionError` naming the module and the operation: a wrong plan would fail silently.

Rules, per graph node:

* image inputs and model outputs are fixed (never slimmed);
* ``Conv2d`` creates a new group for its outputs; a depthwise conv ties its output to its input
  (a channel multiplier m makes the output a derived group, m times the input); a grouped conv
  raises both sides' divisors to a multiple of its group count;
* ``Linear`` consumes a ``(N, features)`` input and creates a new group for its outputs;
* ``BatchNorm2d``, activations, pooling, dropout and stochastic depth pass channels through;
* elementwise binary ops (add, mul, sub, div; including squeeze-excitation scaling by an
  ``(N, C, 1, 1)`` tensor) tie the channels of their operands; an operand broadcast along
  channels (size 1) ties nothing;
* ``flatten`` from dim 1 turns ``(N, C, H, W)`` into features that are ``H*W`` times the channels
  (channel-major, so a prefix of channels is a prefix of features);
* ``ratio_ties`` name layers whose outputs follow their inputs at a fixed ratio (an inverted
  residual's expansion layer is ``t`` times its block's input).

Refused: concatenation along channels, reshapes other than flatten, channel indexing, functional
convolutions on parameters, and any other module type that sees channels (LayerNorm, Conv1d,
ConvTranspose2d, ...).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .channels import ChannelGroup, ChannelPlan
from .errors import UsnetValueError
from .layers import SLIMMABLE_LAYERS, SlimmableBatchNorm2d, make_slimmable_
from .state import STATE_ATTR, Binding, Dim, SlimmableState, is_slimmable, set_width


class ConversionError(UsnetValueError):
    """The model cannot be converted; the message names the module and the operation."""


# --- what passes channels through ----------------------------------------------------------------
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
PASS_THROUGH_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.clone,
}  # fmt: skip
PASS_THROUGH_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "contiguous", "clone",
    "float", "half", "bfloat16", "to", "type_as", "detach",
}  # fmt: skip
BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub,
    operator.truediv, operator.itruediv, torch.add, torch.mul, torch.sub, torch.div,
}  # fmt: skip
BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}

# PyTorch-Pruning-style leaves: torchvision's stochastic depth is an fx-wrapped function.
try:  # pragma: no cover - torchvision is a dependency, but keep the core importable without it
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    PASS_THROUGH_FUNCTIONS.add(_tv_stochastic_depth)
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


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Sequence[type[nn.Module]]):
        super().__init__()
        self._extra_leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) in SLIMMABLE_LAYERS or isinstance(m, self._extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


class _Analyzer:
    def __init__(
        self, gm: fx.GraphModule, divisor: int, ratio_ties: set[str], fixed_outputs: set[str]
    ):
        self.gm = gm
        self.divisor = divisor
        self.ratio_ties = ratio_ties
        self.fixed_outputs = fixed_outputs
        self.elements: list[_Element] = []
        self.parent_of: list[int] = []  # union-find
        self.dims: dict[fx.Node, tuple[int, int] | None] = {}
        self.layer_dims: dict[str, tuple[tuple[int, int] | None, tuple[int, int]]] = {}
        self.seen_layers: set[str] = set()

    # union-find ------------------------------------------------------------------------------
    def new(self, name: str, size: int, **kw) -> int:
        self.elements.append(_Element(name, size, kw.pop("divisor", self.divisor), **kw))
        self.parent_of.append(len(self.parent_of))
        return len(self.elements) - 1

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

    def dim_of(self, arg: Any) -> tuple[int, int] | None:
        return self.dims.get(arg) if isinstance(arg, fx.Node) else None

    def channel_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if self.dims.get(n) else None)
        return found

    # per node --------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            handler = getattr(self, "visit_" + node.op)
            self.dims[node] = handler(node)

    def visit_placeholder(self, node: fx.Node):
        shape = self.shape(node)
        if shape is None or len(shape) < 2:
            return None
        return (self.new(f"input:{node.name}", shape[1], fixed=True), 1)

    def visit_get_attr(self, node: fx.Node):
        return None  # constants carry no slimmable channels; binary ops check their shapes

    def visit_output(self, node: fx.Node):
        for arg in self.channel_inputs(node):
            element, _ = self.dims[arg]
            self.elements[self.find(element)].fixed = True
        return None

    def visit_call_module(self, node: fx.Node):
        module = self.gm.get_submodule(node.target)
        kind = type(module)
        inputs = self.channel_inputs(node)
        if kind is nn.Conv2d:
            return self.conv(node, module)
        if kind is nn.Linear:
            return self.linear(node, module)
        if kind is nn.BatchNorm2d:
            dim = self.single_input(node)
            self.check_size(node, dim, module.num_features)
            if dim[1] != 1:
                self.refuse(node, "BatchNorm2d on flattened features")
            self.bind(node, None, dim)
            return dim
        if kind in PASS_THROUGH_MODULES:
            if isinstance(module, nn.PReLU) and module.num_parameters > 1:
                self.refuse(node, "PReLU with per-channel parameters is not slimmable")
            return self.dim_of(node.args[0]) if node.args else None
        if kind is nn.Flatten:
            return self.flatten(node, module.start_dim, module.end_dim)
        if not inputs:
            return None
        self.refuse(
            node,
            f"{kind.__name__} has no slimmable counterpart and does not simply pass channels "
            f"through (supported layers: {', '.join(t.__name__ for t in SLIMMABLE_LAYERS)})",
        )

    def visit_call_function(self, node: fx.Node):
        target = node.target
        if target in PASS_THROUGH_FUNCTIONS:
            return self.dim_of(node.args[0]) if node.args else None
        if target in BINARY_FUNCTIONS:
            return self.binary(node)
        if target is torch.flatten:
            return self.flatten(node, *_flatten_args(node))
        if target in (torch.mean, torch.sum, torch.amax):
            return self.reduce(node)
        inputs = self.channel_inputs(node)
        if not inputs:
            return None
        if target is torch.cat or target is torch.concat:
            self.refuse(node, "concatenation along channels cannot keep channels a prefix")
        if target is operator.getitem:
            self.refuse(node, "indexing a tensor that carries channels")
        if target in (F.conv2d, F.linear, F.batch_norm):
            self.refuse(node, "functional layer on parameters; use the nn.Module layer instead")
        self.refuse(node, "operation not known to preserve or tie channels")

    def visit_call_method(self, node: fx.Node):
        target = node.target
        inputs = self.channel_inputs(node)
        if target in PASS_THROUGH_METHODS:
            return self.dim_of(node.args[0])
        if target in BINARY_METHODS:
            return self.binary(node)
        if target == "flatten":
            return self.flatten(node, *_flatten_args(node))
        if target in ("mean", "sum", "amax"):
            return self.reduce(node)
        if target in ("size", "dim") or not inputs:
            return None
        if target in ("view", "reshape"):
            self.refuse(node, "reshape of channels; use torch.flatten(x, 1) before a Linear layer")
        self.refuse(node, "method not known to preserve or tie channels")

    # op kinds --------------------------------------------------------------------------------
    def single_input(self, node: fx.Node) -> tuple[int, int]:
        dim = self.dim_of(node.args[0]) if node.args else None
        if dim is None:
            self.refuse(node, "its input carries no known channels")
        return dim  # type: ignore[return-value]

    def check_size(self, node: fx.Node, dim: tuple[int, int], expected: int) -> None:
        element, factor = dim
        size = self.elements[self.find(element)].size * factor
        if size != expected:
            self.refuse(node, f"expects {expected} channels but its input has {size}")

    def bind(self, node: fx.Node, inputs, outputs) -> None:
        if node.target in self.fixed_outputs:
            self.elements[self.find(outputs[0])].fixed = True
        if node.target in self.seen_layers:
            self.refuse(node, "the same layer is called more than once; shared layers are unsupported")
        self.seen_layers.add(node.target)
        self.layer_dims[node.target] = (inputs, outputs)

    def conv(self, node: fx.Node, conv: nn.Conv2d):
        dim = self.single_input(node)
        self.check_size(node, dim, conv.in_channels)
        if dim[1] != 1:
            self.refuse(node, "convolution on flattened features")
        element = dim[0]
        name = node.target
        if conv.groups > 1 and conv.groups == conv.in_channels:
            multiplier = conv.out_channels // conv.in_channels
            out = dim if multiplier == 1 else (
                self.new(name, conv.out_channels, parent=element, ratio=float(multiplier)), 1)
        elif name in self.ratio_ties:
            ratio = conv.out_channels / conv.in_channels
            out = (self.new(name, conv.out_channels, parent=element, ratio=ratio), 1)
        else:
            out = (self.new(name, conv.out_channels), 1)
            if conv.groups > 1:
                root = self.elements[self.find(element)]
                root.divisor = math.lcm(root.divisor, conv.groups)
                self.elements[out[0]].divisor = math.lcm(self.divisor, conv.groups)
        self.bind(node, dim, out)
        return out

    def linear(self, node: fx.Node, linear: nn.Linear):
        dim = self.single_input(node)
        shape = self.shape(node.args[0])
        if shape is not None and len(shape) != 2:
            self.refuse(node, f"Linear on a {len(shape)}-d input; only (N, features) is supported")
        self.check_size(node, dim, linear.in_features)
        name = node.target
        if name in self.ratio_ties:
            # The ratio follows the input *group* (a flattened input is H*W times its channels).
            ratio = linear.out_features / self.elements[self.find(dim[0])].size
            out = (self.new(name, linear.out_features, parent=dim[0], ratio=ratio), 1)
        else:
            out = (self.new(name, linear.out_features), 1)
        self.bind(node, dim, out)
        return out

    def binary(self, node: fx.Node):
        out_shape = self.shape(node)
        out_channels = out_shape[1] if out_shape is not None and len(out_shape) >= 2 else None
        tied: list[tuple[int, int]] = []
        for arg in (*node.args[:2], *node.kwargs.values()):
            shape = self.shape(arg)
            if shape is None or len(shape) < 2:
                continue  # scalars tie nothing
            if shape[1] == 1 and out_channels != 1:
                continue  # broadcast along channels (e.g. a spatial attention map) ties nothing
            dim = self.dim_of(arg)
            if dim is None:
                if shape[1] == 1:
                    continue  # a one-channel constant on a one-channel tensor
                self.refuse(node, f"operand {arg.name!r} has {shape[1]} channels from a constant")
            tied.append(dim)
        if not tied:
            return None
        first = tied[0]
        for other in tied[1:]:
            if other[1] != first[1]:
                self.refuse(node, "ties channels to flattened features")
            self.union(first[0], other[0], self.where(node))
        if out_channels is not None:
            self.check_size(node, first, out_channels)
        return first

    def flatten(self, node: fx.Node, start_dim: int, end_dim: int):
        dim = self.dim_of(node.args[0])
        if dim is None:
            return None
        shape = self.shape(node.args[0])
        if shape is None:
            self.refuse(node, "no shape information")
        end = end_dim % len(shape)
        if start_dim != 1 or end != len(shape) - 1:
            self.refuse(node, "only flatten(x, 1) (channel-major features) is supported")
        spatial = math.prod(shape[2:])
        return (dim[0], dim[1] * spatial)

    def reduce(self, node: fx.Node):
        dim = self.dim_of(node.args[0])
        if dim is None:
            return None
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        rank = len(self.shape(node.args[0]) or ())
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        # Reducing spatial dims only (keepdim or not) leaves channels at dim 1.
        if not dims or any(d % rank < 2 for d in dims):
            self.refuse(node, "reduction over the batch or channel dimension")
        return dim

    # result ----------------------------------------------------------------------------------
    def build(self, width_range: tuple[float, float]) -> Analysis:
        roots = sorted({self.find(i) for i in range(len(self.elements))})
        used = set()
        for inputs, outputs in self.layer_dims.values():
            for d in (inputs, outputs):
                if d is not None:
                    used.add(self.find(d[0]))
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

        def named(d):
            return None if d is None else (names[self.find(d[0])], d[1])

        bindings = [Binding(layer, named(i), named(o)) for layer, (i, o) in self.layer_dims.items()]
        return Analysis(plan, bindings, list(self.layer_dims))


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
) -> Analysis:
    """Derive the channel plan of a plain model without changing it."""
    ratio_ties, fixed_outputs = set(ratio_ties), set(fixed_outputs)
    names = dict(model.named_modules())
    for what, given in (("ratio_ties", ratio_ties), ("fixed_outputs", fixed_outputs)):
        unknown = sorted(given - names.keys())
        if unknown:
            raise ConversionError(f"{what} names unknown modules: {', '.join(unknown)}")
    try:
        graph = _Tracer(leaf_modules).trace(model)
    except Exception as err:  # fx raises many types; surface them as one clear error
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "data-dependent control flow is unsupported"
        ) from err
    gm = fx.GraphModule(model, graph)
    guessed = example_input is None
    if guessed:
        example_input = default_example_input(model)
    modes = {m: m.training for m in model.modules()}
    gm.eval()  # shape propagation only; eval avoids touching BN running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as err:
        guess = (" (guessed from its first registered Conv2d, which need not be the first to run)"
                 if guessed else "")  # fmt: skip
        raise ConversionError(
            f"cannot run {type(model).__name__} on an input of shape {tuple(example_input.shape)}"
            f"{guess} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "pass input_size=(1, C, H, W) that the model accepts"
        ) from err
    finally:
        for module, training in modes.items():  # restore each module's own mode
            module.training = training
    analyzer = _Analyzer(gm, divisor, ratio_ties, fixed_outputs)
    analyzer.run()
    missing = [
        name
        for name, m in model.named_modules()
        if type(m) in SLIMMABLE_LAYERS and name not in analyzer.layer_dims
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
) -> nn.Module:
    """Convert ``model`` in place into a universally slimmable model and return it.

    Args:
        model: an ordinary CNN built from ``Conv2d``/``Linear``/``BatchNorm2d`` and the
            operations listed in this module's documentation.
        width_range: the (lo, hi) width multipliers the model must run at, ``0 < lo <= hi <= 1``.
        input_size: shape of an example input for shape propagation (default ``(1, C, 224, 224)``
            with C from the first conv); needed when a flatten feeds a Linear at another size.
        example_input: an example tensor instead of ``input_size``.
        ratio_ties: names of layers whose outputs follow their inputs at a fixed ratio.
        fixed_outputs: names of layers whose outputs never slim (e.g. MobileNetV2's last conv,
            which torchvision keeps at 1280 channels below width 1.0).
        input_averaging: scale outputs by full/active fan-in (the seed paper's option; off).
        divisor: active channel counts are multiples of this (torchvision uses 8).
        leaf_modules: extra module types to treat as opaque leaves during tracing.
        arch: how to rebuild the model (``{"name": zoo builder, "kwargs": {...}}``), for
            :func:`usnet.load`; the zoo builders set it.

    The converted model starts at the top of its width range. Its full-width BatchNorm statistics
    are the layers' own running buffers, so a trained model is evaluated exactly as before at
    full width.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"usnet.slimmable expects an nn.Module, got {type(model).__name__}")
    if is_slimmable(model):
        raise ValueError("model is already slimmable")
    if input_size is not None and example_input is None:
        param = next(model.parameters(), None)
        example_input = torch.zeros(
            tuple(int(s) for s in input_size),
            dtype=param.dtype if param is not None else None,
            device=param.device if param is not None else None,
        )
    analysis = analyze(
        model,
        width_range,
        example_input=example_input,
        ratio_ties=ratio_ties,
        fixed_outputs=fixed_outputs,
        divisor=divisor,
        leaf_modules=leaf_modules,
    )
    for name in analysis.layer_names:
        layer = make_slimmable_(model.get_submodule(name), input_averaging)
        if isinstance(layer, SlimmableBatchNorm2d):
            layer.usnet_name = name
    state = SlimmableState(
        plan=analysis.plan,
        bindings=analysis.bindings,
        arch=arch,
        input_averaging=input_averaging,
        width=analysis.plan.width_range[1],
    )
    setattr(model, STATE_ATTR, state)
    set_width(model, state.width)
    return model
