"""The ONNX graph of a switchable artifact: every entry's network in one file, weights stored once.

Layout (opset 17)::

    inputs   input (N, C, H, W) float32 · width () float32 · entry () int64, optional (default -1)
    outputs  logits (N, classes) · width () float32: the width run · entry () int64: its index

The main graph holds the *shared* weights: for every weight that some entry uses as a prefix
slice (``w[:out, :in]``) of the slimmable model's full tensor, one initializer as wide as the
widest entry needs. Each entry is the subgraph that ``torch.onnx.export`` writes for the plain
model of that width, with every such weight replaced by a ``Slice`` of the shared initializer;
what is not a slice (BatchNorm running statistics, which are calibrated per width, or a tensor
that is no prefix) stays inside the entry. With ``fuse_bn`` each Conv -> BatchNormalization pair
becomes a Conv whose weight is ``Slice(shared) * scale`` and whose bias is the folded bias, with
``scale``/bias of that entry's own statistics, computed as ``torch.fx``'s fusion computes them.

onnxruntime folds ``Slice``/``Mul`` of constant initializers when it creates the session, inside
``If`` subgraphs too, so each entry runs the same constant-weight convolutions (and the same
NCHWc layout) as its standalone export; the price is memory: the session holds every entry's
weights, as separate sessions of the standalone files would.

Selection, computed in the main graph from the sorted widths of the uniform entries ``W``::

    index = max(0, count(W <= width) - 1)     # the widest entry at most the requested width
    index = min(entry, K - 1) if entry >= 0   # an explicit entry index wins

so a width below the narrowest entry, a negative width and NaN (every comparison with NaN is
false) run the narrowest entry, and a width above the widest runs the widest. A nest of ``If``
nodes, ``ceil(log2 K)`` deep, runs only the selected entry.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UsnetValueError

ONNX_OPSET = 17
SHARED_PREFIX = "shared/"
ENTRY_INPUT = "entry"
WIDTH_INPUT = "width"


@dataclass
class EntryGraph:
    """One entry's network as ``torch.onnx.export`` wrote it (BatchNorm kept as nodes, weights
    named by their ``state_dict`` names), and whether it is a uniform width."""

    graph: "onnx.GraphProto"  # noqa: F821 (onnx is imported where needed)
    width: float | None  # None: a non-uniform entry (reached by its index only)


def export_entry(module: nn.Module, example: Tensor) -> "onnx.ModelProto":  # noqa: F821
    """``module`` as ONNX with nothing folded: BatchNormalization stays a node and every weight
    keeps its ``state_dict`` name, so that the switchable graph can share it across entries."""
    import onnx

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.enable_grad():  # as usnet.deploy.serialize: no fused attention kernel
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              training=torch.onnx.TrainingMode.PRESERVE,
                              do_constant_folding=False)  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


@dataclass
class SharingReport:
    """How the entries' weights are stored: bytes shared across entries and bytes per entry."""

    shared_bytes: int
    entry_bytes: list[int]
    unshared: list[str]  # weights that matched no prefix of a full tensor (stored per entry)

    def to_dict(self) -> dict:
        return {"shared_bytes": self.shared_bytes, "entry_bytes": self.entry_bytes,
                "unshared_weights": self.unshared[:20]}  # fmt: skip


def build_switchable(
    entries: Sequence[EntryGraph],
    full: Mapping[str, Tensor],
    *,
    fuse_bn: bool,
) -> tuple["onnx.ModelProto", SharingReport]:  # noqa: F821
    """One ONNX model running any of ``entries`` (uniform ones first, sorted by width), sharing
    every weight that equals a prefix slice of the tensor of the same name in ``full``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    uniform = [e.width for e in entries if e.width is not None]
    if uniform != sorted(uniform) or any(e.width is not None for e in entries[len(uniform) :]):
        raise ValueError("uniform entries must come first, sorted by width")
    values = [{t.name: numpy_helper.to_array(t) for t in e.graph.initializer} for e in entries]
    shared_shape = _shared_shapes(values, full)
    shared = {name: np.ascontiguousarray(full[name].detach().cpu().numpy()[_prefix(shape)])
              for name, shape in shared_shape.items()}  # fmt: skip
    branches, entry_bytes, unshared = [], [], set()
    for index, (entry, vals) in enumerate(zip(entries, values)):
        graph, local_bytes, missed = _entry_branch(
            entry.graph, vals, shared, f"e{index}/", fuse_bn=fuse_bn
        )
        branches.append(graph)
        entry_bytes.append(local_bytes)
        unshared.update(missed)
    used = {i for b in branches for n in b.node for i in n.input}
    shared = {n: a for n, a in shared.items() if SHARED_PREFIX + n in used}  # BN folded away
    first = entries[0].graph
    logits_type = first.output[0].type
    for e in entries[1:]:
        if e.graph.output[0].type.tensor_type.shape != logits_type.tensor_type.shape:
            raise UsnetValueError(
                "the entries' outputs differ in shape; a switchable artifact needs every width "
                "to give logits of one shape"
            )
    inits = [numpy_helper.from_array(a, SHARED_PREFIX + n) for n, a in shared.items()]
    inits += [numpy_helper.from_array(np.zeros(d, np.int64), zeros(d))
              for d in sorted({a.ndim for a in shared.values()})]  # fmt: skip
    k = len(entries)
    # Only non-uniform entries need the optional input `entry` (onnxruntime warns on every
    # session of a graph with an overridable initializer, so files without them have none).
    by_entry_input = len(uniform) < k
    if k < 2:
        raise ValueError("a switchable graph needs at least two entries")
    scalar = []
    inputs = [first.input[0], helper.make_tensor_value_info(WIDTH_INPUT, TensorProto.FLOAT, scalar)]
    for index, (entry, branch) in enumerate(zip(entries, branches)):
        width = math.nan if entry.width is None else entry.width
        branch.node.extend([_constant(np.array(width, np.float32), f"{branch.name}/width_run"),
                            _constant(np.array(index, np.int64), f"{branch.name}/entry_run")])  # fmt: skip
        branch.output.extend([
            helper.make_tensor_value_info(f"{branch.name}/width_run", TensorProto.FLOAT, scalar),
            helper.make_tensor_value_info(f"{branch.name}/entry_run", TensorProto.INT64, scalar),
        ])  # fmt: skip
    outputs = [helper.make_value_info("logits", logits_type),
               helper.make_tensor_value_info("width_run", TensorProto.FLOAT, scalar),
               helper.make_tensor_value_info("entry_run", TensorProto.INT64, scalar)]  # fmt: skip
    if by_entry_input:
        # The entry's index, then a tree on it: min(entry, K - 1) for entry >= 0, else the
        # number of uniform entries beyond the first at most the width.
        inputs.append(helper.make_tensor_value_info(ENTRY_INPUT, TensorProto.INT64, scalar))
        inits += [
            numpy_helper.from_array(np.array(-1, np.int64), ENTRY_INPUT),  # its default
            numpy_helper.from_array(np.array(uniform[1:] or [math.inf], np.float32), "select/widths"),
            numpy_helper.from_array(np.array(0, np.int64), "select/zero"),
            numpy_helper.from_array(np.array(k - 1, np.int64), "select/last"),
        ]  # fmt: skip
        nodes = [
            helper.make_node("LessOrEqual", ["select/widths", WIDTH_INPUT], ["select/le"]),
            helper.make_node("Cast", ["select/le"], ["select/le_int"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["select/le_int"], ["select/by_width"], keepdims=0),
            helper.make_node("GreaterOrEqual", [ENTRY_INPUT, "select/zero"], ["select/has_entry"]),
            helper.make_node("Min", [ENTRY_INPUT, "select/last"], ["select/by_entry"]),
            helper.make_node("Where", ["select/has_entry", "select/by_entry", "select/by_width"],
                             ["select/index"]),
        ]  # fmt: skip
        key, thresholds = "select/index", list(range(k))
    else:
        # A tree on the width itself: the fewest nodes run before the entry's own.
        nodes, key, thresholds = [], WIDTH_INPUT, uniform
    nodes += _dispatch(branches, 0, k - 1, [o.name for o in outputs], key, thresholds, outputs)
    graph = helper.make_graph(nodes, "usnet_switchable", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="usnet")  # fmt: skip
    model.ir_version = min(model.ir_version, 8)  # what onnxruntime 1.17+ reads
    onnx.checker.check_model(model, full_check=True)
    report = SharingReport(
        shared_bytes=sum(a.nbytes for a in shared.values()),
        entry_bytes=entry_bytes,
        unshared=sorted(unshared),
    )
    return model, report


OUTPUT_NAMES = ("logits", "width_run", "entry_run")
"""The outputs of a switchable ONNX file: logits, the width run (NaN for a non-uniform entry) and
the index of the entry run."""


def zeros(ndim: int) -> str:
    """The main graph's int64 zeros of length ``ndim`` (every Slice's starts)."""
    return f"slice/zeros{ndim}"


def _prefix(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


def _shared_shapes(values: Sequence[Mapping[str, np.ndarray]], full: Mapping[str, Tensor]):
    """Per full tensor name: the smallest prefix that holds every entry's slice of it (entries
    whose tensor is not bitwise a prefix slice of the full one keep theirs)."""
    shapes: dict[str, tuple[int, ...]] = {}
    arrays = {n: t.detach().cpu().numpy() for n, t in full.items()}
    for vals in values:
        for name, value in vals.items():
            source = arrays.get(name)
            if not _is_prefix(value, source):
                continue
            old = shapes.get(name, (0,) * value.ndim)
            shapes[name] = tuple(max(a, b) for a, b in zip(old, value.shape))
    return shapes


def _is_prefix(value: np.ndarray, source: np.ndarray | None) -> bool:
    if source is None or source.dtype != value.dtype or source.ndim != value.ndim:
        return False
    if any(v > s for v, s in zip(value.shape, source.shape)) or value.size == 0:
        return False
    return bool(np.array_equal(source[_prefix(value.shape)], value))


def _entry_branch(graph, values, shared, prefix: str, *, fuse_bn: bool):
    """The entry's graph as an ``If`` branch: names prefixed, shared weights sliced from the
    outer scope, BatchNorm folded if ``fuse_bn``. Returns (graph, bytes it stores, weights that
    could not be shared)."""
    from onnx import helper, numpy_helper

    rename = {v: prefix + v for v in _graph_names(graph) if v != "input"}
    nodes, inits, missed = [], [], []
    consts = {}  # name in the branch -> numpy value (for folding BN)
    for name, value in values.items():
        local = rename[name]
        consts[local] = value
        source = shared.get(name)
        if source is not None and _is_prefix(value, source):
            # A Slice even where the entry takes the whole tensor: onnxruntime folds it into a
            # constant of this subgraph, which its Conv prepacks (an outer-scope initializer
            # used directly is not prepacked into the NCHWc layout, and runs slower).
            ends = local + ":ends"
            inits.append(numpy_helper.from_array(np.array(value.shape, np.int64), ends))
            nodes.append(helper.make_node("Slice", [SHARED_PREFIX + name, zeros(value.ndim), ends],
                                          [local]))  # fmt: skip
        else:
            inits.append(numpy_helper.from_array(value, local))
            if value.size > 1 and name.rsplit(".", 1)[-1] in ("weight",):
                missed.append(name)
    body = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (attr.GRAPH, attr.GRAPHS):
                raise UsnetValueError(
                    f"the exported graph has a control-flow node ({node.op_type}); a switchable "
                    "artifact needs plain feed-forward entries"
                )
        new = helper.make_node(
            node.op_type,
            [rename.get(i, i) if i else "" for i in node.input],
            [rename.get(o, o) for o in node.output],
            name=prefix + (node.name or node.output[0]),
            domain=node.domain or None,
        )
        new.attribute.extend(node.attribute)
        body.append(new)
    for node in body:  # the exporter writes equal tensors once, the others as Identity of it
        if node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    body, inits, nodes = _fold_batchnorm(body, inits, nodes, consts, {rename[graph.output[0].name]},
                                         fx_formula=fuse_bn)  # fmt: skip
    output = helper.make_value_info(rename[graph.output[0].name], graph.output[0].type)
    branch = helper.make_graph(nodes + body, prefix.rstrip("/"), [], [output], initializer=inits)
    stored = sum(numpy_helper.to_array(t).nbytes for t in inits)
    return branch, stored, missed


def _graph_names(graph) -> set[str]:
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(i for i in node.input if i)
        names.update(node.output)
    names.update(o.name for o in graph.output)
    return names


def fold_scale_bias(gamma, beta, mean, var, eps, conv_b, *, fx: bool):
    """(scale, bias) folding a BatchNorm into the conv before it: ``w * scale``, bias. As
    ``torch.fx.experimental.optimization.fuse`` computes them (``fx``: ``gamma * rsqrt(var +
    eps)``) or as ``torch.onnx.export``'s eval peephole does (``gamma / sqrt(var + eps)``), so
    that an entry equals the standalone export it is checked against, to the last bit."""
    if fx:
        rsqrt = torch.rsqrt(var + eps)
        b = torch.zeros_like(mean) if conv_b is None else conv_b
        return (gamma * rsqrt).numpy(), ((b - mean) * rsqrt * gamma + beta).numpy()
    scale = gamma.div(torch.sqrt(var + eps))
    if conv_b is None:
        return scale.numpy(), beta.sub(mean.mul(scale)).numpy()
    return scale.numpy(), beta.add(conv_b.sub(mean).mul(scale)).numpy()


def _fold_batchnorm(body, inits, slicing, consts, graph_outputs, *, fx_formula: bool):
    """Conv -> BatchNormalization becomes Conv(x, Slice(w) * scale, folded bias), the entry's
    own statistics folded as :func:`fold_scale_bias` says."""
    from onnx import helper, numpy_helper

    users: dict[str, int] = {}
    for node in body:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    producer = {o: n for n in body for o in n.output}
    drop, out = set(), []
    for node in body:
        if node.op_type != "BatchNormalization":
            continue
        conv = producer.get(node.input[0])
        stats = [consts.get(i) for i in node.input[1:5]]
        if conv is None or conv.op_type != "Conv" or users.get(conv.output[0]) != 1:
            continue
        if any(s is None for s in stats) or conv.input[1] not in consts:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (torch.from_numpy(np.array(s)) for s in stats)
        w = consts[conv.input[1]]
        bias = consts.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        conv_b = None if bias is None else torch.from_numpy(np.array(bias))
        scale, folded_b = fold_scale_bias(gamma, beta, mean, var, eps, conv_b, fx=fx_formula)
        base = node.output[0]
        scale_name, w_name, b_name = base + ":scale", base + ":weight", base + ":bias"
        inits += [
            numpy_helper.from_array(scale.reshape((-1,) + (1,) * (w.ndim - 1)), scale_name),
            numpy_helper.from_array(folded_b, b_name),
        ]
        slicing.append(helper.make_node("Mul", [conv.input[1], scale_name], [w_name]))
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, w_name, b_name])
        conv.output[0] = node.output[0]
        drop.add(id(node))
    out = [node for node in body if id(node) not in drop]
    while True:  # Identity nodes that only fed a folded BatchNorm
        used = {i for n in out for i in n.input} | set(graph_outputs)
        dead = {id(n) for n in out if n.op_type == "Identity" and n.output[0] not in used}
        if not dead:
            break
        out = [n for n in out if id(n) not in dead]
    kept = []
    for node in reversed(slicing):  # Mul nodes come after the Slice nodes they read
        if any(o in used for o in node.output):
            kept.append(node)
            used.update(node.input)
    inits = [t for t in inits if t.name in used]
    return out, inits, kept[::-1]


def _constant(value: np.ndarray, name: str):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))


def _dispatch(branches, lo: int, hi: int, outputs: list[str], key: str, thresholds, types) -> list:
    """Nodes setting ``outputs`` to those of ``branches[i]`` for the ``i`` in ``lo..hi`` (``lo <
    hi``) with ``thresholds[i] <= key < thresholds[i + 1]`` (NaN: ``lo``): a binary tree of
    ``If`` nodes, ``ceil(log2(hi - lo + 1))`` deep."""
    from onnx import helper

    mid = (lo + hi + 1) // 2
    tag = f"{lo}_{hi}"
    threshold = np.array(thresholds[mid], np.float32 if key == WIDTH_INPUT else np.int64)
    parts = []
    for a, b in ((mid, hi), (lo, mid - 1)):
        if a == b:
            parts.append(branches[a])
            continue
        names = [f"{o}/{a}_{b}" for o in outputs]
        nodes = _dispatch(branches, a, b, names, key, thresholds, types)
        sub_outputs = [helper.make_value_info(n, t.type) for n, t in zip(names, types)]
        parts.append(helper.make_graph(nodes, f"select_{a}_{b}", [], sub_outputs))
    return [
        _constant(threshold, f"select/t{tag}"),
        helper.make_node("GreaterOrEqual", [key, f"select/t{tag}"], [f"select/ge{tag}"]),
        helper.make_node(
            "If", [f"select/ge{tag}"], outputs, then_branch=parts[0], else_branch=parts[1]
        ),  # fmt: skip
    ]


def entry_model(model, index: int):
    """Entry ``index`` of a switchable model as a model of its own (input -> logits), reading
    the same shared weights: what its ``If`` branch runs, without the dispatch."""
    from onnx import helper

    branch = _find_branch(model.graph, f"e{index}")
    if branch is None:
        raise UsnetValueError(f"the switchable graph has no entry {index}")
    logits = branch.output[0].name
    rename = {logits: "logits"}
    nodes = []
    for node in branch.node:
        if any(o.endswith(("/width_run", "/entry_run")) for o in node.output):
            continue
        new = helper.make_node(node.op_type, [rename.get(i, i) for i in node.input],
                               [rename.get(o, o) for o in node.output], name=node.name,
                               domain=node.domain or None)  # fmt: skip
        new.attribute.extend(node.attribute)
        nodes.append(new)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used] + list(branch.initializer)
    graph = helper.make_graph(nodes, branch.name, [model.graph.input[0]],
                              [helper.make_value_info("logits", branch.output[0].type)],
                              initializer=inits)  # fmt: skip
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="usnet")
    out.ir_version = model.ir_version
    return out


def _find_branch(graph, name: str):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                if attr.g.name == name:
                    return attr.g
                found = _find_branch(attr.g, name)
                if found is not None:
                    return found
    return None
