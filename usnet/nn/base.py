"""The slimmable-layer interface, its registry and what every layer type says about itself.

Each slimmable layer subclasses the PyTorch layer it replaces and implements
:class:`SlimmableLayer`; ``@register_slimmable(Plain)`` on the class makes the type slimmable for
the whole library. Everything usnet needs to know about one layer type lives on its class (as
Torch-Pruning keeps all of one layer type in one pruner class): how the converter treats its
channels (``channel_role``), which of its tensors hold which channels (:meth:`channel_layout`,
for reordering), which weights are decayed (:meth:`decayed_weights`, for the optimizer), its
active attributes (:meth:`active_attrs`) and its plain export (:meth:`to_plain`).

``input_averaging`` is the seed paper's "averaging the output by input channels": the output is
scaled by ``full fan-in / active fan-in`` so that narrower inputs keep the output magnitude. It is
**off by default**, as in the US-Nets reference training configs; exported models fold the scale
into their weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class ActiveChannels:
    """The active channels of one dimension of a layer at one channel configuration.

    ``index`` is None when they are the first ``count`` channels (a prefix); otherwise it lists
    them in order (a concatenation's input whose segments are each active on a prefix of their
    own). It is computed once per configuration and cached by :func:`usnet.set_width`.
    """

    count: int
    index: Tensor | None = None

    @classmethod
    def prefix(cls, count: int) -> "ActiveChannels":
        return cls(count)


def take(tensor: Tensor, dim: int, channels: int, index: Tensor | None) -> Tensor:
    """The active channels of ``tensor`` along ``dim``: its first ``channels``, or ``index``."""
    if index is None:
        return tensor[(slice(None),) * dim + (slice(channels),)]
    return tensor.index_select(dim, index.to(tensor.device))


@dataclass(frozen=True)
class ChannelTensor:
    """One tensor of a layer that holds channels: attribute ``name``, tensor dimension ``dim``,
    on the layer's ``side`` (``"in"`` or ``"out"``; a "features" layer has only ``"out"``).
    ``grouped``: a grouped conv's weight, whose input dimension holds ``in / groups`` channels
    of each conv group. ``weight``: counts for the ``l1`` importance (conv/linear weights);
    ``scale``: counts for the ``bn`` importance (norm scales)."""

    name: str
    dim: int
    side: Literal["in", "out"]
    grouped: int = 1
    weight: bool = False
    scale: bool = False


@dataclass(frozen=True)
class ChannelLayout:
    """A layer's channel tensors, where its input's channels are (``input_dim``, for the
    ``activation`` importance), and the block size its channels must stay within (0: none)."""

    tensors: tuple[ChannelTensor, ...]
    input_dim: int | None = 1
    in_block: int = 0
    out_block: int = 0


class SlimmableLayer:
    """The interface every slimmable layer implements (a mixin next to the PyTorch layer).

    * ``channel_role``: ``"transform"`` layers map input channels to output channels of their own
      (conv, linear); ``"features"`` layers act on each channel of their input and return as many
      (norms): their binding has outputs only.
    * :meth:`init_slimmable`: set the slimmable state of a freshly converted (or built) layer.
    * :meth:`active_attrs`: the plain attributes that make the layer run at some active channels;
      :func:`usnet.set_width` caches them per channel configuration and writes them.
    * :meth:`to_plain`: the plain layer of the active shape (for :func:`usnet.export`).
    * :meth:`channel_layout`: which tensors hold its channels (for channel reordering).
    * :meth:`decayed_weights`: its parameters that get weight decay (for the optimizer).

    A layer type is made slimmable for the whole library by :func:`register_slimmable`.
    """

    channel_role: ClassVar[str] = "transform"
    is_calibrating = False  # layers with statistics calibrate (usnet.calibrate); set_width checks

    def init_slimmable(self, input_averaging: bool = False) -> None:
        raise NotImplementedError

    def active_attrs(self, inputs: ActiveChannels | None, outputs: ActiveChannels,
                     stats_key: str | None) -> dict[str, Any]:  # fmt: skip
        raise NotImplementedError

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        raise NotImplementedError

    def channel_layout(self) -> ChannelLayout | None:
        """Which of this layer's tensors hold its input and output channels, along which
        dimension (None: unknown, and :func:`usnet.reorder_channels` refuses the layer)."""
        return None

    def decayed_weights(self) -> tuple[str, ...]:
        """Names of the parameters this layer holds directly that get weight decay: matrix
        weights (conv, linear, attention projections); never norms, biases or per-channel
        scales. Called on plain layers of the registered type too (it reads plain attributes
        only), so a plain model is split the same way."""
        return ()


def copy_into(new: nn.Module, weight: Tensor, bias: Tensor | None, training: bool) -> nn.Module:
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(training)
    return new


def scaled_by(weight: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """Weight and bias times the input-averaging scale (a no-op at scale 1)."""
    if scale == 1.0:
        return weight, bias
    return weight * scale, None if bias is None else bias * scale


class PerChannelAffine(SlimmableLayer):
    """A "features" layer whose parameters are per channel (dimension 0 of ``weight``/``bias``)."""

    channel_role = "features"

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_features = self._full_features()
        self.active_index: Tensor | None = None

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_features": outputs.count, "active_index": outputs.index}

    def _active(self, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else take(tensor, 0, self.active_features, self.active_index)

    def channel_layout(self) -> ChannelLayout:
        return ChannelLayout(affine_channels(scale=False))


def affine_channels(scale: bool = True) -> tuple[ChannelTensor, ...]:
    """The per-channel ``weight`` and ``bias`` of a norm layer (``scale``: the weight counts for
    the ``bn`` importance)."""
    return (ChannelTensor("weight", 0, "out", scale=scale), ChannelTensor("bias", 0, "out"))


SLIMMABLE_LAYERS: dict[type[nn.Module], type[nn.Module]] = {}
"""Registry: plain layer type -> slimmable subclass (exact types; subclasses are refused).
Extend it with :func:`register_slimmable`."""


def register_slimmable(plain: type[nn.Module], slimmable: type[nn.Module] | None = None) -> Any:
    """Make ``plain`` layers slimmable everywhere: the converter swaps them for ``slimmable``
    (a subclass of ``plain`` implementing :class:`SlimmableLayer`), and ``set_width``, ``export``,
    reordering, the optimizer's weight decay and checkpoints handle them through that interface.

    Use it as a class decorator, ``@register_slimmable(nn.Conv2d)``, or call it,
    ``register_slimmable(Plain, Slimmable)``; either returns the slimmable class.

    The converter also needs to know how the layer treats channels: a ``"transform"`` layer
    consumes its input's channels (dimension 1, or the last for ``Linear``-like layers) and
    produces a channel group of its own; a ``"features"`` layer returns its input's channels
    (:attr:`SlimmableLayer.channel_role`). Other behaviour needs :func:`usnet.register_op`.
    """
    if not (isinstance(plain, type) and issubclass(plain, nn.Module)):
        raise TypeError(f"register_slimmable: {plain!r} is not an nn.Module class")
    if slimmable is None:
        return lambda cls: register_slimmable(plain, cls)
    if not (isinstance(slimmable, type) and issubclass(slimmable, plain)
            and issubclass(slimmable, SlimmableLayer)):  # fmt: skip
        raise TypeError(
            f"register_slimmable: {getattr(slimmable, '__name__', slimmable)!r} must subclass both "
            f"{plain.__name__} and usnet.SlimmableLayer"
        )
    if slimmable.channel_role not in ("transform", "features"):
        raise ValueError(f"{slimmable.__name__}.channel_role must be 'transform' or 'features'")
    SLIMMABLE_LAYERS[plain] = slimmable
    return slimmable


def lookup_by_class(registry: Mapping[type, T], cls: type) -> T | None:
    """The entry of the most derived class in ``cls``'s MRO that ``registry`` holds (a
    subclass, a generated slimmable subclass, inherits its base's entry), else None."""
    for base in cls.__mro__:
        if base in registry:
            return registry[base]
    return None


def slimmable_class_of(module: nn.Module) -> type[nn.Module] | None:
    """The slimmable class that speaks for ``module``: its own class if it is slimmable, else
    the slimmable counterpart registered for the nearest class in its MRO (a plain layer)."""
    if isinstance(module, SlimmableLayer):
        return type(module)
    return lookup_by_class(SLIMMABLE_LAYERS, type(module))


def make_slimmable_(module: nn.Module, input_averaging: bool = False) -> nn.Module:
    """Turn a plain layer into its slimmable subclass in place, keeping its parameter objects."""
    cls = SLIMMABLE_LAYERS.get(type(module))
    if cls is None:
        raise TypeError(f"no slimmable counterpart for {type(module).__name__}")
    module.__class__ = cls
    module.init_slimmable(input_averaging)
    return module


def is_slimmable_layer(module: nn.Module) -> bool:
    return isinstance(module, SlimmableLayer)
