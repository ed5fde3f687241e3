"""Vision transformers convert (issue 14): torchvision's ``VisionTransformer``
(``nn.MultiheadAttention``), timm's ViT and a hand-written timm-style attention block recognized
from its graph alone. Width 1.0 is the original model bit for bit, exports equal the slimmable
model at random widths, heads slim whole with a fixed head dimension, each block's MLP hidden
size is a group of its own, and the embedding group slices the class token, the position
embedding, every LayerNorm and the head's input."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer
from usnet_testing import grid, group_of, liven_vit, timm_vit, tv_vit

import usnet
from usnet.nn.attention import SlimmableMultiheadAttention
from usnet.nn.norm import SlimmableLayerNorm
from usnet.state import get_state

SIZE = (1, 3, 32, 32)
HEAD_DIM_TV = 16  # 64 channels in 4 heads
HEAD_DIM_TIMM = 64  # vit_tiny: 192 channels in 3 heads


BUILDERS = {"torchvision": tv_vit, "timm": timm_vit}


def convert(model: nn.Module) -> nn.Module:
    return usnet.slimmable(model, input_size=SIZE).eval()


@pytest.fixture(scope="module")
def converted():
    """Each model converted once (a plain copy kept as the reference)."""
    torch.manual_seed(0)
    out = {}
    for kind, build in BUILDERS.items():
        plain = build()
        out[kind] = (plain, convert(copy.deepcopy(plain)))
    return out


def random_widths(seed: int, n: int = 3) -> list[float]:
    rng = random.Random(seed)
    return [0.25, *(round(rng.uniform(0.25, 0.95), 4) for _ in range(n))]


@pytest.mark.parametrize("kind", BUILDERS)
def test_full_width_is_bit_identical(converted, kind):
    plain, model = converted[kind]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        usnet.set_width(model, 0.5)
        narrow = model(x)
        usnet.set_width(model, 1.0)  # back from a narrow width: still the original
        assert torch.equal(model(x), plain(x))
    assert not torch.allclose(narrow, plain(x), atol=1e-3)


@pytest.mark.parametrize("kind", BUILDERS)
def test_export_at_random_widths_equals_the_slimmable_model(converted, kind):
    _, model = converted[kind]
    x = torch.randn(2, 3, 32, 32)
    for w in random_widths(seed=len(kind)):
        exported = usnet.export(model, w).eval()
        with torch.no_grad(), usnet.width(model, w):
            torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
        assert sum(p.numel() for p in exported.parameters()) < sum(
            p.numel() for p in model.parameters()
        )
        assert not any(isinstance(m, usnet.SlimmableLayer) for m in exported.modules()), w


def test_torchvision_export_loads_strictly_into_a_smaller_vision_transformer(converted):
    _, model = converted["torchvision"]
    x = torch.randn(2, 3, 32, 32)
    seen = set()
    for w in random_widths(seed=7):
        exported = usnet.export(model, w).eval()
        assert type(exported) is VisionTransformer
        hidden = exported.hidden_dim
        heads = exported.encoder.layers[0].self_attention.num_heads
        mlp = exported.encoder.layers[0].mlp[0].out_features
        assert hidden == heads * HEAD_DIM_TV
        fresh = VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=heads,
                                  hidden_dim=hidden, mlp_dim=mlp, num_classes=10)  # fmt: skip
        fresh.load_state_dict(exported.state_dict(), strict=True)
        with torch.no_grad(), usnet.width(model, w):
            torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=1e-5)
        seen.add(heads)
    assert len(seen) >= 2  # the random widths cover several head counts


def test_export_descriptive_size_attributes_follow_the_width(converted):
    """Sizes the forward code never reads (torchvision's mlp_dim and EncoderBlock.num_heads,
    timm's embed_dim and num_features, which reset_classifier uses) follow the width too."""
    tv = usnet.export(converted["torchvision"][1], 0.5)
    tm = usnet.export(converted["timm"][1], 0.5)
    assert tv.mlp_dim == tv.encoder.layers[0].mlp[0].out_features == 64
    assert tv.encoder.layers[0].num_heads == tv.encoder.layers[0].self_attention.num_heads == 2
    assert tm.embed_dim == tm.num_features == tm.cls_token.shape[-1] == 96


def test_torchvision_heads_are_whole(converted):
    _, model = converted["torchvision"]
    plan = usnet.channel_plan(model)
    embedding = group_of(model, "conv_proj")
    assert plan.groups[embedding].divisor % HEAD_DIM_TV == 0
    attentions = [m for m in model.modules() if isinstance(m, SlimmableMultiheadAttention)]
    assert len(attentions) == 2
    heads_seen = set()
    for w in grid(0.25, 1.0, 0.05):
        usnet.set_width(model, w)
        e = usnet.channels_at(model)[embedding]
        assert e % HEAD_DIM_TV == 0
        for attention in attentions:
            assert attention.active_embed == e and attention.head_dim == HEAD_DIM_TV
            assert attention.active_heads == e // HEAD_DIM_TV
        heads_seen.add(e // HEAD_DIM_TV)
    usnet.set_width(model, 1.0)
    assert heads_seen == {1, 2, 3, 4}
    exported = usnet.export(model, 0.5).encoder.layers[1].self_attention
    assert type(exported) is nn.MultiheadAttention
    assert (exported.embed_dim, exported.num_heads, exported.head_dim) == (32, 2, HEAD_DIM_TV)


def _timm_heads_group(model: nn.Module, block: int) -> str:
    """The group of block ``block``'s heads: the one its ``num_heads`` attribute follows."""
    for attr in get_state(model).shape_attrs:
        if attr.module == f"blocks.{block}.attn" and attr.attr == "num_heads":
            assert attr.channels[1] == 1
            return attr.channels[0]
    raise AssertionError(f"no num_heads attribute recorded for block {block}")


def test_timm_heads_are_whole_and_the_head_dimension_fixed(converted):
    _, model = converted["timm"]
    plan = usnet.channel_plan(model)
    groups = [_timm_heads_group(model, i) for i in range(2)]
    assert len(set(groups)) == 2  # one heads group per block
    for g in groups:
        assert (plan.groups[g].size, plan.groups[g].divisor) == (3, 1)
    attrs = {(a.module, a.attr) for a in get_state(model).shape_attrs}
    assert attrs == {(f"blocks.{i}.attn", a) for i in range(2) for a in ("num_heads", "attn_dim")}
    counts = set()
    for w in grid(0.25, 1.0, 0.05):
        usnet.set_width(model, w)
        channels = usnet.channels_at(model)
        for i, g in enumerate(groups):
            attn = model.blocks[i].attn
            heads = channels[g]
            assert attn.num_heads == heads >= 1
            assert attn.head_dim == HEAD_DIM_TIMM
            assert attn.attn_dim == heads * HEAD_DIM_TIMM
            assert attn.qkv.active_out_features == 3 * heads * HEAD_DIM_TIMM
            assert attn.proj.active_in_features == heads * HEAD_DIM_TIMM
            counts.add(heads)
    usnet.set_width(model, 1.0)
    assert counts == {1, 2, 3}
    assert all(model.blocks[i].attn.num_heads == 3 for i in range(2))  # restored at full width


@pytest.mark.parametrize("kind", BUILDERS)
def test_mlp_hidden_is_a_group_of_its_own_per_block(converted, kind):
    _, model = converted[kind]
    if kind == "torchvision":
        first = [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]
        second = [f"encoder.layers.encoder_layer_{i}.mlp.3" for i in range(2)]
        embedding = group_of(model, "conv_proj")
    else:
        first = [f"blocks.{i}.mlp.fc1" for i in range(2)]
        second = [f"blocks.{i}.mlp.fc2" for i in range(2)]
        embedding = group_of(model, "patch_embed.proj")
    hidden = [group_of(model, name) for name in first]
    assert len({*hidden, embedding}) == 3
    plan = usnet.channel_plan(model)
    for g in hidden:
        assert plan.groups[g].parent is None and not plan.groups[g].fixed
    bindings = {b.layer: b for b in get_state(model).bindings}
    for g, name in zip(hidden, second, strict=True):
        assert bindings[name].inputs == (g, 1) and bindings[name].outputs == (embedding, 1)
    # one block's MLP narrower, the rest at full width: only that block's layers change
    usnet.set_width(model, {g: (0.5 if g == hidden[0] else 1.0) for g in plan.root_names})
    full_mlp = plan.groups[hidden[0]].size
    assert model.get_submodule(first[0]).active_out_features == full_mlp // 2
    assert model.get_submodule(first[1]).active_out_features == full_mlp
    assert model.get_submodule(second[0]).active_in_features == full_mlp // 2
    usnet.set_width(model, 1.0)


def test_torchvision_embedding_group_slices_tokens_norms_and_head(converted):
    _, model = converted["torchvision"]
    embedding = group_of(model, "conv_proj")
    bindings = {b.layer: b for b in get_state(model).bindings}
    norms = [n for n, m in model.named_modules() if isinstance(m, SlimmableLayerNorm)]
    assert len(norms) == 5  # two per block and the encoder's
    for name in ("", "encoder", *norms):  # the root holds the class token, encoder the positions
        assert bindings[name].outputs == (embedding, 1), name
    assert bindings["heads.head"].inputs == (embedding, 1)
    assert get_state(model).shape_attrs[0].module == ""  # torchvision's self.hidden_dim
    for w, e in ((0.25, 16), (0.5, 32), (1.0, 64)):
        usnet.set_width(model, w)
        assert model.class_token.shape == (1, 1, e)
        assert model.encoder.pos_embedding.shape == (1, 65, e)
        assert model.hidden_dim == e
        assert all(model.get_submodule(n).active_features == e for n in norms)
        assert model.heads.head.active_in_features == e
    # the full-width parameters themselves are untouched
    assert model.state_dict()["class_token"].shape == (1, 1, 64)


def test_timm_embedding_group_slices_tokens_norms_and_head(converted):
    _, model = converted["timm"]
    embedding = group_of(model, "patch_embed.proj")
    bindings = {b.layer: b for b in get_state(model).bindings}
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(isinstance(model.get_submodule(n), SlimmableLayerNorm)
                                   for n in norms)  # fmt: skip
    for name in ("", *norms):  # the root holds cls_token and pos_embed
        assert bindings[name].outputs == (embedding, 1), name
    assert bindings["head"].inputs == (embedding, 1)
    for w, e in ((0.25, 48), (0.5, 96), (1.0, 192)):
        usnet.set_width(model, w)
        assert model.cls_token.shape == (1, 1, e)
        assert model.pos_embed.shape == (1, 65, e)
        assert all(model.get_submodule(n).active_features == e for n in norms)
        assert model.head.active_in_features == e
        assert model.blocks[0].attn.qkv.active_in_features == e


def test_timm_non_uniform_heads_export_per_block(converted):
    _, model = converted["timm"]
    plan = usnet.channel_plan(model)
    g0, g1 = _timm_heads_group(model, 0), _timm_heads_group(model, 1)
    mapping = {g: 1.0 for g in plan.root_names}
    mapping[g0] = 1 / 3  # one head in block 0, three in block 1
    mapping[group_of(model, "patch_embed.proj")] = 0.5
    x = torch.randn(2, 3, 32, 32)
    exported = usnet.export(model, mapping).eval()
    assert [b.attn.num_heads for b in exported.blocks] == [1, 3]
    assert [b.attn.attn_dim for b in exported.blocks] == [64, 192]
    assert exported.blocks[0].attn.qkv.out_features == 3 * 64
    assert exported.blocks[1].attn.qkv.out_features == 3 * 192
    assert exported.cls_token.shape == (1, 1, 96)
    assert g1 in plan.root_names
    with torch.no_grad(), usnet.width(model, mapping):
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)


def test_torchvision_non_uniform_mlp_widths_export(converted):
    _, model = converted["torchvision"]
    plan = usnet.channel_plan(model)
    hidden = [group_of(model, f"encoder.layers.encoder_layer_{i}.mlp.0") for i in range(2)]
    mapping = {g: 1.0 for g in plan.root_names}
    mapping[hidden[0]], mapping[hidden[1]] = 0.25, 0.75
    mapping[group_of(model, "conv_proj")] = 0.5
    exported = usnet.export(model, mapping).eval()
    assert [layer.mlp[0].out_features for layer in exported.encoder.layers] == [32, 96]
    assert exported.encoder.layers[0].self_attention.num_heads == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), usnet.width(model, mapping):
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)


# --- a timm-style block written by hand: recognized from the graph, not from names -------------
class TokenMixer(nn.Module):
    """timm's attention under other names: q, k, v from one Linear, reshaped into heads."""

    def __init__(self, dim: int, num_heads: int, fused: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.to_qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.out = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.to_qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # the manual path of timm (and of most papers' code)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.out(x)


class Stage(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, fused: bool):
        super().__init__()
        self.pre = nn.LayerNorm(dim)
        self.mix = TokenMixer(dim, num_heads, fused)
        self.post = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.mix(self.pre(x))
        return x + self.ffn(self.post(x))


class HandViT(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, hidden: int = 96, fused: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, 8)
        self.token = nn.Parameter(torch.randn(1, 1, dim))
        self.where = nn.Parameter(torch.randn(1, 17, dim))
        self.stages = nn.Sequential(*(Stage(dim, num_heads, hidden, fused) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)
        self.classify = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1) + self.where
        x = self.norm(self.stages(x))
        return self.classify(x[:, 0])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
def test_hand_written_attention_is_recognized_from_the_graph(fused):
    plain = liven_vit(HandViT(fused=fused)).eval()
    model = convert(copy.deepcopy(plain))
    state = get_state(model)
    attrs = {(a.module, a.attr) for a in state.shape_attrs}
    assert attrs == {(f"stages.{i}.mix", a) for i in range(2) for a in ("num_heads", "attn_dim")}
    heads = [next(a.channels[0] for a in state.shape_attrs
                  if a.module == f"stages.{i}.mix" and a.attr == "num_heads") for i in range(2)]  # fmt: skip
    plan = usnet.channel_plan(model)
    assert [(plan.groups[g].size, plan.groups[g].divisor) for g in heads] == [(4, 1), (4, 1)]
    bindings = {b.layer: b for b in state.bindings}
    for i, g in enumerate(heads):  # q, k and v: three segments of whole heads of 16 channels
        assert bindings[f"stages.{i}.mix.to_qkv"].outputs == ((g, 16),) * 3
        assert bindings[f"stages.{i}.mix.out"].inputs == (g, 16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    counts = []
    for w in (0.25, 0.5, 0.7):
        usnet.set_width(model, w)
        n = usnet.channels_at(model)[heads[0]]
        counts.append(n)
        mixer = model.stages[0].mix
        assert mixer.num_heads == n
        assert mixer.head_dim == 16 and mixer.attn_dim == 16 * n
        assert mixer.to_qkv.active_out_features == 3 * 16 * n
        exported = usnet.export(model, w).eval()
        assert exported.stages[0].mix.num_heads == n
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
    assert counts == sorted(counts) and counts[0] < counts[-1] < 4
    usnet.set_width(model, 1.0)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_narrow_attention_equals_a_hand_sliced_multihead_attention():
    """Independent of ``to_plain``: at 32 of 64 channels (2 of 4 heads of 16) the slimmable
    attention equals an ``nn.MultiheadAttention(32, 2)`` holding the first 32 rows of each of
    q, k and v (the first two heads of each), the first 32 input columns, and the first 32 rows
    and columns of the output projection, sliced here by hand."""
    torch.manual_seed(0)
    full = nn.MultiheadAttention(64, 4, batch_first=True)
    for p in full.parameters():
        nn.init.normal_(p, std=0.2)
    reference = nn.MultiheadAttention(32, 2, batch_first=True)
    w, b = full.in_proj_weight.detach(), full.in_proj_bias.detach()
    rows = [*range(0, 32), *range(64, 96), *range(128, 160)]
    with torch.no_grad():
        reference.in_proj_weight.copy_(w[rows][:, :32])
        reference.in_proj_bias.copy_(b[rows])
        reference.out_proj.weight.copy_(full.out_proj.weight[:32, :32])
        reference.out_proj.bias.copy_(full.out_proj.bias[:32])
    slim = usnet.nn.base.make_slimmable_(copy.deepcopy(full))
    active = usnet.nn.base.ActiveChannels(32)
    slim.__dict__.update(slim.active_attrs(active, active, None))
    x = torch.randn(2, 5, 32)
    got, _ = slim(x, x, x, need_weights=False)
    expected, _ = reference(x, x, x, need_weights=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    wrong = copy.deepcopy(reference)  # k and v from the query's rows: the shapes stay right
    with torch.no_grad():
        wrong.in_proj_weight.copy_(w[[*range(32)] * 3][:, :32])
    assert (wrong(x, x, x, need_weights=False)[0] - expected).abs().max() > 1e-2
