"""Parameters used directly in a model's forward code along channels (ConvNeXt's layer scale).

``self.layer_scale * x`` reads a full-width parameter that must follow ``x``'s active channels.
The module that owns it keeps its parameter (same ``state_dict``) but its class is swapped for a
subclass whose attribute lookup returns the active channels of that parameter: PyTorch looks
parameters up through ``nn.Module.__getattr__``, which the subclass extends. The subclasses are
made on demand, one per owner class, and are importable by name from this module (so pickled
models and copies find them again).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from .base import ActiveChannels, ChannelLayout, ChannelTensor, SlimmableLayer, take

_PREFIX = "Sliced__"
_DOT = "_o_"  # '.' is not allowed in a class name that pickle looks up by attribute


class SlicedParameters(SlimmableLayer):
    """Mixin of the generated owner classes: the parameters named in ``usnet_sliced``
    (``{name: tensor dim of its channels}``) read as their active channels."""

    channel_role = "features"

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.__dict__["usnet_active"] = None  # None: full width

    def active_attrs(self, inputs, outputs: ActiveChannels, stats_key=None) -> dict[str, Any]:
        return {"usnet_active": outputs}

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        sliced = self.__dict__.get("usnet_sliced")
        active = self.__dict__.get("usnet_active")
        if sliced and active is not None and name in sliced:
            return take(value, sliced[name], active.count, active.index)
        return value

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        """This module as its original class, holding the active channels of its parameters."""
        sliced = self.__dict__.pop("usnet_sliced")
        active = self.__dict__.pop("usnet_active")
        for name, dim in sliced.items():
            full = self._parameters[name]
            part = full if active is None else take(full, dim, active.count, active.index)
            self._parameters[name] = nn.Parameter(part.detach().clone(), full.requires_grad)
        self.__class__ = self.__class__.__bases__[1]
        return self

    def channel_layout(self) -> ChannelLayout:
        sliced = self.__dict__.get("usnet_sliced", {})
        return ChannelLayout(
            tuple(ChannelTensor(n, d, "out") for n, d in sliced.items()), input_dim=None
        )


def slice_parameters_(module: nn.Module, sliced: dict[str, int]) -> nn.Module:
    """Make ``module``'s parameters ``sliced`` (``{name: channel dim}``) follow the active
    channels set by :func:`usnet.set_width`, in place."""
    module.__class__ = sliced_class(type(module))
    module.__dict__["usnet_sliced"] = dict(sliced)
    module.init_slimmable()
    return module


_CLASSES: dict[type, type] = {}


def sliced_class(owner: type[nn.Module]) -> type[nn.Module]:
    cls = _CLASSES.get(owner)
    if cls is None:
        path = f"{owner.__module__}.{owner.__qualname__}"
        name = _PREFIX + path.replace(".", _DOT)
        cls = type(name, (SlicedParameters, owner), {"__module__": __name__, "__qualname__": name})
        _CLASSES[owner] = cls
    return cls


def __getattr__(name: str) -> type:
    """Unpickling looks the generated classes up here by name: rebuild them."""
    if not name.startswith(_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, _, qualname = name[len(_PREFIX) :].replace(_DOT, ".").rpartition(".")
    owner: Any = None
    parts = module_name.split(".")
    # the owner's module is the longest importable prefix; the rest is the class's qualname
    for i in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in (*parts[i:], qualname):
            owner = getattr(owner, attr)
        break
    if not (isinstance(owner, type) and issubclass(owner, nn.Module)):
        raise AttributeError(f"cannot rebuild {name!r}")
    return sliced_class(owner)


def is_tensor_attr(root: nn.Module, target: str) -> bool:
    try:
        value = root.get_parameter(target)
    except AttributeError:
        return False
    return isinstance(value, Tensor) and not isinstance(value, torch.nn.UninitializedParameter)
