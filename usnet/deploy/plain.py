"""Export one width of a slimmable model as a plain, standalone PyTorch model.

The exported model is a deep copy in which every slimmable layer is replaced by the plain layer of
its active shape, holding the sliced weights (with any input-averaging scale folded in) and that
width's calibrated BatchNorm statistics. It has no ``usnet_state`` and no slimmable layer; models
built from torchvision keep their torchvision classes, so e.g. a US-MobileNetV2 exported at ``w``
loads strictly into ``torchvision.models.mobilenet_v2(width_mult=w)``.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from ..channels import Width
from ..state import STATE_ATTR, get_state, keep_width_and_mode


def export(
    model: nn.Module, width: Width | None = None, *, require_stats: bool = True, trace: bool = False
) -> nn.Module:
    """A plain model equal to ``model`` at ``width`` (default: its current width), in eval mode.

    Args:
        require_stats: raise :class:`UncalibratedWidthError` if a BatchNorm layer has no statistics
            for the width (with False, such layers get fresh default statistics: for profiling).
        trace: return a ``torch.fx.GraphModule`` whose modules are all ``torch.nn`` classes (no
            class of the original model's code is needed to run or unpickle it).
    """
    state = get_state(model)
    with keep_width_and_mode(model, width=width):
        plain = copy.deepcopy(model)
    if STATE_ATTR in vars(plain):  # a GraphModule's deep copy does not carry it
        delattr(plain, STATE_ATTR)
    for binding in state.bindings:
        layer = plain.get_submodule(binding.layer)
        new = layer.to_plain(require_stats)
        if new is not layer:  # owners of sliced parameters (the root too) change in place
            _replace(plain, binding.layer, new)
    plain.eval()
    if trace:
        plain = _images_only(fx.symbolic_trace(plain))
        plain.eval()
    return plain


def _images_only(module: fx.GraphModule) -> fx.GraphModule:
    """Optional arguments after the images (timm's ``attn_mask``, ``is_causal``) become their
    defaults in the graph: the traced model takes images only, as deployment formats expect."""
    inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
    for node in inputs[1:]:
        if not node.args:
            continue  # a required argument: kept
        default = node.args[0]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: default if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: default if n is node else n)
        module.graph.erase_node(node)
    module.recompile()
    return module


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
