"""Slimmable convolutions: ``Conv2d``, ``Conv1d`` (standard, grouped, depthwise) and
``ConvTranspose2d`` on their first channels."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    ChannelLayout,
    ChannelTensor,
    SlimmableLayer,
    copy_into,
    register_slimmable,
    scaled_by,
    take,
)


class SlimmableConvNd(SlimmableLayer):
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
        return copy_into(new, weight, bias, self.training)

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
        return scaled_by(weight, bias, self.averaging_scale())

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

    def channel_layout(self) -> ChannelLayout:
        out = [ChannelTensor("weight", 0, "out", weight=True), ChannelTensor("bias", 0, "out")]
        if self.is_depthwise:  # one input channel per output (group): no input dim to permute
            return ChannelLayout(tuple(out))
        g = self.groups
        out.append(ChannelTensor("weight", 1, "in", grouped=g, weight=True))
        blocks = (self.in_channels // g, self.out_channels // g) if g > 1 else (0, 0)
        return ChannelLayout(tuple(out), 1, *blocks)

    def decayed_weights(self) -> tuple[str, ...]:
        depthwise = self.groups > 1 and self.groups == self.in_channels
        return () if depthwise else ("weight",)


@register_slimmable(nn.Conv2d)
class SlimmableConv2d(SlimmableConvNd, nn.Conv2d):
    """``nn.Conv2d`` (standard, grouped or depthwise) running on its first channels.

    A depthwise conv (``groups == in_channels``) keeps ``groups == active_in_channels``; any other
    grouped conv keeps its group count, so its active channels must stay divisible by ``groups``
    (the channel plan's divisors guarantee that).
    """

    _plain_type = nn.Conv2d
    _functional = staticmethod(F.conv2d)


@register_slimmable(nn.Conv1d)
class SlimmableConv1d(SlimmableConvNd, nn.Conv1d):
    """``nn.Conv1d`` on ``(N, C, L)``, like :class:`SlimmableConv2d`."""

    _plain_type = nn.Conv1d
    _functional = staticmethod(F.conv1d)


@register_slimmable(nn.ConvTranspose2d)
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
        return scaled_by(weight, bias, scale)

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
        return copy_into(new, weight, bias, self.training)

    def channel_layout(self) -> ChannelLayout:
        return ChannelLayout((ChannelTensor("weight", 1, "out", weight=True),
                              ChannelTensor("bias", 0, "out"),
                              ChannelTensor("weight", 0, "in", weight=True)))  # fmt: skip

    def decayed_weights(self) -> tuple[str, ...]:
        return ("weight",)
