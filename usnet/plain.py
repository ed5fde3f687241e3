"""Export one width of a slimmable model as a plain, standalone PyTorch model.

The exported model is a deep copy in which every slimmable layer is replaced by the plain layer of
its active shape, holding the sliced weights (with any input-averaging scale folded in) and that
width's calibrated BatchNorm statistics. It has no ``usnet_state`` and no slimmable layer; models
built from torchvision keep their torchvision classes, so e.g. a US-MobileNetV2 exported at ``w``
loads strictly into ``torchvision.models.mobilenet_v2(width_mult=w)``.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from .channels import Width
from .errors import UsnetTypeError
from .layers import SlimmableBatchNorm2d, SlimmableConv2d, SlimmableLinear, UncalibratedWidthError
from .state import STATE_ATTR, get_state, keep_width_and_mode


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
    delattr(plain, STATE_ATTR)
    for binding in state.bindings:
        layer = plain.get_submodule(binding.layer)
        _replace(plain, binding.layer, _plain_layer(layer, require_stats))
    plain.eval()
    if trace:
        plain = fx.symbolic_trace(plain)
        plain.eval()
    return plain


def _plain_layer(layer: nn.Module, require_stats: bool) -> nn.Module:
    if isinstance(layer, SlimmableConv2d):
        weight, bias = layer.active_weight_and_bias()
        new = nn.Conv2d(
            layer.active_in_channels,
            layer.active_out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.active_groups,
            bias is not None,
            layer.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
    elif isinstance(layer, SlimmableLinear):
        weight, bias = layer.active_weight_and_bias()
        new = nn.Linear(
            layer.active_in_features,
            layer.active_out_features,
            bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
    elif isinstance(layer, SlimmableBatchNorm2d):
        return _plain_bn(layer, require_stats)
    else:  # pragma: no cover - bindings only ever name slimmable layers
        raise UsnetTypeError(f"cannot export {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(layer.training)
    return new


def _plain_bn(layer: SlimmableBatchNorm2d, require_stats: bool) -> nn.BatchNorm2d:
    c = layer.active_features
    ref = layer.weight if layer.weight is not None else layer.running_mean
    placement = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = nn.BatchNorm2d(c, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                         **placement)  # fmt: skip
    with torch.no_grad():
        if layer.affine:
            weight, bias = layer.active_affine()
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        if layer.track_running_stats:
            stats = layer.current_stats()
            if stats is None and require_stats:
                raise UncalibratedWidthError(
                    f"cannot export {layer.width_label}: BatchNorm {layer.usnet_name!r} is not "
                    "calibrated there; run usnet.calibrate(model, data, widths=[...]) first"
                )
            if stats is not None:
                new.running_mean.copy_(stats[0][:c])
                new.running_var.copy_(stats[1][:c])
                new.num_batches_tracked.fill_(max(1, int(layer.num_batches_tracked)))
    return new


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
