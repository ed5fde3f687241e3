"""Width as explicit state of one model: the plan, the layer bindings, and ``set_width``.

A slimmable model is an ordinary ``nn.Module`` whose slimmable layers are bound to channel groups
of its :class:`~usnet.channels.ChannelPlan`. The plan and bindings travel with the model as the
plain attribute ``model.usnet_state``; nothing is global, so any number of models coexist and each
has its own width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from .channels import ChannelPlan, Width, config_key, format_width
from .errors import UsnetTypeError, UsnetValueError
from .nn.attributes import size_attributes_of
from .nn.base import ActiveChannels, SlimmableLayer
from .nn.norm import SlimmableBatchNorm2d

Dim = tuple[str, int]
"""A channel dimension: (group name, factor). Active size = active(group) * factor."""

Channels = Union[Dim, tuple[Dim, ...]]
"""A layer's channel dimension: one :data:`Dim`, or an ordered tuple of segments (the inputs of
a concatenation), each active on a prefix of its own."""


def segments(channels: Channels) -> tuple[Dim, ...]:
    """The segments of a channel dimension (one for a plain :data:`Dim`)."""
    if isinstance(channels[0], str):
        return (channels,)  # type: ignore[return-value]
    return tuple(channels)  # type: ignore[arg-type]


def _normalized(channels: Any) -> Channels:
    """A saved channel dimension back as a Dim (one segment) or a tuple of Dims."""
    if isinstance(channels[0], str):
        return (str(channels[0]), int(channels[1]))
    found = tuple((str(g), int(f)) for g, f in channels)
    return found[0] if len(found) == 1 else found


def active_channels(channels: Channels, plan: ChannelPlan, active: Mapping[str, int],
                    device: torch.device | None = None) -> ActiveChannels:  # fmt: skip
    """The active channels of one dimension at the active group counts ``active``: a prefix for
    one segment (or when every segment but the last is full), else the index of each segment's
    active prefix at its full-width offset."""
    parts = [(plan.groups[g].size * f, active[g] * f) for g, f in segments(channels)]
    count = sum(a for _, a in parts)
    if all(full == a for full, a in parts[:-1]):
        return ActiveChannels(count)
    index, offset = [], 0
    for full, a in parts:
        index.append(torch.arange(offset, offset + a, device=device))
        offset += full
    return ActiveChannels(count, torch.cat(index))


STATE_ATTR = "usnet_state"


@dataclass
class Binding:
    """Which channel groups one slimmable layer's input and output dimensions belong to."""

    layer: str
    inputs: Channels | None  # None for "features" layers (norms): their features are their outputs
    outputs: Channels

    def to_dict(self) -> dict:
        return {"layer": self.layer, "inputs": self.inputs, "outputs": self.outputs}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Binding":
        inputs = None if d["inputs"] is None else _normalized(d["inputs"])
        return cls(str(d["layer"]), inputs, _normalized(d["outputs"]))


@dataclass
class ShapeAttribute:
    """An integer attribute of a module that the model's own code uses as a size along channels
    (``self.num_heads`` and ``self.attn_dim`` of an attention block, ``self.hidden_dim`` of
    torchvision's ViT in its reshapes): ``set_width`` keeps it at the active size of
    ``channels``, so the code runs unchanged at every width and an export holds the value of
    its width. Found by :func:`usnet.convert.analyze`."""

    module: str
    attr: str
    channels: Channels

    def to_dict(self) -> dict:
        return {"module": self.module, "attr": self.attr, "channels": self.channels}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ShapeAttribute":
        return cls(str(d["module"]), str(d["attr"]), _normalized(d["channels"]))


_LayerUpdate = tuple[nn.Module, str, nn.Module, dict[str, Any]]  # parent, child name, layer, attrs


@dataclass
class SlimmableState:
    """Everything that makes a plain model slimmable, stored on the model itself."""

    plan: ChannelPlan
    bindings: list[Binding]
    arch: dict[str, Any] | None = None  # {"name": zoo builder, "kwargs": {...}} when rebuildable
    input_averaging: bool = False
    # (1, C, H, W) of the example input the model was converted with (None: several inputs, or
    # converted before it was recorded): what profile/select/export run it at by default.
    input_size: tuple[int, ...] | None = None
    switchable_widths: list[float] = field(default_factory=list)  # switchable-BN baseline
    shape_attrs: list[ShapeAttribute] = field(default_factory=list)
    width: Width = 1.0
    _applied: tuple[int, ...] | None = field(default=None, repr=False)
    # Per channel configuration: (parent module, child name, layer, attributes set_width gives
    # it) for every bound layer. Built on first use; it holds this model's layer objects, so
    # copies and pickles drop it, and set_width rebuilds it when a layer was replaced.
    _updates: dict[tuple[int, ...], list[_LayerUpdate]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # (module, rule) of the modules with descriptive size attributes (usnet.nn.attributes); built
    # with the updates, dropped by copies and pickles like them
    _size_rules: list | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_updates"] = {}
        state["_size_rules"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_updates", {})  # states pickled before the cache existed
        self.__dict__.setdefault("input_size", None)
        self.__dict__.setdefault("shape_attrs", [])
        self.__dict__.setdefault("_size_rules", None)

    @property
    def width_range(self) -> tuple[float, float]:
        return self.plan.width_range

    @property
    def full_config(self) -> tuple[int, ...]:
        return tuple(g.size for g in self.plan.groups.values())

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "bindings": [b.to_dict() for b in self.bindings],
            "arch": self.arch,
            "input_averaging": self.input_averaging,
            "switchable_widths": list(self.switchable_widths),
            "input_size": None if self.input_size is None else list(self.input_size),
            "shape_attrs": [a.to_dict() for a in self.shape_attrs],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "SlimmableState":
        return cls(
            plan=ChannelPlan.from_dict(d["plan"]),
            bindings=[Binding.from_dict(b) for b in d["bindings"]],
            arch=d.get("arch"),
            input_averaging=bool(d.get("input_averaging", False)),
            switchable_widths=[float(w) for w in d.get("switchable_widths", [])],
            input_size=None
            if d.get("input_size") is None
            else tuple(int(v) for v in d["input_size"]),
            shape_attrs=[ShapeAttribute.from_dict(a) for a in d.get("shape_attrs", [])],
        )


def get_state(model: nn.Module) -> SlimmableState:
    """The model's slimmable state; a clear error for a model that is not slimmable."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, SlimmableState):
        raise UsnetTypeError(
            f"{type(model).__name__} is not a slimmable model: build one with usnet.models.* or "
            "convert it with usnet.slimmable(model)"
        )
    return state


def is_slimmable(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), SlimmableState)


def channel_plan(model: nn.Module) -> ChannelPlan:
    """The model's channel plan."""
    return get_state(model).plan


def get_width(model: nn.Module) -> Width:
    """The width the model currently runs at."""
    return get_state(model).width


def input_size_of(model: nn.Module, input_size: Any = None) -> tuple[int, ...]:
    """The ``(N, C, H, W)`` to profile or export ``model`` at: ``input_size`` if given (checked),
    else the example input the model was converted with (a ViT takes only its own image size),
    else ``(1, 3, 224, 224)``."""
    if input_size is not None:
        return check_input_size(input_size)
    return tuple(get_state(model).input_size or (1, 3, 224, 224))


def check_input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise UsnetValueError(
            f"input_size must be a sequence of ints like (1, 3, 224, 224), got {input_size!r}"
        ) from None
    if len(size) != 4 or min(size) < 1:
        raise UsnetValueError(f"input_size must be (N, C, H, W) with positive sizes, got {size}")
    return size


def channels_at(model: nn.Module, width: Width | None = None) -> dict[str, int]:
    """Active channels of every group at ``width`` (default: the current width)."""
    state = get_state(model)
    return state.plan.channels(state.width if width is None else width)


def set_width(model: nn.Module, width: Width) -> nn.Module:
    """Make ``model`` run at ``width``: a float in its width range, or {group: multiplier}.

    Sets the active channels of every slimmable layer and selects the BatchNorm statistics of the
    resulting channel configuration. Returns the model.
    """
    state = get_state(model)
    width = state.plan.check_width(width)
    config = state.plan.config(width)
    updates = state._updates.get(config)
    if updates is None or any(
        (parent._modules.get(name) if name else model) is not layer
        for parent, name, layer, _ in updates
    ):
        updates = state._updates[config] = _layer_updates(model, state, config)
        rebuilt = True
    else:
        rebuilt = False
    label = _describe(width, config)
    for _, _, layer, _ in updates:
        if getattr(layer, "is_calibrating", False):
            raise RuntimeError("cannot change the width of a model while it is calibrating")
    for _, _, layer, attrs in updates:
        # Plain attributes: writing the instance dict skips nn.Module.__setattr__'s
        # parameter/buffer/module bookkeeping, which made set_width cost ~1.5 ms on MobileNetV2.
        layer.__dict__.update(attrs)
        if "width_label" in attrs:  # layers that name the width in their errors
            layer.__dict__["width_label"] = label
    # Descriptive size attributes (usnet.nn.attributes), read from the layers just updated.
    if state._size_rules is None or rebuilt:
        state._size_rules = [
            (m, rule) for m in model.modules() if (rule := size_attributes_of(m)) is not None
        ]
    for module, rule in state._size_rules:
        module.__dict__.update(rule(module))
    state.width = width
    state._applied = config
    return model


def _layer_updates(
    model: nn.Module, state: SlimmableState, config: tuple[int, ...]
) -> list[_LayerUpdate]:
    """The active-channel attributes of every bound layer at one channel configuration."""
    channels = dict(zip(state.plan.groups, config))
    stats_key = None if config == state.full_config else config_key(config)
    updates: list[_LayerUpdate] = []
    shared: dict[tuple, ActiveChannels] = {}  # layers reading one concatenation share its index

    def active(dims: Channels, device: torch.device | None) -> ActiveChannels:
        key = (segments(dims), device)
        if key not in shared:
            shared[key] = active_channels(dims, state.plan, channels, device)
        return shared[key]

    for binding in state.bindings:
        parent_name, _, name = binding.layer.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = model.get_submodule(binding.layer)
        if not isinstance(layer, SlimmableLayer):
            raise UsnetTypeError(
                f"layer {binding.layer!r} is a {type(layer).__name__}, not a slimmable layer: "
                "replace a bound layer only by a slimmable one of the same kind"
            )
        ref = next(layer.parameters(), None)
        ref = next(layer.buffers(), None) if ref is None else ref
        device = None if ref is None else ref.device
        inputs = None if binding.inputs is None else active(binding.inputs, device)
        attrs = layer.active_attrs(inputs, active(binding.outputs, device), stats_key)
        updates.append((parent, name, layer, attrs))
    for shape_attr in state.shape_attrs:
        parent_name, _, name = shape_attr.module.rpartition(".")
        size = sum(channels[g] * f for g, f in segments(shape_attr.channels))
        updates.append((model.get_submodule(parent_name), name,
                        model.get_submodule(shape_attr.module), {shape_attr.attr: size}))  # fmt: skip
    return updates


def run_full_width(model: nn.Module, state: SlimmableState) -> None:
    """Every layer at its full channels (also when the width range stops below 1.0)."""
    for parent, name, layer, attrs in _layer_updates(model, state, state.full_config):
        layer.__dict__.update(attrs)
        if "width_label" in attrs:
            layer.__dict__["width_label"] = "full width"
    state._applied = state.full_config


@contextlib.contextmanager
def width(model: nn.Module, width: Width) -> Iterator[nn.Module]:
    """Run ``model`` at ``width`` inside the block, then restore the previous width."""
    previous = get_width(model)
    set_width(model, width)
    try:
        yield model
    finally:
        set_width(model, previous)


@contextlib.contextmanager
def keep_width_and_mode(model: nn.Module, *, width: Width | None = None,
                        training: bool | None = None) -> Iterator[nn.Module]:  # fmt: skip
    """Inside the block the model may change width and train/eval mode freely (``width`` and
    ``training`` set them on entry); on exit, normally or by an exception, both are restored."""
    state = get_state(model)
    previous, was_training = state.width, model.training
    try:
        if training is not None:
            model.train(training)
        if width is not None:
            set_width(model, width)
        yield model
    finally:
        set_width(model, previous)
        model.train(was_training)


def _describe(width: Width, config: tuple[int, ...]) -> str:
    return f"width {format_width(width)} (config {config_key(config)})"


def enable_switchable_bn(model: nn.Module, widths: list[float]) -> nn.Module:
    """Give every BatchNorm private affine parameters at each of ``widths`` (switchable BN of
    slimmable networks, Yu et al. 2019), for the slimmable-network baseline. Call before creating
    the optimizer; :func:`usnet.save`/:func:`usnet.load` keep them."""
    state = get_state(model)
    with keep_width_and_mode(model):
        for w in widths:
            set_width(model, w)
            for module in model.modules():
                if isinstance(module, SlimmableBatchNorm2d):
                    module.add_private_affine()
    state.switchable_widths = sorted({*state.switchable_widths, *map(float, widths)})
    return model
