"""Channel reordering by importance: make the first channels of every group the ones that matter.

A slimmable model runs on a *prefix* of each channel group. A model trained at full width (a
torchvision checkpoint, a plain network of one's own) has channels in no particular order, so
its narrow widths start near chance. :func:`reorder_channels` scores every channel of every
non-fixed group, aggregated over all the layers that produce or consume the group (a residual
group is scored once), and permutes the group's channels, most important first, consistently in
every tensor that holds them: conv/linear weights along their output and input dimensions, biases,
norm affine parameters and running statistics, flattened features (``H*W`` entries per channel),
concatenation segments, parameters used in the graph. The full-width function is unchanged.

Importances (``importance=``):

* ``"l1"``: L1 norm of the channel's weights in every conv/linear producing or consuming it
  (Li et al. 2017, "Pruning Filters for Efficient ConvNets"; group sum as in Torch-Pruning).
* ``"bn"``: |scale| of the channel in the group's norm layers (Liu et al. 2017, "Learning
  Efficient Convolutional Networks through Network Slimming"); groups without one use ``l1``.
* ``"taylor"``: first-order Taylor estimate of the loss change when the channel is removed,
  ``(sum over the group's parameters of w * dL/dw)^2`` summed over batches (Molchanov et al.
  2019, "Importance Estimation for Neural Network Pruning"). Needs ``data`` with labels.
* ``"activation"``: mean |activation| of the channel at the inputs of the layers that see it
  (as Minitron's activation importance and OFA's channel sorting). Needs ``data``.

Per-layer scores are divided by their mean before they are summed over the layers of a group,
so that a wide-fan-in layer does not outvote the others. Layers with block structure (non-
depthwise grouped convs, GroupNorm) keep every channel in its block: the group is sorted within
blocks. A depthwise conv with a channel multiplier gives its output group the order of its input.

Layer types are handled through :data:`CHANNEL_TENSORS` (:func:`register_channel_tensors`):
which of a layer's tensors hold its input and output channels along which dimension.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn_stats import WidthStats
from .errors import UsnetValueError
from .layers import (
    SlimmableBatchNorm2d,
    SlimmableConvTranspose2d,
    SlimmableGroupNorm,
    SlimmableLayerNorm,
    SlimmableLinear,
    SlimmableMultiheadAttention,
    _PerChannelAffine,
    _SlimmableConvNd,
)
from .params import SlicedParameters
from .state import Channels, SlimmableState, _layer_updates, get_state, segments, set_width

logger = logging.getLogger(__name__)

Importance = Literal["l1", "bn", "taylor", "activation"]
IMPORTANCES: tuple[str, ...] = ("l1", "bn", "taylor", "activation")


class ReorderError(UsnetValueError):
    """The model's channels cannot be reordered (the message names the layer and why)."""


# --- which tensors hold a layer's channels -----------------------------------------------------
@dataclass(frozen=True)
class ChannelTensor:
    """One tensor of a layer that holds channels: attribute ``name``, tensor dimension ``dim``,
    on the layer's ``side`` (``"in"`` or ``"out"``; a "features" layer has only ``"out"``).
    ``grouped``: a grouped conv's weight, whose input dimension holds ``in / groups`` channels
    of each conv group. ``weight``: counts for the ``l1`` importance (conv/linear weights);
    ``scale``: counts for the ``bn`` importance (norm scales)."""

    name: str
    dim: int
    side: Literal["in", "out"]
    grouped: int = 1
    weight: bool = False
    scale: bool = False


@dataclass(frozen=True)
class ChannelLayout:
    """A layer's channel tensors, where its input's channels are (``input_dim``, for the
    ``activation`` importance), and the block size its channels must stay within (0: none)."""

    tensors: tuple[ChannelTensor, ...]
    input_dim: int | None = 1
    in_block: int = 0
    out_block: int = 0


CHANNEL_TENSORS: dict[type, Callable[[nn.Module], ChannelLayout]] = {}
"""Registry: slimmable layer type -> its :class:`ChannelLayout` (looked up along the MRO)."""


def register_channel_tensors(
    layer_type: type, layout: Callable[[nn.Module], ChannelLayout]
) -> None:
    """Teach :func:`reorder_channels` a slimmable layer type: ``layout(layer)`` says which of its
    tensors hold its channels."""
    CHANNEL_TENSORS[layer_type] = layout


def _conv_layout(conv: _SlimmableConvNd) -> ChannelLayout:
    out = [ChannelTensor("weight", 0, "out", weight=True), ChannelTensor("bias", 0, "out")]
    if conv.is_depthwise:  # one input channel per output (group): no input dimension to permute
        return ChannelLayout(tuple(out))
    g = conv.groups
    out.append(ChannelTensor("weight", 1, "in", grouped=g, weight=True))
    blocks = (conv.in_channels // g, conv.out_channels // g) if g > 1 else (0, 0)
    return ChannelLayout(tuple(out), 1, *blocks)


def _linear_layout(linear: SlimmableLinear) -> ChannelLayout:
    return ChannelLayout((ChannelTensor("weight", 0, "out", weight=True), ChannelTensor("bias", 0, "out"),
                          ChannelTensor("weight", 1, "in", weight=True)), input_dim=-1)  # fmt: skip


def _conv_transpose_layout(conv: SlimmableConvTranspose2d) -> ChannelLayout:
    return ChannelLayout((ChannelTensor("weight", 1, "out", weight=True), ChannelTensor("bias", 0, "out"),
                          ChannelTensor("weight", 0, "in", weight=True)))  # fmt: skip


def _affine(scale: bool = True) -> tuple[ChannelTensor, ...]:
    return (ChannelTensor("weight", 0, "out", scale=scale), ChannelTensor("bias", 0, "out"))


def _bn_layout(bn: SlimmableBatchNorm2d) -> ChannelLayout:
    stats = (ChannelTensor("running_mean", 0, "out"), ChannelTensor("running_var", 0, "out"))
    return ChannelLayout(_affine() + stats)


def _layer_norm_layout(norm: SlimmableLayerNorm) -> ChannelLayout:
    channels_last = type(norm).forward is SlimmableLayerNorm.forward
    return ChannelLayout(_affine(), input_dim=-1 if channels_last else 1)


def _group_norm_layout(norm: SlimmableGroupNorm) -> ChannelLayout:
    return ChannelLayout(_affine(), out_block=norm.group_size)


def _per_channel_layout(layer: _PerChannelAffine) -> ChannelLayout:
    return ChannelLayout(_affine(scale=False))


def _attention_layout(mha: SlimmableMultiheadAttention) -> ChannelLayout:
    """The embedding channels: in-projection columns and out-projection rows (the heads inside
    keep their order)."""
    return ChannelLayout((ChannelTensor("in_proj_weight", 1, "in", weight=True),
                          ChannelTensor("out_proj.weight", 0, "out", weight=True),
                          ChannelTensor("out_proj.bias", 0, "out")), input_dim=-1)  # fmt: skip


def _sliced_layout(owner: SlicedParameters) -> ChannelLayout:
    sliced = owner.__dict__.get("usnet_sliced", {})
    return ChannelLayout(
        tuple(ChannelTensor(n, d, "out") for n, d in sliced.items()), input_dim=None
    )


register_channel_tensors(_SlimmableConvNd, _conv_layout)
register_channel_tensors(SlimmableLinear, _linear_layout)
register_channel_tensors(SlimmableConvTranspose2d, _conv_transpose_layout)
register_channel_tensors(SlimmableBatchNorm2d, _bn_layout)
register_channel_tensors(SlimmableLayerNorm, _layer_norm_layout)
register_channel_tensors(SlimmableGroupNorm, _group_norm_layout)
register_channel_tensors(_PerChannelAffine, _per_channel_layout)
register_channel_tensors(SlicedParameters, _sliced_layout)
register_channel_tensors(SlimmableMultiheadAttention, _attention_layout)


def channel_layout(layer: nn.Module) -> ChannelLayout:
    """The :class:`ChannelLayout` of a slimmable layer (its most specific registered type)."""
    for cls in type(layer).__mro__:
        if cls in CHANNEL_TENSORS:
            return CHANNEL_TENSORS[cls](layer)
    raise ReorderError(
        f"cannot reorder the channels of a {type(layer).__name__}: its channel tensors are unknown "
        "(usnet.reorder.register_channel_tensors can add it)"
    )


# --- the layers of the model, as (layer, side, segments with offsets) --------------------------
@dataclass
class _Site:
    """One side of one bound layer: its tensors on that side and the segments they hold."""

    name: str
    layer: nn.Module
    layout: ChannelLayout
    side: str
    spans: list[tuple[str, int, int]]  # (group, factor, offset) per segment

    @property
    def tensors(self) -> list[ChannelTensor]:
        return [
            t
            for t in self.layout.tensors
            if t.side == self.side and _get(self.layer, t.name) is not None
        ]


def _spans(channels: Channels, state: SlimmableState) -> list[tuple[str, int, int]]:
    out, offset = [], 0
    for group, factor in segments(channels):
        out.append((group, factor, offset))
        offset += state.plan.groups[group].size * factor
    return out


def _sites(model: nn.Module, state: SlimmableState) -> list[_Site]:
    sites = []
    for b in state.bindings:
        layer = model.get_submodule(b.layer)
        layout = channel_layout(layer)
        if getattr(layer, "private_affine", None):
            raise ReorderError(
                f"cannot reorder {b.layer!r}: switchable BN keeps private parameters per width; "
                "reorder before usnet.state.enable_switchable_bn"
            )
        if b.inputs is not None:
            sites.append(_Site(b.layer, layer, layout, "in", _spans(b.inputs, state)))
        sites.append(_Site(b.layer, layer, layout, "out", _spans(b.outputs, state)))
    return sites


def _get(layer: nn.Module, name: str) -> Tensor | None:
    owner_name, _, name = name.rpartition(".")  # "out_proj.weight": a submodule's tensor
    layer = layer.get_submodule(owner_name) if owner_name else layer
    value = layer._parameters.get(name, layer._buffers.get(name))
    return value if isinstance(value, Tensor) else None


def _per_channel(tensor: Tensor, t: ChannelTensor, span: tuple[str, int, int], size: int,
                 reduce: Callable[[Tensor], Tensor]) -> Tensor:  # fmt: skip
    """``reduce`` (over the last dimension) of each channel's entries of ``tensor`` in ``span``."""
    group, factor, offset = span
    if t.grouped > 1:  # (out, in/g, ...): input channel c of conv group c // (in/g)
        g = t.grouped
        x = tensor.movedim(t.dim, 1)
        x = x.reshape(g, x.shape[0] // g, x.shape[1], -1)  # (g, out/g, in/g, rest)
        values = reduce(x.permute(0, 2, 1, 3).reshape(g * x.shape[2], -1))
        return values[offset : offset + size * factor].reshape(size, factor).sum(1)
    x = tensor.movedim(t.dim, 0)[offset : offset + size * factor]
    return reduce(x.reshape(size, -1))


# --- importance ----------------------------------------------------------------------------------
def _normalized(score: Tensor) -> Tensor:
    mean = score.mean()
    return score / mean if mean > 0 else score


def _magnitude_scores(
    sites: list[_Site], sizes: Mapping[str, int], which: str
) -> dict[str, Tensor]:
    scores: dict[str, Tensor] = {}
    for site in sites:
        for t in site.tensors:
            if not getattr(t, which):
                continue
            tensor = _get(site.layer, t.name).detach().float()
            for span in site.spans:
                s = _per_channel(tensor, t, span, sizes[span[0]], lambda x: x.abs().sum(1))
                scores[span[0]] = scores.get(span[0], 0) + _normalized(s)
    return scores


def _batches(data: Iterable, num_images: int | None) -> Iterable[tuple[Tensor, Tensor | None]]:
    seen = 0
    for batch in data:
        if isinstance(batch, (tuple, list)):
            images, labels = batch[0], batch[1] if len(batch) > 1 else None
        else:
            images, labels = batch, None
        if num_images is not None:
            images = images[: num_images - seen]
            labels = None if labels is None else labels[: num_images - seen]
        yield images, labels
        seen += images.shape[0]
        if num_images is not None and seen >= num_images:
            return


def _taylor_scores(model: nn.Module, sites: list[_Site], sizes: Mapping[str, int], data: Iterable,
                   num_images: int | None, device: torch.device) -> dict[str, Tensor]:  # fmt: skip
    params = [(site, t) for site in sites for t in site.tensors
              if isinstance(_get(site.layer, t.name), nn.Parameter)]  # fmt: skip
    scores: dict[str, Tensor] = {}
    batches = 0
    for images, labels in _batches(data, num_images):
        if labels is None:
            raise UsnetValueError("importance='taylor' needs labelled batches: (images, labels)")
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        loss.backward()
        batch: dict[str, Tensor] = {}
        for site, t in params:
            p = _get(site.layer, t.name)
            if p.grad is None:
                continue
            # a weight counts on both of its sides: the channel's contribution through the
            # layers producing it and through those consuming it
            wg = (p.detach() * p.grad).float()
            for span in site.spans:
                s = _per_channel(wg, t, span, sizes[span[0]], lambda x: x.sum(1))
                batch[span[0]] = batch.get(span[0], 0) + s
        for group, s in batch.items():
            scores[group] = scores.get(group, 0) + s.pow(2)
        batches += 1
    model.zero_grad(set_to_none=True)
    if not batches:
        raise UsnetValueError("importance='taylor' got no batches from data")
    return scores


def _activation_scores(model: nn.Module, sites: list[_Site], sizes: Mapping[str, int], data: Iterable,
                       num_images: int | None, device: torch.device) -> dict[str, Tensor]:  # fmt: skip
    watched = [s for s in sites if s.layout.input_dim is not None
               and (s.side == "in" or s.layer.channel_role == "features")]  # fmt: skip
    sums: dict[int, Tensor] = {}

    def hook(index: int, dim: int):
        def record(module, args):
            x = args[0].detach().float().abs().movedim(dim, -1)
            total = x.reshape(-1, x.shape[-1]).mean(0)
            sums[index] = sums.get(index, 0) + total

        return record

    handles = [
        s.layer.register_forward_pre_hook(hook(i, s.layout.input_dim))
        for i, s in enumerate(watched)
    ]
    batches = 0
    try:
        with torch.no_grad():
            for images, _ in _batches(data, num_images):
                model(images.to(device))
                batches += 1
    finally:
        for h in handles:
            h.remove()
    if not batches:
        raise UsnetValueError("importance='activation' got no batches from data")
    scores: dict[str, Tensor] = {}
    for i, site in enumerate(watched):
        if i not in sums:
            continue
        for group, factor, offset in site.spans:
            size = sizes[group]
            s = sums[i][offset : offset + size * factor].reshape(size, factor).sum(1)
            scores[group] = scores.get(group, 0) + _normalized(s)
    return scores


# --- permutations --------------------------------------------------------------------------------
def _block_sizes(sites: list[_Site], state: SlimmableState) -> dict[str, int]:
    """Per group, the block size its permutation must keep channels within (gcd over layers)."""
    blocks: dict[str, int] = {}
    for site in sites:
        block = site.layout.in_block if site.side == "in" else site.layout.out_block
        if not block:
            continue
        for group, factor, offset in site.spans:
            size = state.plan.groups[group].size
            if factor != 1 or offset % block or size % block:
                raise ReorderError(f"cannot reorder {site.name!r}: its channel blocks of {block} "
                                   f"straddle channel group {group!r}")  # fmt: skip
            blocks[group] = math.gcd(blocks.get(group, 0), block)
    return blocks


def _sorted_within(score: Tensor, block: int) -> Tensor:
    """Indices sorting ``score`` in decreasing order within consecutive blocks (stable)."""
    size = score.numel()
    block = block or size
    order = torch.argsort(-score.reshape(size // block, block), dim=1, stable=True)
    return (order + torch.arange(0, size, block).unsqueeze(1)).reshape(-1)


def _induced(state: SlimmableState, sites: list[_Site]) -> dict[str, tuple[str, int]]:
    """Groups whose order is that of another group: the output of a depthwise conv with a
    channel multiplier m (output channel o reads input channel o // m)."""
    induced = {}
    by_layer: dict[str, dict[str, list]] = {}
    for s in sites:
        by_layer.setdefault(s.name, {})[s.side] = s.spans
    for site in sites:
        layer = site.layer
        if site.side == "out" and isinstance(layer, _SlimmableConvNd) and layer.is_depthwise:
            ((child, _, _),) = site.spans
            ((parent, _, _),) = by_layer[site.name]["in"]
            if parent != child:
                induced[child] = (parent, layer.out_channels // layer.in_channels)
    return induced


def _index(
    spans: list[tuple[str, int, int]], perms: Mapping[str, Tensor], sizes: Mapping[str, int]
) -> Tensor:
    parts = []
    for group, factor, offset in spans:
        perm = perms.get(group)
        if perm is None:
            perm = torch.arange(sizes[group])
        parts.append((perm.unsqueeze(1) * factor + torch.arange(factor)).reshape(-1) + offset)
    return torch.cat(parts)


def _permute_tensor(tensor: Tensor, t: ChannelTensor, index: Tensor) -> None:
    index = index.to(tensor.device)
    with torch.no_grad():
        if t.grouped > 1:  # permute each conv group's input columns within the group
            g, k = t.grouped, tensor.shape[t.dim]
            local = index.reshape(g, k) - torch.arange(g, device=index.device).unsqueeze(1) * k
            rows = tensor.shape[0] // g
            gather = local.repeat_interleave(rows, dim=0)  # (out, k)
            gather = gather.reshape(*gather.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
            tensor.copy_(torch.gather(tensor, 1, gather))
        else:
            tensor.copy_(tensor.index_select(t.dim, index))


def reorder_channels(model: nn.Module, importance: Importance = "l1", data: Iterable | None = None,
                     num_images: int | None = 512, log: Callable[[str], None] | None = None
                     ) -> dict[str, Tensor]:  # fmt: skip
    """Permute the channels of every non-fixed channel group of a slimmable ``model``, most
    important first, in every layer that holds them; the full-width function is unchanged.

    Args:
        importance: ``"l1"``, ``"bn"``, ``"taylor"`` or ``"activation"`` (module docstring).
        data: batches for ``"taylor"`` (``(images, labels)``) and ``"activation"``: a
            ``DataLoader`` or a list of batches, run at full width with dropout off and
            BatchNorm on batch statistics (a converted model need not be calibrated yet).
        num_images: the most images of ``data`` used (None: all).
        log: where the note about dropped BN statistics goes (default: the module logger).

    Per-width BatchNorm statistics describe the old channel order: they are dropped (calibrate
    again); the full-width statistics are permuted with the channels. Reorder before creating an
    optimizer (its momentum buffers would keep the old order).

    Returns the permutation of every reordered group (new position -> old channel).
    """
    if importance not in IMPORTANCES:
        raise UsnetValueError(f"unknown importance {importance!r}; valid: {', '.join(IMPORTANCES)}")
    if importance in ("taylor", "activation") and data is None:
        raise UsnetValueError(
            f"importance={importance!r} needs data= (a loader or a list of batches)"
        )
    state = get_state(model)
    sites = _sites(model, state)
    plan = state.plan
    sizes = {name: g.size for name, g in plan.groups.items()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    previous, modes = state.width, {m: m.training for m in model.modules()}
    try:
        run_full_width(model, state)
        for m in model.modules():  # BN on batch statistics (updating none), dropout off
            m.training = isinstance(m, nn.modules.batchnorm._BatchNorm)
        if importance == "taylor":
            scores = _taylor_scores(model, sites, sizes, data, num_images, device)
        elif importance == "activation":
            scores = _activation_scores(model, sites, sizes, data, num_images, device)
        elif importance == "bn":
            scores = _magnitude_scores(sites, sizes, "scale")
        else:
            scores = {}
        fallback = _magnitude_scores(sites, sizes, "weight")
    finally:
        for m, mode in modes.items():
            m.training = mode
    blocks = _block_sizes(sites, state)
    induced = _induced(state, sites)
    perms: dict[str, Tensor] = {}
    for name, group in plan.groups.items():
        if group.fixed:
            continue
        if name in induced:
            parent, m = induced[name]
            base = perms.get(parent, torch.arange(sizes[parent]))
            perms[name] = (base.unsqueeze(1) * m + torch.arange(m)).reshape(-1)
        else:
            score = scores.get(name, fallback.get(name))
            if score is None:
                continue
            perms[name] = _sorted_within(score.cpu(), blocks.get(name, 0))
        block = blocks.get(name, 0)
        if block and not torch.equal(perms[name] // block, torch.arange(sizes[name]) // block):
            raise ReorderError(f"cannot reorder channel group {name!r}: its order is tied to a "
                               f"group whose blocks differ")  # fmt: skip
    for site in sites:
        index = _index(site.spans, perms, sizes)
        if not torch.equal(index, torch.arange(index.numel())):
            for t in site.tensors:
                _permute_tensor(_get(site.layer, t.name), t, index)
    dropped = _drop_width_stats(model)
    set_width(model, previous)
    message = (f"reordered the channels of {len(perms)} groups by {importance} importance"
               + (f"; dropped the per-width BatchNorm statistics of {dropped} layers (they describe "
                  "the old channel order): run usnet.calibrate(model, data, widths=[...]) again"
                  if dropped else ""))  # fmt: skip
    (log or logger.info)(message)
    return perms


def run_full_width(model: nn.Module, state: SlimmableState) -> None:
    """Every layer at its full channels (also when the width range stops below 1.0)."""
    for parent, name, layer, attrs in _layer_updates(model, state, state.full_config):
        layer.__dict__.update(attrs)
        if "width_label" in attrs:
            layer.__dict__["width_label"] = "full width"
    state._applied = state.full_config


def _drop_width_stats(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, SlimmableBatchNorm2d):
            if module.width_stats:
                count += 1
            module.width_stats = WidthStats()
            module._own_stats_cache = None
    return count


__all__ = ["CHANNEL_TENSORS", "ChannelLayout", "ChannelTensor", "IMPORTANCES", "ReorderError",
           "register_channel_tensors", "reorder_channels"]  # fmt: skip
