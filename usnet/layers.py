"""Slimmable layers: drop-in subclasses of the PyTorch layers that run on a prefix of their channels.

Each layer keeps the parameters (names, full-width shapes) of the layer it subclasses, so a
slimmable model's ``state_dict`` is that of the plain model. The active channel counts are plain
attributes that :func:`usnet.set_width` sets for a whole model; a layer used on its own can have
them set directly. At the active counts a layer computes exactly what a plain layer of that shape
holding the first channels of its weights would compute.

``input_averaging`` is the seed paper's "averaging the output by input channels": the output is
scaled by ``full fan-in / active fan-in`` so that narrower inputs keep the output magnitude. It is
**off by default**, as in the US-Nets reference training configs; exported models fold the scale
into their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn_stats import (
    Calibration,
    WidthStats,
    affine_normalize,
    global_batch_stats,
    stats_are_set,
    world_size,
)
from .bn_stats import cpu_batch_stats as _cpu_batch_stats  # a module global: tests swap it
from .errors import UsnetError


class UncalibratedWidthError(UsnetError, RuntimeError):
    """Eval-mode forward at a width whose BatchNorm statistics were never calibrated."""


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


class SlimmableLayer:
    """The interface every slimmable layer implements (a mixin next to the PyTorch layer).

    * ``channel_role``: ``"transform"`` layers map input channels to output channels of their own
      (conv, linear); ``"features"`` layers act on each channel of their input and return as many
      (norms): their binding has outputs only.
    * :meth:`init_slimmable`: set the slimmable state of a freshly converted (or built) layer.
    * :meth:`active_attrs`: the plain attributes that make the layer run at some active channels;
      :func:`usnet.set_width` caches them per channel configuration and writes them.
    * :meth:`to_plain`: the plain layer of the active shape (for :func:`usnet.export`).

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


def _copy_into(new: nn.Module, weight: Tensor, bias: Tensor | None, training: bool) -> nn.Module:
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(training)
    return new


def _scaled(weight: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """Weight and bias times the input-averaging scale (a no-op at scale 1)."""
    if scale == 1.0:
        return weight, bias
    return weight * scale, None if bias is None else bias * scale


class _SlimmableConvNd(SlimmableLayer):
    """A convolution (standard, grouped or depthwise) running on its first channels.

    A depthwise conv (``groups == in_channels``) keeps ``groups == active_in_channels``; any other
    grouped conv keeps its group count, so its active channels must stay divisible by ``groups``
    (the channel plan's divisors guarantee that).
    """

    def __init__(self, *args, input_averaging: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable(input_averaging)

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_in_channels = self.in_channels
        self.active_out_channels = self.out_channels
        self.active_in_index: Tensor | None = None  # None: a prefix (see ActiveChannels)
        self.active_out_index: Tensor | None = None
        self.input_averaging = input_averaging

    _init_slimmable = init_slimmable

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_in_channels": inputs.count, "active_out_channels": outputs.count,
                "active_in_index": inputs.index, "active_out_index": outputs.index}  # fmt: skip

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        weight, bias = self.active_weight_and_bias()
        new = self._plain_type(
            self.active_in_channels, self.active_out_channels, self.kernel_size, self.stride,
            self.padding, self.dilation, self.active_groups, bias is not None, self.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        return _copy_into(new, weight, bias, self.training)

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def active_groups(self) -> int:
        return self.active_in_channels if self.is_depthwise else self.groups

    def active_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight (and bias) of the plain conv this layer equals at its active channels."""
        cin, cout, groups = self.active_in_channels, self.active_out_channels, self.active_groups
        if cin % groups or cout % groups:
            raise ValueError(
                f"{type(self).__name__}: {cin} input / {cout} output channels are not divisible "
                f"by {groups} groups"
            )
        out_index = getattr(self, "active_out_index", None)  # absent in modules pickled before it
        weight = take(self.weight, 0, cout, out_index)
        if (
            self.is_depthwise
        ):  # one input channel per output channel: the input index is the output's
            weight = weight[:, :1]
        else:
            weight = take(weight, 1, cin // groups, getattr(self, "active_in_index", None))
        bias = None if self.bias is None else take(self.bias, 0, cout, out_index)
        return _scaled(weight, bias, self.averaging_scale())

    def averaging_scale(self) -> float:
        if not self.input_averaging:
            return 1.0
        return (self.in_channels / self.groups) / (self.active_in_channels / self.active_groups)

    def forward(self, input: Tensor) -> Tensor:
        spatial = len(self.kernel_size)
        if input.dim() < spatial + 1 or input.shape[-spatial - 1] != self.active_in_channels:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.active_in_channels} active input channels, "
                f"got input of shape {tuple(input.shape)}"
            )
        weight, bias = self.active_weight_and_bias()
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return self._functional(
            input, weight, bias, self.stride, padding, self.dilation, self.active_groups
        )

    def extra_repr(self) -> str:
        active = f", active={self.active_in_channels}->{self.active_out_channels}"
        return super().extra_repr() + active + (", input_averaging" if self.input_averaging else "")


class SlimmableConv2d(_SlimmableConvNd, nn.Conv2d):
    """``nn.Conv2d`` (standard, grouped or depthwise) running on its first channels.

    A depthwise conv (``groups == in_channels``) keeps ``groups == active_in_channels``; any other
    grouped conv keeps its group count, so its active channels must stay divisible by ``groups``
    (the channel plan's divisors guarantee that).
    """

    _plain_type = nn.Conv2d
    _functional = staticmethod(F.conv2d)


class SlimmableConv1d(_SlimmableConvNd, nn.Conv1d):
    """``nn.Conv1d`` on ``(N, C, L)``, like :class:`SlimmableConv2d`."""

    _plain_type = nn.Conv1d
    _functional = staticmethod(F.conv1d)


class SlimmableLinear(SlimmableLayer, nn.Linear):
    """``nn.Linear`` running on its first input and output features."""

    def __init__(self, *args, input_averaging: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable(input_averaging)

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_in_features = self.in_features
        self.active_out_features = self.out_features
        self.active_in_index: Tensor | None = None  # None: a prefix (see ActiveChannels)
        self.active_out_index: Tensor | None = None
        self.input_averaging = input_averaging

    _init_slimmable = init_slimmable

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_in_features": inputs.count, "active_out_features": outputs.count,
                "active_in_index": inputs.index, "active_out_index": outputs.index}  # fmt: skip

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        weight, bias = self.active_weight_and_bias()
        new = nn.Linear(self.active_in_features, self.active_out_features, bias is not None,
                        device=weight.device, dtype=weight.dtype)  # fmt: skip
        return _copy_into(new, weight, bias, self.training)

    def averaging_scale(self) -> float:
        return self.in_features / self.active_in_features if self.input_averaging else 1.0

    def active_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        out_index = getattr(self, "active_out_index", None)  # absent in modules pickled before it
        weight = take(self.weight, 0, self.active_out_features, out_index)
        weight = take(weight, 1, self.active_in_features, getattr(self, "active_in_index", None))
        bias = (
            None if self.bias is None else take(self.bias, 0, self.active_out_features, out_index)
        )
        return _scaled(weight, bias, self.averaging_scale())

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[-1] != self.active_in_features:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.active_in_features} active input features, "
                f"got input of shape {tuple(input.shape)}"
            )
        weight, bias = self.active_weight_and_bias()
        return F.linear(input, weight, bias)

    def extra_repr(self) -> str:
        active = f", active={self.active_in_features}->{self.active_out_features}"
        return super().extra_repr() + active + (", input_averaging" if self.input_averaging else "")


class SlimmableBatchNorm2d(SlimmableLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on its first channels, with separate running statistics per width.

    * Training mode normalizes with batch statistics and updates no running statistics: running
      statistics gathered across changing widths would describe no width.
    * Eval mode uses the statistics calibrated for the model's current channel configuration. The
      full-width configuration keeps them in the layer's own ``running_mean``/``running_var``
      buffers (so a pretrained plain model works at full width as it is, and the state_dict is that
      of a plain model); every other configuration has an entry in ``width_stats``, keyed by
      ``stats_key``. A configuration never calibrated raises :class:`UncalibratedWidthError`.
    * Calibration (:func:`usnet.calibrate`) normalizes with batch statistics and accumulates their
      cumulative average (PyTorch's ``momentum=None``) into fresh statistics for the configuration,
      whatever the layer's own ``momentum`` and ``training`` flags say.
    """

    channel_role = "features"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable()

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_features = self.num_features
        self.active_index: Tensor | None = None  # None: a prefix (see ActiveChannels)
        self.stats_key: str | None = None  # None: the full-width configuration (own buffers)
        self.width_label = "full width"
        self.width_stats = WidthStats()
        self._calibration: Calibration | None = None  # while calibrating
        self.usnet_name = ""
        self._own_stats_cache: tuple | None = None  # see _own_stats_set
        # Switchable BN (slimmable-network baseline): private affine parameters per configuration.
        self.private_affine: nn.ParameterDict | None = None
        # SyncBN (usnet.distributed.convert_sync_batchnorm): training-mode batch statistics over
        # all ranks of process_group (None: the default group) instead of this rank's batch.
        self.sync_bn = False
        self.process_group = None

    _init_slimmable = init_slimmable

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_features": outputs.count, "active_index": outputs.index,
                "stats_key": stats_key, "width_label": ""}  # fmt: skip

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        c = self.active_features
        ref = self.weight if self.weight is not None else self.running_mean
        placement = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = nn.BatchNorm2d(c, self.eps, self.momentum, self.affine, self.track_running_stats,
                             **placement)  # fmt: skip
        with torch.no_grad():
            if self.affine:
                weight, bias = self.active_affine()
                new.weight.copy_(weight)
                new.bias.copy_(bias)
            if self.track_running_stats:
                stats = self.current_stats()
                if stats is None and require_stats:
                    raise UncalibratedWidthError(
                        f"cannot export {self.width_label}: BatchNorm {self.usnet_name!r} is not "
                        "calibrated there; run usnet.calibrate(model, data, widths=[...]) first"
                    )
                if stats is not None:
                    new.running_mean.copy_(self._take(stats[0]))
                    new.running_var.copy_(self._take(stats[1]))
                    new.num_batches_tracked.fill_(max(1, int(self.num_batches_tracked)))
        return new

    def _take(self, tensor: Tensor) -> Tensor:
        """The active channels of a per-channel tensor of full size (a configuration's own
        statistics, already of the active size, are returned as they are)."""
        if tensor.shape[0] == self.active_features:
            return tensor
        return take(tensor, 0, self.active_features, getattr(self, "active_index", None))

    # -- affine parameters -----------------------------------------------------------------------
    def add_private_affine(self) -> None:
        """Give the current configuration its own weight and bias (switchable BN), initialized
        from the shared ones; the full-width configuration keeps the layer's own."""
        if self.stats_key is None or not self.affine:
            return
        if self.private_affine is None:
            self.private_affine = nn.ParameterDict()
        weight, bias = self._take(self.weight), self._take(self.bias)
        self.private_affine["weight_" + self.stats_key] = nn.Parameter(weight.detach().clone())
        self.private_affine["bias_" + self.stats_key] = nn.Parameter(bias.detach().clone())

    def active_affine(self) -> tuple[Tensor | None, Tensor | None]:
        """Weight and bias at the active channels (private ones for a switchable configuration)."""
        if self.private_affine is not None and self.stats_key is not None:
            weight = self.private_affine.get("weight_" + self.stats_key)
            if weight is not None:
                return weight, self.private_affine["bias_" + self.stats_key]
        weight = None if self.weight is None else self._take(self.weight)
        bias = None if self.bias is None else self._take(self.bias)
        return weight, bias

    # -- statistics ------------------------------------------------------------------------------
    def current_stats(self) -> tuple[Tensor, Tensor] | None:
        """(mean, var) for the current configuration, or None if it was never calibrated."""
        if self.stats_key is None:
            if not self.track_running_stats or self.running_mean is None:
                return None
            if not self._own_stats_set():
                return None
            return self.running_mean, self.running_var
        return self.width_stats.get(self.stats_key)

    def _own_stats_set(self) -> bool:
        """Whether the layer's own running statistics were ever trained, calibrated or loaded.

        Reading the buffers' values costs three device synchronizations per layer and forward
        pass (on a GPU they stall the whole eval pipeline), so the answer is cached against the
        buffers' identities and in-place version counters: every way of changing them
        (``load_state_dict``, calibration, ``.to()``, assignment) replaces a buffer or bumps its
        counter. (The cache holds the three small buffers it describes.)
        """
        mean, var, batches = self.running_mean, self.running_var, self.num_batches_tracked
        if torch.compiler.is_compiling():
            return self._stats_are_set(mean, var, batches)
        stamp = (mean, var, batches, mean._version, var._version, batches._version)
        cached = getattr(self, "_own_stats_cache", None)  # absent in modules pickled before it
        if (
            cached is not None
            and cached[0] is mean and cached[1] is var and cached[2] is batches
            and cached[3:6] == stamp[3:6]
        ):  # fmt: skip
            return cached[6]
        answer = self._stats_are_set(mean, var, batches)
        # Only a yes is cached: writes through ``.data`` and the native running-statistics update
        # bump no version counter, so a cached no could outlive the statistics being set (and
        # the no path raises UncalibratedWidthError anyway, it needs no speed).
        self._own_stats_cache = (*stamp, True) if answer else None
        return answer

    _stats_are_set = staticmethod(stats_are_set)

    def start_calibration(self, distributed: bool = False) -> None:
        """Start fresh statistics for the current configuration.

        ``distributed``: every rank calls this and then runs its share of each calibration batch;
        the statistics of each batch are those of the shares of all ranks together (the default
        process group), so all ranks end with the statistics a single process computes."""
        ref = self.running_mean if self.running_mean is not None else self.weight
        self._calibration = Calibration.fresh(self.active_features, ref, distributed)

    def finish_calibration(self) -> None:
        """Store the accumulated statistics for the current configuration."""
        if self._calibration is None:
            raise RuntimeError("finish_calibration() without start_calibration()")
        calibration, self._calibration = self._calibration, None
        mean, var, batches = calibration.mean, calibration.var, calibration.batches
        if batches == 0:
            raise RuntimeError(f"BatchNorm {self.usnet_name!r} saw no batch during calibration")
        if self.stats_key is None:
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
                self.num_batches_tracked.fill_(batches)
        else:
            self.width_stats[self.stats_key] = (mean, var)

    def cancel_calibration(self) -> None:
        self._calibration = None

    @property
    def is_calibrating(self) -> bool:
        return self._calibration is not None

    @property
    def calibration_batches(self) -> int:
        """Batches seen since :meth:`start_calibration` (0 when not calibrating)."""
        return 0 if self._calibration is None else self._calibration.batches

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        c = self.active_features
        if input.shape[1] != c:
            raise RuntimeError(
                f"{type(self).__name__} {self.usnet_name!r} expects {c} active channels, "
                f"got input of shape {tuple(input.shape)}"
            )
        weight, bias = self.active_affine()
        calibration = self._calibration
        if calibration is not None:
            distributed = calibration.distributed and world_size() > 1
            if input.shape[0] == 0 and not distributed:
                return input  # no statistics in it; counting it would skew the average
            calibration.batches += 1
            if distributed:
                return self._calibrate_global(input, weight, bias)
            stats = _cpu_batch_stats(input)
            if stats is None:
                # Cumulative average: momentum 1/t, exactly PyTorch's momentum=None behaviour.
                return F.batch_norm(input, calibration.mean, calibration.var, weight, bias, True,
                                    1.0 / calibration.batches, self.eps)  # fmt: skip
            return self._calibrate_with(input, weight, bias, *stats)
        if self.training or not self.track_running_stats:
            group = getattr(self, "process_group", None)
            if self.training and getattr(self, "sync_bn", False) and world_size(group) > 1:
                return self._normalize_global(input, weight, bias, group)
            return F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
        stats = self.current_stats()
        if stats is None:
            raise UncalibratedWidthError(
                f"BatchNorm {self.usnet_name or '(unnamed)'} has no statistics for "
                f"{self.width_label}: run usnet.calibrate(model, data, widths=[...]) on that width "
                "first (or use train mode)"
            )
        mean, var = stats
        return F.batch_norm(
            input, self._take(mean), self._take(var), weight, bias, False, 0.0, self.eps
        )

    def _normalize_global(self, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                          group) -> Tensor:  # fmt: skip
        """Training-mode BN with the statistics of the batch of all ranks (differentiable)."""
        mean, var, _ = global_batch_stats(input, group)
        return affine_normalize(input, mean, var, weight, bias, self.eps)

    @torch.no_grad()
    def _calibrate_with(self, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                        mean: Tensor, var: Tensor, count: int) -> Tensor:  # fmt: skip
        """One calibration batch with its statistics given (biased ``var`` over ``count``
        values per channel): update the cumulative average as ``F.batch_norm`` with momentum 1/t
        does and normalize with the batch statistics."""
        self._calibration.accumulate(mean, var * (count / (count - 1)))  # type: ignore[union-attr]
        dtype = self._calibration.mean.dtype  # type: ignore[union-attr]
        return F.batch_norm(
            input, mean.to(dtype), var.to(dtype), weight, bias, False, 0.0, self.eps
        )

    @torch.no_grad()
    def _calibrate_global(self, input: Tensor, weight: Tensor | None,
                          bias: Tensor | None) -> Tensor:  # fmt: skip
        """One calibration batch sharded across ranks: update the cumulative average with the
        global batch's mean and unbiased variance, as ``F.batch_norm`` does for one process."""
        mean, var, count = global_batch_stats(input)
        self._calibration.accumulate(mean, var * count / (count - 1).clamp_min(1))  # type: ignore[union-attr]
        return affine_normalize(input, mean, var, weight, bias, self.eps)

    def __getstate__(self) -> dict:
        # Copies and pickles start without the cache: a copy's buffers are new tensors whose
        # version counters could match the stamp by chance.
        state = super().__getstate__()
        state["_own_stats_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # Layers pickled by earlier versions (converted custom models keep the pickled module):
        # the calibration was a list [mean, var, batches(, distributed)], the store a plain dict.
        super().__setstate__(state)
        calibration = self.__dict__.get("_calibration")
        if isinstance(calibration, list):
            self._calibration = Calibration(*calibration)
        if not isinstance(self.__dict__.get("width_stats"), WidthStats):
            self.width_stats = WidthStats(self.__dict__.get("width_stats") or {})

    def _apply(self, fn, recurse=True):
        # Keep the per-width statistics on the module's device/dtype like ordinary buffers.
        result = super()._apply(fn, recurse)
        self.width_stats = WidthStats(self.width_stats).to(fn)
        return result

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active={self.active_features}"


class SlimmableLayerNorm(SlimmableLayer, nn.LayerNorm):
    """``nn.LayerNorm`` over the channels (``normalized_shape == (C,)``, channels last): the
    statistics are those of the active channels, and the affine parameters are theirs. A
    narrower network normalizes over fewer channels, as a plain LayerNorm of that width would."""

    channel_role = "features"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable()

    def init_slimmable(self, input_averaging: bool = False) -> None:
        if len(self.normalized_shape) != 1:
            raise ValueError(
                f"{type(self).__name__} normalizes over channels only, got {self.normalized_shape}"
            )
        self.active_features = self.normalized_shape[0]
        self.active_index: Tensor | None = None

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_features": outputs.count, "active_index": outputs.index}

    def active_affine(self) -> tuple[Tensor | None, Tensor | None]:
        c, index = self.active_features, self.active_index
        weight = None if self.weight is None else take(self.weight, 0, c, index)
        bias = None if self.bias is None else take(self.bias, 0, c, index)
        return weight, bias

    def _normalize(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.active_features:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.active_features} active channels last, "
                f"got input of shape {tuple(x.shape)}"
            )
        return F.layer_norm(x, (self.active_features,), *self.active_affine(), self.eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        weight, bias = self.active_affine()
        ref = weight if weight is not None else None
        placement = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = nn.LayerNorm(self.active_features, self.eps, self.elementwise_affine,
                           bias=bias is not None, **placement)  # fmt: skip
        if weight is not None:
            with torch.no_grad():
                new.weight.copy_(weight)
                if bias is not None:
                    new.bias.copy_(bias)
        if type(self) is not SlimmableLayerNorm:  # a subclass of another LayerNorm type
            new.__class__ = type(self).__bases__[-1]
            own = {"active_features", "active_index", "width_label"}
            for key, value in vars(self).items():  # its own settings (timm's _fast_norm)
                if key not in vars(new) and key not in own:
                    new.__dict__[key] = value
        return new


class SlimmableMultiheadAttention(SlimmableLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (query, key and value of the embedding size) on its first
    ``e`` embedding channels with ``e / head_dim`` whole heads: ``nn.MultiheadAttention`` ties
    its embedding to heads x head_dim, so the embedding group slims in whole heads (the
    converter makes its divisor a multiple of ``head_dim``) and the head dimension, hence the
    attention's scale, stays fixed. The inner rows of q, k and v are the first heads of each;
    the embedding channels may be a prefix or an index (a concatenation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable()

    def init_slimmable(self, input_averaging: bool = False) -> None:
        if not self._qkv_same_embed_dim:
            raise ValueError(
                f"{type(self).__name__} needs keys and values of the embedding size "
                f"(kdim=vdim=embed_dim), got kdim={self.kdim}, vdim={self.vdim}"
            )
        self.active_embed = self.embed_dim
        self.active_index: Tensor | None = None

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_embed": outputs.count, "active_index": outputs.index}

    @property
    def active_heads(self) -> int:
        return self.active_embed // self.head_dim

    def active_parameters(self) -> dict[str, Tensor | None]:
        """The parameters of a ``nn.MultiheadAttention(active_embed, active_heads)``."""
        e, full, index = self.active_embed, self.embed_dim, self.active_index
        rows = torch.arange(e, device=self.in_proj_weight.device)
        rows = torch.cat([rows, rows + full, rows + 2 * full])  # the first heads of q, k and v
        out: dict[str, Tensor | None] = {
            "in_proj_weight": take(self.in_proj_weight.index_select(0, rows), 1, e, index),
            "in_proj_bias": None if self.in_proj_bias is None
            else self.in_proj_bias.index_select(0, rows),
            "out_proj.weight": take(self.out_proj.weight[:, :e], 0, e, index),
            "out_proj.bias": None if self.out_proj.bias is None
            else take(self.out_proj.bias, 0, e, index),
            "bias_k": None if self.bias_k is None else self.bias_k[..., :e],
            "bias_v": None if self.bias_v is None else self.bias_v[..., :e],
        }  # fmt: skip
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):  # fmt: skip
        if self.active_embed == self.embed_dim and self.active_index is None:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        if query.shape[-1] != self.active_embed:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.active_embed} active embedding channels "
                f"last, got query of shape {tuple(query.shape)}"
            )
        p = self.active_parameters()
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.active_embed, self.active_heads, p["in_proj_weight"],
            p["in_proj_bias"], p["bias_k"], p["bias_v"], self.add_zero_attn, self.dropout,
            p["out_proj.weight"], p["out_proj.bias"], training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )  # fmt: skip
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        p = self.active_parameters()
        ref = self.in_proj_weight
        new = nn.MultiheadAttention(
            self.active_embed, self.active_heads, dropout=self.dropout,
            bias=self.in_proj_bias is not None, add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn, batch_first=self.batch_first,
            device=ref.device, dtype=ref.dtype,
        )  # fmt: skip
        with torch.no_grad():
            for name, value in p.items():
                if value is not None:
                    new.get_parameter(name).copy_(value)
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return f"active={self.active_embed} ({self.active_heads} heads)"


class SlimmableConvTranspose2d(SlimmableLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (``groups == 1``) on its active input and output channels: its
    weight is ``(in, out, kH, kW)``, so rows are inputs and columns outputs."""

    def __init__(self, *args, input_averaging: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable(input_averaging)

    def init_slimmable(self, input_averaging: bool = False) -> None:
        if self.groups != 1:
            raise ValueError(f"{type(self).__name__} supports groups=1 only, got {self.groups}")
        self.active_in_channels = self.in_channels
        self.active_out_channels = self.out_channels
        self.active_in_index: Tensor | None = None
        self.active_out_index: Tensor | None = None
        self.input_averaging = input_averaging

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_in_channels": inputs.count, "active_out_channels": outputs.count,
                "active_in_index": inputs.index, "active_out_index": outputs.index}  # fmt: skip

    def active_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        weight = take(self.weight, 0, self.active_in_channels, self.active_in_index)
        weight = take(weight, 1, self.active_out_channels, self.active_out_index)
        bias = None if self.bias is None else take(
            self.bias, 0, self.active_out_channels, self.active_out_index)  # fmt: skip
        scale = self.in_channels / self.active_in_channels if self.input_averaging else 1.0
        return _scaled(weight, bias, scale)

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if input.dim() < 3 or input.shape[-3] != self.active_in_channels:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.active_in_channels} active input channels, "
                f"got input of shape {tuple(input.shape)}"
            )
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        weight, bias = self.active_weight_and_bias()
        return F.conv_transpose2d(input, weight, bias, self.stride, self.padding, output_padding,
                                  1, self.dilation)  # fmt: skip

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        weight, bias = self.active_weight_and_bias()
        new = nn.ConvTranspose2d(
            self.active_in_channels, self.active_out_channels, self.kernel_size, self.stride,
            self.padding, self.output_padding, 1, bias is not None, self.dilation,
            self.padding_mode, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        return _copy_into(new, weight, bias, self.training)


class SlimmableBatchNorm1d(SlimmableBatchNorm2d, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on ``(N, C)`` or ``(N, C, L)``: :class:`SlimmableBatchNorm2d`'s
    per-configuration statistics and calibration, on one fewer dimension."""

    def _check_input_dim(self, input: Tensor) -> None:
        nn.BatchNorm1d._check_input_dim(self, input)

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        new = super().to_plain(require_stats)
        new.__class__ = nn.BatchNorm1d  # same parameters and buffers
        return new


class _PerChannelAffine(SlimmableLayer):
    """A "features" layer whose parameters are per channel (dimension 0 of ``weight``/``bias``)."""

    channel_role = "features"

    def init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_features = self._full_features()
        self.active_index: Tensor | None = None

    def active_attrs(self, inputs, outputs, stats_key=None) -> dict[str, Any]:
        return {"active_features": outputs.count, "active_index": outputs.index}

    def _active(self, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else take(tensor, 0, self.active_features, self.active_index)


class SlimmableGroupNorm(_PerChannelAffine, nn.GroupNorm):
    """``nn.GroupNorm`` whose **group size** (channels per group) stays fixed: at any width the
    active channels form ``active // group_size`` groups, each channel in the group it belongs to
    at full width, so a fully active group is normalized exactly as at full width. (Keeping the
    group count instead would regroup every channel at every width.) The converter makes the
    group size a divisor of the channel group."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable()

    def _full_features(self) -> int:
        return self.num_channels

    @property
    def group_size(self) -> int:
        return self.num_channels // self.num_groups

    def forward(self, input: Tensor) -> Tensor:
        c = self.active_features
        if input.shape[1] != c or c % self.group_size:
            raise RuntimeError(
                f"{type(self).__name__} expects {c} active channels (a multiple of its group size "
                f"{self.group_size}), got input of shape {tuple(input.shape)}"
            )
        return F.group_norm(input, c // self.group_size, self._active(self.weight),
                            self._active(self.bias), self.eps)  # fmt: skip

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        c = self.active_features
        new = nn.GroupNorm(c // self.group_size, c, self.eps, self.affine,
                           device=self.weight.device if self.affine else None)  # fmt: skip
        if self.affine:
            with torch.no_grad():
                new.weight.copy_(self._active(self.weight))
                new.bias.copy_(self._active(self.bias))
        return new


class SlimmableInstanceNorm2d(_PerChannelAffine, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` with per-channel affine parameters (statistics are per image and
    channel, so only the parameters slim). Running statistics are not supported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable()

    def _full_features(self) -> int:
        return self.num_features

    def init_slimmable(self, input_averaging: bool = False) -> None:
        if self.track_running_stats:
            raise ValueError(f"{type(self).__name__}: track_running_stats is not supported")
        super().init_slimmable(input_averaging)

    def forward(self, input: Tensor) -> Tensor:
        momentum = self.momentum if self.momentum is not None else 0.0
        weight, bias = self._active(self.weight), self._active(self.bias)
        return F.instance_norm(input, None, None, weight, bias, True, momentum, self.eps)

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        new = nn.InstanceNorm2d(self.active_features, self.eps, self.momentum, self.affine,
                                device=self.weight.device)  # fmt: skip
        with torch.no_grad():
            new.weight.copy_(self._active(self.weight))
            new.bias.copy_(self._active(self.bias))
        return new


class SlimmablePReLU(_PerChannelAffine, nn.PReLU):
    """``nn.PReLU`` with one slope per channel (dimension 1), on its active channels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_slimmable()

    def _full_features(self) -> int:
        return self.num_parameters

    def forward(self, input: Tensor) -> Tensor:
        return F.prelu(input, self._active(self.weight))

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        new = nn.PReLU(self.active_features, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(self._active(self.weight))
        return new


SLIMMABLE_LAYERS: dict[type[nn.Module], type[nn.Module]] = {}
"""Registry: plain layer type -> slimmable subclass (exact types; subclasses are refused).
Extend it with :func:`register_slimmable`."""


def register_slimmable(plain: type[nn.Module], slimmable: type[nn.Module]) -> type[nn.Module]:
    """Make ``plain`` layers slimmable everywhere: the converter swaps them for ``slimmable``
    (a subclass of ``plain`` implementing :class:`SlimmableLayer`), and ``set_width``, ``export``
    and checkpoints handle them through that interface. Returns ``slimmable``.

    The converter also needs to know how the layer treats channels: a ``"transform"`` layer
    consumes its input's channels (dimension 1, or the last for ``Linear``-like layers) and
    produces a channel group of its own; a ``"features"`` layer returns its input's channels
    (:attr:`SlimmableLayer.channel_role`). Other behaviour needs :func:`usnet.register_op`.
    """
    if not (isinstance(plain, type) and issubclass(plain, nn.Module)):
        raise TypeError(f"register_slimmable: {plain!r} is not an nn.Module class")
    if not (isinstance(slimmable, type) and issubclass(slimmable, plain)
            and issubclass(slimmable, SlimmableLayer)):  # fmt: skip
        raise TypeError(
            f"register_slimmable: {getattr(slimmable, '__name__', slimmable)!r} must subclass both "
            f"{plain.__name__} and usnet.layers.SlimmableLayer"
        )
    if slimmable.channel_role not in ("transform", "features"):
        raise ValueError(f"{slimmable.__name__}.channel_role must be 'transform' or 'features'")
    SLIMMABLE_LAYERS[plain] = slimmable
    return slimmable


register_slimmable(nn.Conv2d, SlimmableConv2d)
register_slimmable(nn.Linear, SlimmableLinear)
register_slimmable(nn.BatchNorm2d, SlimmableBatchNorm2d)
register_slimmable(nn.LayerNorm, SlimmableLayerNorm)
register_slimmable(nn.BatchNorm1d, SlimmableBatchNorm1d)
register_slimmable(nn.Conv1d, SlimmableConv1d)
register_slimmable(nn.ConvTranspose2d, SlimmableConvTranspose2d)
register_slimmable(nn.GroupNorm, SlimmableGroupNorm)
register_slimmable(nn.InstanceNorm2d, SlimmableInstanceNorm2d)
register_slimmable(nn.PReLU, SlimmablePReLU)
register_slimmable(nn.MultiheadAttention, SlimmableMultiheadAttention)

try:  # torchvision's LayerNorm over dimension 1 of (N, C, H, W) (ConvNeXt)
    from torchvision.models.convnext import LayerNorm2d as _LayerNorm2d

    class SlimmableLayerNorm2d(SlimmableLayerNorm, _LayerNorm2d):
        """torchvision's ``LayerNorm2d`` (channels at dimension 1) over its active channels."""

        def forward(self, input: Tensor) -> Tensor:
            return self._normalize(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    register_slimmable(_LayerNorm2d, SlimmableLayerNorm2d)
except ImportError:  # pragma: no cover
    pass

try:  # torchvision's BatchNorm with frozen statistics and affine buffers (detection backbones)
    from torchvision.ops.misc import FrozenBatchNorm2d as _FrozenBatchNorm2d

    class SlimmableFrozenBatchNorm2d(_PerChannelAffine, _FrozenBatchNorm2d):
        """torchvision's ``FrozenBatchNorm2d`` on its active channels: its statistics are fixed
        buffers, so every width uses the full-width ones of its active channels."""

        def _full_features(self) -> int:
            return self.weight.shape[0]

        def forward(self, x: Tensor) -> Tensor:
            w, b = self._active(self.weight), self._active(self.bias)
            rv, rm = self._active(self.running_var), self._active(self.running_mean)
            scale = w * (rv + self.eps).rsqrt()
            shift = b - rm * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

        def to_plain(self, require_stats: bool = True) -> nn.Module:
            new = _FrozenBatchNorm2d(self.active_features, self.eps).to(self.weight.device)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, name).copy_(self._active(getattr(self, name)))
            return new

    register_slimmable(_FrozenBatchNorm2d, SlimmableFrozenBatchNorm2d)
except ImportError:  # pragma: no cover
    pass


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
