"""Functional layers on a module's own parameters (``F.conv2d(x, self.weight)``): refused, since
the converter cannot slice what it does not own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
import torch.nn.functional as F

from ..registry import handles

if TYPE_CHECKING:
    from ..graph import GraphAnalysis


@handles(F.conv1d, F.conv2d, F.conv_transpose2d, F.linear, F.batch_norm, F.layer_norm, F.group_norm)
def refuse_functional(a: "GraphAnalysis", node: fx.Node, module: Any = None) -> None:
    if a.channel_inputs(node):
        a.refuse(node, "functional layer on parameters; use the nn.Module layer instead")
