"""``nn.MultiheadAttention`` on whole heads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ChannelLayout, ChannelTensor, SlimmableLayer, register_slimmable, take


@register_slimmable(nn.MultiheadAttention)
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

    def channel_layout(self) -> ChannelLayout:
        """The embedding channels: in-projection columns and out-projection rows (the heads
        inside keep their order)."""
        return ChannelLayout((ChannelTensor("in_proj_weight", 1, "in", weight=True),
                              ChannelTensor("out_proj.weight", 0, "out", weight=True),
                              ChannelTensor("out_proj.bias", 0, "out")), input_dim=-1)  # fmt: skip

    def decayed_weights(self) -> tuple[str, ...]:
        # The packed (or separate q/k/v) input projection is the attention module's own
        # parameter; its output projection is a Linear child, decayed as such.
        return ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
