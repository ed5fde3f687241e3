"""Slimmable normalization layers: BatchNorm (per-width statistics, calibration, SyncBN),
LayerNorm (statistics over the active channels), GroupNorm (fixed group size), InstanceNorm,
torchvision's LayerNorm2d and FrozenBatchNorm2d."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d as _LayerNorm2d
from torchvision.ops.misc import FrozenBatchNorm2d as _FrozenBatchNorm2d

from ..errors import UncalibratedWidthError
from .base import (
    ChannelLayout,
    ChannelTensor,
    PerChannelAffine,
    SlimmableLayer,
    affine_channels,
    register_slimmable,
    take,
)
from .bn_stats import (
    Calibration,
    WidthStats,
    affine_normalize,
    global_batch_stats,
    stats_are_set,
    world_size,
)
from .bn_stats import cpu_batch_stats as _cpu_batch_stats  # a module global: tests swap it


@register_slimmable(nn.BatchNorm2d)
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

    def channel_layout(self) -> ChannelLayout:
        stats = (ChannelTensor("running_mean", 0, "out"), ChannelTensor("running_var", 0, "out"))
        return ChannelLayout(affine_channels() + stats)


@register_slimmable(nn.LayerNorm)
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

    def channel_layout(self) -> ChannelLayout:
        return ChannelLayout(affine_channels(), input_dim=-1)  # channels last


@register_slimmable(nn.BatchNorm1d)
class SlimmableBatchNorm1d(SlimmableBatchNorm2d, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on ``(N, C)`` or ``(N, C, L)``: :class:`SlimmableBatchNorm2d`'s
    per-configuration statistics and calibration, on one fewer dimension."""

    def _check_input_dim(self, input: Tensor) -> None:
        nn.BatchNorm1d._check_input_dim(self, input)

    def to_plain(self, require_stats: bool = True) -> nn.Module:
        new = super().to_plain(require_stats)
        new.__class__ = nn.BatchNorm1d  # same parameters and buffers
        return new


@register_slimmable(nn.GroupNorm)
class SlimmableGroupNorm(PerChannelAffine, nn.GroupNorm):
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

    def channel_layout(self) -> ChannelLayout:
        return ChannelLayout(affine_channels(), out_block=self.group_size)


@register_slimmable(nn.InstanceNorm2d)
class SlimmableInstanceNorm2d(PerChannelAffine, nn.InstanceNorm2d):
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


@register_slimmable(_LayerNorm2d)
class SlimmableLayerNorm2d(SlimmableLayerNorm, _LayerNorm2d):
    """torchvision's ``LayerNorm2d`` (channels at dimension 1, ConvNeXt) over its active
    channels."""

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def channel_layout(self) -> ChannelLayout:
        return ChannelLayout(affine_channels(), input_dim=1)


@register_slimmable(_FrozenBatchNorm2d)
class SlimmableFrozenBatchNorm2d(PerChannelAffine, _FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones) on its active channels: its
    statistics are fixed buffers, so every width uses the full-width ones of its active
    channels."""

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

    def channel_layout(self) -> ChannelLayout:
        stats = (ChannelTensor("running_mean", 0, "out"), ChannelTensor("running_var", 0, "out"))
        return ChannelLayout(affine_channels(scale=False) + stats)
