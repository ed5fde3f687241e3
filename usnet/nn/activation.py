"""Per-channel activations: ``nn.PReLU``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PerChannelAffine, register_slimmable


@register_slimmable(nn.PReLU)
class SlimmablePReLU(PerChannelAffine, nn.PReLU):
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
