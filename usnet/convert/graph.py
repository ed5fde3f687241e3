"""The analysis of one traced graph: a walk over its nodes with a union-find over channel
dimensions, read and extended by the op handlers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..channels import ChannelGroup, ChannelPlan
from ..nn import SLIMMABLE_LAYERS, SlimmableLayer
from ..state import Binding, ShapeAttribute
from .nodes import first_arg, shape_source, stack_hint, type_names
from .ops.shape import make_tuple
from .registry import (
    FUNCTION_OPS,
    METHOD_OPS,
    MODULE_OPS,
    ROLE_HANDLERS,
    ChannelDim,
    ConversionError,
)


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
            return f"function {name} at node {node.name!r}{stack_hint(node)}"
        if node.op == "call_method":
            return f"method .{node.target}() at node {node.name!r}{stack_hint(node)}"
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
        arg = first_arg(node)
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
        source = shape_source(size)
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
                handler = ROLE_HANDLERS[SLIMMABLE_LAYERS[type(module)].channel_role]
        elif node.op == "call_function":
            handler = FUNCTION_OPS.get(node.target)
            if handler is None and isinstance(node.target, type) and issubclass(node.target, tuple):
                handler = make_tuple  # a namedtuple of outputs (GoogLeNetOutputs, ...)
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
                f"channels through (supported layers: {type_names(SLIMMABLE_LAYERS)}; "
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
