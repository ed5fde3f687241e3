"""``nn.Linear`` on its first input and output features."""

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


@register_slimmable(nn.Linear)
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
        return copy_into(new, weight, bias, self.training)

    def averaging_scale(self) -> float:
        return self.in_features / self.active_in_features if self.input_averaging else 1.0

    def active_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        out_index = getattr(self, "active_out_index", None)  # absent in modules pickled before it
        weight = take(self.weight, 0, self.active_out_features, out_index)
        weight = take(weight, 1, self.active_in_features, getattr(self, "active_in_index", None))
        bias = (
            None if self.bias is None else take(self.bias, 0, self.active_out_features, out_index)
        )
        return scaled_by(weight, bias, self.averaging_scale())

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

    def channel_layout(self) -> ChannelLayout:
        return ChannelLayout((ChannelTensor("weight", 0, "out", weight=True),
                              ChannelTensor("bias", 0, "out"),
                              ChannelTensor("weight", 1, "in", weight=True)), input_dim=-1)  # fmt: skip

    def decayed_weights(self) -> tuple[str, ...]:
        return ("weight",)
