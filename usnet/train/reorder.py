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
* ``"reconstruction"``: a joint order, not a per-channel score: each next channel is the one
  whose addition best preserves the consuming conv/linear layers' outputs, as the mean over
  their outputs of ``corr(output from the prefix, full output)^2``, computed exactly from the
  covariance of the layers' (unfolded) inputs on ``data`` (a greedy prefix reconstruction, in
  the spirit of ThiNet, Luo et al. 2017; correlation because the BatchNorm after a layer
  re-normalizes its output at every width). Needs ``data``. Groups without such a consumer
  (or only ones with over :data:`MAX_INPUTS` inputs) use ``bn``.

Per-layer scores are divided by their mean before they are summed over the layers of a group,
so that a wide-fan-in layer does not outvote the others. Layers with block structure (non-
depthwise grouped convs, GroupNorm) keep every channel in its block: the group is sorted within
blocks. A depthwise conv with a channel multiplier gives its output group the order of its input.

Each layer class says which of its tensors hold its input and output channels along which
dimension (``SlimmableLayer.channel_layout``, :class:`usnet.nn.ChannelLayout`).
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

from ..errors import UsnetValueError
from ..nn.base import ChannelLayout, ChannelTensor, SlimmableLayer
from ..nn.bn_stats import WidthStats
from ..nn.conv import SlimmableConvNd
from ..nn.linear import SlimmableLinear
from ..nn.norm import SlimmableBatchNorm2d
from ..state import Channels, SlimmableState, get_state, run_full_width, segments, set_width

logger = logging.getLogger(__name__)

Importance = Literal["l1", "bn", "taylor", "activation", "reconstruction"]
IMPORTANCES: tuple[str, ...] = ("l1", "bn", "taylor", "activation", "reconstruction")
NEEDS_DATA: tuple[str, ...] = ("taylor", "activation", "reconstruction")


class ReorderError(UsnetValueError):
    """The model's channels cannot be reordered (the message names the layer and why)."""


def channel_layout(layer: nn.Module) -> ChannelLayout:
    """Which tensors of a slimmable layer hold its channels: its class's ``channel_layout``."""
    layout = layer.channel_layout() if isinstance(layer, SlimmableLayer) else None
    if layout is None:
        raise ReorderError(
            f"cannot reorder the channels of a {type(layer).__name__}: its channel tensors are "
            "unknown (implement SlimmableLayer.channel_layout on its class)"
        )
    return layout


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


def _run_hooked(model: nn.Module, hooks: list[tuple[nn.Module, Callable]], data: Iterable,
                num_images: int | None, device: torch.device, importance: str) -> None:  # fmt: skip
    """Run ``data`` through ``model`` (no grad) with forward pre-hooks on the given layers."""
    handles = [layer.register_forward_pre_hook(hook) for layer, hook in hooks]
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
        raise UsnetValueError(f"importance={importance!r} got no batches from data")


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

    hooks = [(s.layer, hook(i, s.layout.input_dim)) for i, s in enumerate(watched)]
    _run_hooked(model, hooks, data, num_images, device, "activation")
    scores: dict[str, Tensor] = {}
    for i, site in enumerate(watched):
        if i not in sums:
            continue
        for group, factor, offset in site.spans:
            size = sizes[group]
            s = sums[i][offset : offset + size * factor].reshape(size, factor).sum(1)
            scores[group] = scores.get(group, 0) + _normalized(s)
    return scores


class _InputCovariance:
    """Running mean and second moment of a conv/linear layer's inputs as the layer sees them:
    unfolded ``(in_channels * kernel)`` patches of a conv, feature vectors of a linear layer."""

    ROWS = 16384  # rows per update: bounds the unfolded copy of a conv's input

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(self.layer, SlimmableLinear):
            self._add(x.reshape(-1, x.shape[-1]))
            return
        per_image = max(1, self.ROWS // max(1, x[0, 0].numel()))
        for chunk in x.split(per_image):
            self._add(_patches(chunk, self.layer))

    def _add(self, rows: Tensor) -> None:
        self.count += rows.shape[0]
        total = rows.sum(0, dtype=torch.float64)
        outer = (rows.T @ rows).double()  # float64 sums: the covariance subtracts large terms
        self.sum = total if self.sum is None else self.sum + total
        self.outer = outer if self.outer is None else self.outer + outer

    def covariance(self) -> Tensor:
        mean = self.sum / self.count
        return self.outer / self.count - torch.outer(mean, mean)


def _patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``(N * L, C * kh * kw)`` input patches of a 2-d conv, ordered as
    ``weight.reshape(out, -1)`` (zero padding: the statistics need not be exact at the border)."""
    padding = conv.padding
    if isinstance(padding, str):  # "valid" / "same"
        pad = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1) if padding == "same" else 0
            pad += [total // 2, total - total // 2]
        x, padding = F.pad(x, pad), 0
    cols = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _reconstructs(site: _Site) -> bool:
    """Consumers whose outputs the ``reconstruction`` order preserves: dense 2-d convs (every
    output sees every input channel) and linear layers."""
    layer = site.layer
    if site.side != "in":
        return False
    if isinstance(layer, SlimmableLinear):
        return True
    return isinstance(layer, SlimmableConvNd) and isinstance(layer, nn.Conv2d) and layer.groups == 1


def _greedy_prefix_order(terms: list[tuple[Tensor, Tensor]], size: int) -> Tensor:
    """Greedy order of ``size`` channels maximizing, per step, the mean over the consumers (and
    over each consumer's outputs) of ``corr(z_prefix, z)^2``.

    Each term is ``(weight, covariance)`` of one consumer restricted to the group: ``weight``
    ``(out, size, P)`` and ``covariance`` ``(size, P, size, P)`` of the ``P`` input entries of
    each channel (kernel positions, flattened positions). With ``z_o = sum_c w_oc . x_c``:
    ``cov(z_S, z_o) = sum_{c in S} U[c, o]`` and ``var(z_S) = sum_{c, d in S} w_oc S_cd w_od``,
    updated one channel at a time (``cross``: each candidate's covariance with the prefix).
    Cost ``size^2 * P^2 * out`` per consumer."""
    terms_state = []
    for w, cov in terms:
        out, _, p = w.shape
        flat = cov.reshape(size * p, size * p)
        t = (flat @ w.reshape(out, -1).T).reshape(size, p, out)  # cov(x_c, z_o)
        w_cpo = w.permute(1, 2, 0).contiguous()  # (size, P, out)
        u = (w_cpo * t).sum(1)  # (size, out): cov(z_c, z_o), z_c channel c's part of z_o
        channels = torch.arange(size)
        blocks = cov[channels, :, channels, :]  # (size, P, P): each channel's own covariance
        diag = torch.einsum("cpo,cpq,cqo->co", w_cpo, blocks, w_cpo)  # var(z_c)
        # in units of var(z_o), so that corr^2 = (cov / var)^2 / (var(z_S) / var) needs no var
        # later; float32 from here: sums of positive terms, no cancellation left
        scale = u.sum(0).clamp_min(1e-30).rsqrt()  # 1 / std(z_o)
        u, diag = (u * scale**2).float(), (diag * scale**2).float()
        w_cpo, cov = (w_cpo * scale).float(), cov.permute(2, 0, 1, 3).float().contiguous()
        zeros = torch.zeros(out)
        terms_state.append([w_cpo, cov, u, diag, zeros, zeros, torch.zeros_like(u)])
    # a channel that adds nothing to any output (zero weights or a constant input) would tie
    # with the prefix as it is and could come before channels that matter: it goes last
    silent = sum(term[3].sum(1) for term in terms_state) <= 0
    chosen = torch.zeros(size, dtype=torch.bool)
    order = []
    for _ in range(size):
        score = torch.zeros(size)
        for w_cpo, cov, u, diag, a, b, cross in terms_state:
            den = (b + 2 * cross + diag).clamp_min(1e-30)
            score += ((a + u).square_() / den).mean(1)
        score[silent] = -0.5
        score[chosen] = -1
        c = int(torch.argmax(score))
        order.append(c)
        chosen[c] = True
        for item in terms_state:
            w_cpo, cov, u, diag, a, b, cross = item
            item[4] = a + u[c]
            item[5] = b + 2 * cross[c] + diag[c]
            # each candidate's part's covariance with channel c's part, per output
            item[6] = cross + (w_cpo * (cov[c] @ w_cpo[c])).sum(1)
    return torch.tensor(order)


MAX_OUTPUTS = 256
"""``reconstruction`` averages over at most this many outputs of a consumer (evenly spaced):
the greedy order costs ``size^2 * outputs`` per consumer."""


MAX_INPUTS = 4608
"""Consumers with more (unfolded) inputs than this (a 3x3 conv on 512 channels) are left out of
``reconstruction``: their input covariance would take ``inputs^2`` doubles (170 MB here)."""


def _reconstruction_scores(model: nn.Module, sites: list[_Site], sizes: Mapping[str, int],
                           movable: set[str], data: Iterable, num_images: int | None,
                           device: torch.device) -> dict[str, Tensor]:  # fmt: skip
    consumers = [s for s in sites if _reconstructs(s) and any(g in movable for g, _, _ in s.spans)
                 and s.layer.weight[0].numel() <= MAX_INPUTS]  # fmt: skip
    stats = [_InputCovariance(s.layer) for s in consumers]
    hooks = [(s.layer, stat) for s, stat in zip(consumers, stats)]
    _run_hooked(model, hooks, data, num_images, device, "reconstruction")
    terms: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for site, stat in zip(consumers, stats):
        if stat.count == 0:
            continue
        cov = stat.covariance()
        weight = site.layer.weight.detach().double()
        weight = weight.reshape(weight.shape[0], -1)
        linear = isinstance(site.layer, SlimmableLinear)
        kernel = 1 if linear else weight.shape[1] // site.layer.in_channels
        for group, factor, offset in site.spans:
            if group not in movable:
                continue
            size = sizes[group]
            p = factor * kernel
            idx = slice(offset * kernel, (offset + size * factor) * kernel)
            w = weight[:, idx].reshape(-1, size, p)
            c = cov[idx, idx].reshape(size, p, size, p)
            terms.setdefault(group, []).append((w, c))
    scores = {}
    for group, group_terms in terms.items():
        subsets = []
        for w, c in group_terms:
            if w.shape[0] > MAX_OUTPUTS:  # the mean over outputs, estimated on a subset
                w = w[torch.linspace(0, w.shape[0] - 1, MAX_OUTPUTS).long()]
            subsets.append((w, c))
        order = _greedy_prefix_order(subsets, sizes[group])
        score = torch.empty(sizes[group])
        score[order] = torch.arange(sizes[group], 0, -1, dtype=score.dtype)  # first = highest
        scores[group] = score
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
        if site.side == "out" and isinstance(layer, SlimmableConvNd) and layer.is_depthwise:
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
        importance: ``"l1"``, ``"bn"``, ``"taylor"``, ``"activation"`` or ``"reconstruction"``
            (module docstring).
        data: batches for ``"taylor"`` (``(images, labels)``), ``"activation"`` and
            ``"reconstruction"``: a
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
    if importance in NEEDS_DATA and data is None:
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
        elif importance == "reconstruction":
            scores = _magnitude_scores(sites, sizes, "scale")  # groups without a consumer
            movable = {name for name, g in plan.groups.items() if not g.fixed}
            scores.update(
                _reconstruction_scores(model, sites, sizes, movable, data, num_images, device)
            )
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


def _drop_width_stats(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, SlimmableBatchNorm2d):
            if module.width_stats:
                count += 1
            module.width_stats = WidthStats()
            module._own_stats_cache = None
    return count


__all__ = ["IMPORTANCES", "ReorderError", "channel_layout", "reorder_channels"]  # fmt: skip
