"""`analyze` (the channel plan of a plain model, which it leaves unchanged) and `slimmable`
(the conversion in place)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UsnetTypeError, UsnetValueError
from ..nn import SLIMMABLE_LAYERS, make_slimmable_
from ..nn.params import slice_parameters_
from ..state import STATE_ATTR, SlimmableState, is_slimmable, set_width
from .graph import Analysis, GraphAnalysis
from .nodes import reshape_sizes
from .registry import ChannelDim, ConversionError, load_plugins
from .trace import Tracer, export_fallback


def _find_size_attributes(model: nn.Module, tracer: fx.Tracer, analyzer: GraphAnalysis) -> None:
    """Where each constant size along channels (``analyzer.constant_sizes``) comes from: the
    integer attributes of the modules whose code ran it that hold that value are each given a
    distinct stand-in value and the model is traced again; an attribute whose stand-in appears
    in that place is the source (``self.num_heads``), and ``set_width`` will keep it at the
    active size. A size written as a literal in the code cannot follow the width: refused."""
    modules = dict(model.named_modules())
    candidates: dict[tuple[str, str], int] = {}
    for node, position, _ in analyzer.constant_sizes:
        value = reshape_sizes(node)[position]
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
        sizes = reshape_sizes(twin) if twin is not None else []
        hits = [k for k, v in stand_ins.items() if position < len(sizes) and sizes[position] == v]
        if len(hits) != 1:
            analyzer.refuse(
                node,
                f"reshapes to the constant size {reshape_sizes(node)[position]} along channels, "
                "which are fewer at a narrower width; write -1 there, compute it from the input's "
                "shape, or read it from a module attribute (self.num_heads), which usnet keeps at "
                "the active size",
            )
        if hits[0] in found:  # one attribute for two sizes: they are always equal
            analyzer.tie(found[hits[0]], dim, node)
        found[hits[0]] = dim
    analyzer.shape_attrs = [(path, attr, dim) for (path, attr), dim in found.items()]


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
    load_plugins()  # third-party layer classes of libraries the user's code has imported
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
    tracer = Tracer(leaf_modules)
    traced_by_fx = True
    try:
        gm = fx.GraphModule(model, tracer.trace(model))
    except Exception as fx_error:  # fx raises many types; try torch.export, then one clear error
        gm = export_fallback(model, inputs, tracer, fx_error)
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
