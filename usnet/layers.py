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


def _scaled(weight: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """Weight and bias times the input-averaging scale (a no-op at scale 1)."""
    if scale == 1.0:
        return weight, bias
    return weight * scale, None if bias is None else bias * scale


class SlimmableConv2d(nn.Conv2d):
    """``nn.Conv2d`` (standard, grouped or depthwise) running on its first channels.

    A depthwise conv (``groups == in_channels``) keeps ``groups == active_in_channels``; any other
    grouped conv keeps its group count, so its active channels must stay divisible by ``groups``
    (the channel plan's divisors guarantee that).
    """

    def __init__(self, *args, input_averaging: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_slimmable(input_averaging)

    def _init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_in_channels = self.in_channels
        self.active_out_channels = self.out_channels
        self.input_averaging = input_averaging

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
        bias = None if self.bias is None else self.bias[:cout]
        return _scaled(self.weight[:cout, : cin // groups], bias, self.averaging_scale())

    def averaging_scale(self) -> float:
        if not self.input_averaging:
            return 1.0
        return (self.in_channels / self.groups) / (self.active_in_channels / self.active_groups)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 3 or input.shape[-3] != self.active_in_channels:
            raise RuntimeError(
                f"{type(self).__name__} expects {self.active_in_channels} active input channels, "
                f"got input of shape {tuple(input.shape)}"
            )
        weight, bias = self.active_weight_and_bias()
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return F.conv2d(
            input, weight, bias, self.stride, padding, self.dilation, self.active_groups
        )

    def extra_repr(self) -> str:
        active = f", active={self.active_in_channels}->{self.active_out_channels}"
        return super().extra_repr() + active + (", input_averaging" if self.input_averaging else "")


class SlimmableLinear(nn.Linear):
    """``nn.Linear`` running on its first input and output features."""

    def __init__(self, *args, input_averaging: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_slimmable(input_averaging)

    def _init_slimmable(self, input_averaging: bool = False) -> None:
        self.active_in_features = self.in_features
        self.active_out_features = self.out_features
        self.input_averaging = input_averaging

    def averaging_scale(self) -> float:
        return self.in_features / self.active_in_features if self.input_averaging else 1.0

    def active_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        weight = self.weight[: self.active_out_features, : self.active_in_features]
        bias = None if self.bias is None else self.bias[: self.active_out_features]
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


class SlimmableBatchNorm2d(nn.BatchNorm2d):
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_slimmable()

    def _init_slimmable(self) -> None:
        self.active_features = self.num_features
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

    # -- affine parameters -----------------------------------------------------------------------
    def add_private_affine(self) -> None:
        """Give the current configuration its own weight and bias (switchable BN), initialized
        from the shared ones; the full-width configuration keeps the layer's own."""
        if self.stats_key is None or not self.affine:
            return
        if self.private_affine is None:
            self.private_affine = nn.ParameterDict()
        c = self.active_features
        self.private_affine["weight_" + self.stats_key] = nn.Parameter(self.weight[:c].detach().clone())
        self.private_affine["bias_" + self.stats_key] = nn.Parameter(self.bias[:c].detach().clone())

    def active_affine(self) -> tuple[Tensor | None, Tensor | None]:
        """Weight and bias at the active channels (private ones for a switchable configuration)."""
        if self.private_affine is not None and self.stats_key is not None:
            weight = self.private_affine.get("weight_" + self.stats_key)
            if weight is not None:
                return weight, self.private_affine["bias_" + self.stats_key]
        c = self.active_features
        weight = None if self.weight is None else self.weight[:c]
        bias = None if self.bias is None else self.bias[:c]
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
        return F.batch_norm(input, mean[:c], var[:c], weight, bias, False, 0.0, self.eps)

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
        return F.batch_norm(input, mean.to(dtype), var.to(dtype), weight, bias, False, 0.0, self.eps)

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


SLIMMABLE_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: SlimmableConv2d,
    nn.Linear: SlimmableLinear,
    nn.BatchNorm2d: SlimmableBatchNorm2d,
}
"""Registry: plain layer type -> slimmable subclass (exact types; subclasses are refused)."""


def make_slimmable_(module: nn.Module, input_averaging: bool = False) -> nn.Module:
    """Turn a plain layer into its slimmable subclass in place, keeping its parameter objects."""
    cls = SLIMMABLE_LAYERS.get(type(module))
    if cls is None:
        raise TypeError(f"no slimmable counterpart for {type(module).__name__}")
    module.__class__ = cls
    if cls is SlimmableBatchNorm2d:
        module._init_slimmable()
    else:
        module._init_slimmable(input_averaging)
    return module


def is_slimmable_layer(module: nn.Module) -> bool:
    return isinstance(module, (SlimmableConv2d, SlimmableLinear, SlimmableBatchNorm2d))
