"""Cost of a width: parameters, multiply-accumulates and FLOPs, counted by PyTorch itself.

MACs and FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` running the exported plain
model once on a zero input (it counts 2 FLOPs per multiply-accumulate of convolutions and matrix
products, and nothing for BN/activations/additions, which is the convention of torchvision's
published figures). Parameters are those of the exported model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..channels import Width, config_id, format_width, width_value
from ..state import check_input_size, get_state, input_size_of
from .plain import export


@dataclass(frozen=True)
class Profile:
    width: float | dict
    config_id: str
    params: int
    macs: int
    flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def profile(model: nn.Module, width: Width | None = None,
            input_size: Sequence[int] | None = None) -> Profile:  # fmt: skip
    """Params, MACs and FLOPs of ``model`` at ``width`` for one input of ``input_size`` (default:
    the input the model was converted with, else ``(1, 3, 224, 224)``)."""
    state = get_state(model)
    width = state.plan.check_width(state.width if width is None else width)
    size = input_size_of(model, input_size)
    plain = export(model, width, require_stats=False)
    params, flops = module_cost(plain, size)
    return Profile(
        width=width_value(width),
        config_id=config_id(state.plan.config(width)),
        params=params,
        macs=flops // 2,
        flops=flops,
    )


def module_cost(module: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """(parameters, FLOPs) of any plain module run once on a zero input of ``input_size``."""
    size = check_input_size(input_size)
    params = sum(p.numel() for p in module.parameters())
    ref = next(module.parameters())
    counter = FlopCounterMode(display=False)
    # Attention is counted as its matrix products: PyTorch's fused CPU attention kernels have no
    # FLOP formula, so attention runs as the math backend's bmm; and grad mode keeps
    # nn.MultiheadAttention off its fused inference path (no formula either).
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        module(torch.zeros(size, dtype=ref.dtype, device=ref.device))
    return params, int(counter.get_total_flops())


def format_count(value: float) -> str:
    """1234567 -> '1.23M' (K, M, G)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))


def format_profiles(rows: Iterable[Profile]) -> str:
    lines = [f"{'width':>8} {'params':>10} {'MACs':>10} {'FLOPs':>10}  config"]
    for r in rows:
        w = format_width(r.width, ".3f")
        lines.append(
            f"{w!s:>8} {format_count(r.params):>10} {format_count(r.macs):>10} "
            f"{format_count(r.flops):>10}  {r.config_id}"
        )
    return "\n".join(lines)
