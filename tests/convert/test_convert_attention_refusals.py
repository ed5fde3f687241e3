"""What the attention converter refuses, and that it says why and how to fix it: a head count
written as a literal in a reshape, and torchvision's windowed (Swin) and multi-axis (MaxViT)
attention, which the head machinery does not cover."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import usnet


class LiteralHeads(nn.Module):
    """timm-style attention whose head split is written as literals, not module attributes."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 4, 16).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class TokenModel(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.embed = nn.Conv2d(3, 64, 8, 8)
        self.attention = attention
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # tokens, channels last
        return self.head(self.attention(x).mean(1))


def test_literal_head_count_is_refused_with_the_fix():
    model = TokenModel(LiteralHeads())
    with pytest.raises(usnet.ConversionError) as info:
        usnet.slimmable(model, input_size=(1, 3, 16, 16))
    message = str(info.value)
    assert "reshape" in message and "node 'reshape'" in message  # names the node
    assert "constant size 4 along channels" in message  # what is wrong
    assert "write -1" in message and "self.num_heads" in message  # how to fix it
    assert not usnet.is_slimmable(model)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


class EmbeddingSizedMerge(nn.Module):
    """Older timm: the heads merge back to ``C``, the *embedding's* size read from ``x.shape``,
    which equals the attention's width only at full width when the two slim independently."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = 4, 16
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class HeadDimFromEmbedding(nn.Module):
    """A head dimension computed from the embedding (``C // self.num_heads``): it would shrink
    with the width instead of staying fixed."""

    def __init__(self):
        super().__init__()
        self.num_heads = 4
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


@pytest.mark.parametrize(
    "attention, pattern",
    [
        (EmbeddingSizedMerge, r"size 'getitem_2' along channels is computed at run time.*write -1"),
        (HeadDimFromEmbedding, r"per-head size .* computed at run time.*self\.head_dim"),
    ],
    ids=["merge-to-embedding-size", "head-dim-from-embedding"],
)
def test_sizes_computed_from_other_channels_are_refused(attention, pattern):
    """A run-time size that would not follow the channels it shapes is refused, not trusted."""
    model = TokenModel(attention())
    with pytest.raises(usnet.ConversionError, match=pattern):
        usnet.slimmable(model, input_size=(1, 3, 16, 16))
    assert not usnet.is_slimmable(model)


def test_literal_head_count_written_as_minus_one_converts():
    """The fix the message suggests works: ``-1`` for the head count (the channels follow)."""

    class MinusOne(LiteralHeads):
        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, -1, 16).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
            return self.proj(x)

    model = usnet.slimmable(TokenModel(MinusOne()), input_size=(1, 3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for w in (0.25, 0.6):
            usnet.set_width(model, w)
            assert model.attention.qkv.active_out_features % 48 == 0  # 3 x whole heads of 16
            torch.testing.assert_close(usnet.export(model, w)(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, op, why",
    [
        ("swin_t", "shifted_window_attention", "windowed attention (Swin) is not supported"),
        ("maxvit_t", "einsum", "MaxViT's relative attention"),
    ],
)
def test_windowed_and_multi_axis_attention_are_refused_naming_the_op(name, op, why):
    model = torchvision.models.get_model(name)
    with pytest.raises(usnet.ConversionError) as info:
        usnet.slimmable(model, input_size=(1, 3, 224, 224))
    message = str(info.value)
    assert message.startswith("cannot convert function")
    assert f"{op} at node" in message
    assert why in message and "scaled_dot_product_attention" in message  # what would work
    assert not usnet.is_slimmable(model)
