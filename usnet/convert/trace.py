"""The ``torch.export`` fallback of the converter: a graph of the same form as ``torch.fx``'s.

``torch.fx`` traces symbolically and fails on Python control flow over shapes or values
(``if x.shape[-1] > 4``, ``int(x.size(1))``). Non-strict ``torch.export`` runs the model on
example inputs and records the ATen operations it executed, each tagged with the module that
ran it. Here every run of operations of one leaf module (a slimmable layer, or a module with a
converter handler) is collapsed back into one ``call_module`` node, so the converter's handlers
see conv/norm layers as modules and the remaining ATen operations (registered in
``usnet.convert``) as functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..nn import SLIMMABLE_LAYERS
from .registry import MODULE_OPS, ConversionError, pass_through


def export_graph(
    model: nn.Module, inputs: Sequence[torch.Tensor], is_leaf: Callable[[nn.Module], bool]
) -> fx.GraphModule:
    """The ATen graph of ``model`` on ``inputs`` (non-strict ``torch.export``), with the
    operations of each leaf module call collapsed into one ``call_module`` node; its modules
    are ``model``'s own."""
    exported = torch.export.export(model, tuple(inputs), strict=False).module()
    graph = exported.graph
    modules = dict(model.named_modules())
    for node in list(graph.nodes):
        if node.op == "call_module":  # the input guards
            if not node.users:
                graph.erase_node(node)
    calls: dict[str, tuple[str, list[fx.Node]]] = {}  # one entry per call of a leaf module
    for node in graph.nodes:
        if node.op == "call_function":
            found = _leaf_call(node, modules, is_leaf)
            if found is not None:
                calls.setdefault(found[0], (found[1], []))[1].append(node)
    for owner, nodes in calls.values():
        _collapse(graph, owner, nodes)
    graph.eliminate_dead_code()
    graph.lint()
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = model.get_submodule(node.target)
        elif node.op == "get_attr":
            value = exported
            for part in node.target.split("."):
                value = getattr(value, part)
            root[node.target] = value
    return fx.GraphModule(root, graph)


def _leaf_call(node: fx.Node, modules: dict[str, nn.Module], is_leaf) -> tuple[str, str] | None:
    """(call id, module path) of the outermost leaf module on the node's module stack (a leaf's
    inner modules belong to it); export numbers repeated calls of a module ("conv@1")."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        module = modules.get(path)
        if module is not None and path and is_leaf(module):
            return key, path
    return None


def _collapse(graph: fx.Graph, owner: str, nodes: list[fx.Node]) -> None:
    inside = set(nodes)
    inputs = [a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]
    if len({*inputs}) != 1 or len(outputs) != 1:
        raise RuntimeError(
            f"module {owner!r}: its operations take {len({*inputs})} inputs and give "
            f"{len(outputs)} outputs; a leaf layer must map one tensor to one"
        )
    with graph.inserting_after(outputs[0]):
        call = graph.call_module(owner, (inputs[0],))
    call.meta = dict(outputs[0].meta)
    outputs[0].replace_all_uses_with(call)
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


class Tracer(fx.Tracer):
    def __init__(self, leaves: Sequence[type[nn.Module]]):
        super().__init__()
        self._extra_leaves = tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        kind = type(m)
        if kind in SLIMMABLE_LAYERS or kind in MODULE_OPS or isinstance(m, self._extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def export_fallback(model: nn.Module, inputs: tuple, tracer: "Tracer",
                     fx_error: Exception) -> fx.GraphModule:  # fmt: skip
    """The graph of ``model`` from non-strict ``torch.export`` when ``torch.fx`` cannot trace it
    (Python control flow over shapes), in the form the handlers expect (usnet.convert.trace)."""
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
    return kind in SLIMMABLE_LAYERS or MODULE_OPS.get(kind, pass_through) is not pass_through
