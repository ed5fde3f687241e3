"""BatchNorm statistics of a slimmable model: the per-configuration store, calibration's
running accumulation, the fast CPU statistics and the combination across ranks.

* :class:`WidthStats` is a layer's store: channel-configuration key -> ``(mean, var)``; the
  full-width statistics stay in the layer's own ``running_mean``/``running_var`` buffers (the
  plain model's ``state_dict``). :func:`snapshot`/:func:`restore` copy and put back every
  layer's statistics of a model (search tries candidates and keeps none of them);
  :func:`serialize`/:func:`load_serialized` are the checkpoint's ``bn_stats`` entry.
* :class:`Calibration` accumulates one configuration's statistics over calibration batches: the
  cumulative average (momentum ``1/t``), exactly PyTorch's ``momentum=None``.
* :func:`cpu_batch_stats` is the fast route for CPU batches; :func:`global_batch_stats` the
  statistics of a batch sharded across ranks (SyncBN in training, distributed calibration).

Nothing here imports the layers or :mod:`usnet.distributed`, which both use it; the process
group is :mod:`usnet.process_group`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import UsnetValueError
from ..process_group import world_size

__all__ = [
    "Calibration",
    "ModelStats",
    "WidthStats",
    "affine_normalize",
    "cpu_batch_stats",
    "global_batch_stats",
    "load_serialized",
    "restore",
    "serialize",
    "snapshot",
]


class WidthStats(dict):
    """One BatchNorm layer's statistics per channel configuration: ``key -> (mean, var)``."""

    def to(self, fn) -> WidthStats:
        """The store with ``fn`` applied to every tensor (``nn.Module._apply``: device, dtype)."""
        return WidthStats({k: (fn(m), fn(v)) for k, (m, v) in self.items()})


@dataclass
class Calibration:
    """Statistics being accumulated for one configuration (between ``start_calibration`` and
    ``finish_calibration``)."""

    mean: Tensor
    var: Tensor
    batches: int = 0
    distributed: bool = False  # each batch's statistics combine the shares of all ranks

    @classmethod
    def fresh(cls, channels: int, like: Tensor | None, distributed: bool = False) -> Calibration:
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        return cls(torch.zeros(channels, **kw), torch.ones(channels, **kw), 0, bool(distributed))

    @torch.no_grad()
    def accumulate(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """Fold one batch's statistics into the cumulative average (momentum 1/t; ``batches``
        already counts this batch)."""
        momentum = 1.0 / self.batches
        self.mean.mul_(1 - momentum).add_(mean.to(self.mean.dtype), alpha=momentum)
        self.var.mul_(1 - momentum).add_(unbiased_var.to(self.var.dtype), alpha=momentum)


# --- a model's statistics: snapshot, restore, serialize -------------------------------------------
@dataclass
class LayerStats:
    width_stats: dict[str, tuple[Tensor, Tensor]]
    own: (
        tuple[Tensor, Tensor, Tensor] | None
    )  # copies of running_mean, running_var, num_batches_tracked


ModelStats = dict[nn.Module, LayerStats]


def _is_slimmable_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and hasattr(module, "width_stats")


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_slimmable_bn(m)]


def _own_buffers(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    return bn.running_mean, bn.running_var, bn.num_batches_tracked


def snapshot(model: nn.Module) -> ModelStats:
    """Every slimmable BatchNorm's per-configuration statistics and a copy of its own running
    buffers (the full width's statistics, which calibration overwrites in place)."""
    saved: ModelStats = {}
    for bn in _bns(model):
        own = None
        if bn.track_running_stats and bn.running_mean is not None:
            own = tuple(t.clone() for t in _own_buffers(bn))
        saved[bn] = LayerStats(dict(bn.width_stats), own)
    return saved


def restore(model: nn.Module, saved: ModelStats, keep_new: Iterable[str | None] = ()) -> None:
    """Put back what :func:`snapshot` saved. The configurations in ``keep_new`` (their keys;
    None is the full width) keep what was calibrated since, where they had nothing before."""
    keep_new = set(keep_new)
    for bn in _bns(model):
        layer = saved[bn]
        fresh = {
            k: v for k, v in bn.width_stats.items() if k in keep_new and k not in layer.width_stats
        }
        bn.width_stats = WidthStats({**layer.width_stats, **fresh})
        if layer.own is not None and (None not in keep_new or stats_are_set(*layer.own)):
            with torch.no_grad():
                for buffer, value in zip(_own_buffers(bn), layer.own):
                    buffer.copy_(value)


def stats_are_set(mean: Tensor, var: Tensor, batches: Tensor) -> bool:
    """Whether running statistics were ever trained, calibrated or loaded. Weights saved before
    PyTorch 0.4 (some published torchvision ones) load with num_batches_tracked == 0 but
    non-initial statistics."""
    initial = not mean.any() and bool((var == 1).all())
    return not (initial and int(batches) == 0)


def serialize(model: nn.Module) -> dict[str, dict[str, list[Tensor]]]:
    """The per-configuration statistics of every layer by module name, as CPU tensors (the
    checkpoint's ``bn_stats``; the full width's are in the ``state_dict``)."""
    return {
        name: {
            key: [mean.detach().cpu(), var.detach().cpu()]
            for key, (mean, var) in m.width_stats.items()
        }
        for name, m in model.named_modules()
        if _is_slimmable_bn(m) and m.width_stats
    }


def load_serialized(
    model: nn.Module, entries: Mapping[str, Mapping[str, Any]], source: str = "checkpoint"
) -> None:
    """Load :func:`serialize`'s output into ``model`` (onto its device)."""

    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    for name, layer_entries in entries.items():
        layer = modules.get(name)
        if layer is None or not _is_slimmable_bn(layer):
            raise UsnetValueError(f"{source}: BN statistics for unknown layer {name!r}")
        layer.width_stats = WidthStats(
            {key: (mean.to(device), var.to(device)) for key, (mean, var) in layer_entries.items()}
        )


# --- batch statistics ------------------------------------------------------------------------------
# Above this ratio of squared mean to variance, E[x^2] - E[x]^2 from float32 sums loses more than
# about 1e-5 of the variance to cancellation; such channels take the exact two-pass kernel.
_MAX_MEAN_SQUARED_TO_VAR = 100.0


def cpu_batch_stats(input: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """Per-channel (mean, biased variance, count) of a contiguous NCHW float CPU batch, or None
    where the fast route does not apply (other devices, layouts, dtypes, tiny feature maps).

    Why: PyTorch's training-mode BatchNorm kernel for NCHW CPU input costs 7-10x its eval-mode
    kernel (one thread; ``docs/benchmarks.md``, calibration). Two plain row reductions (sum and
    norm over each image's H*W plane in float32, then over the batch in float64) cost about 1x,
    are as accurate as that kernel (variance within 1e-7 relative of float64), and the eval-mode
    kernel then normalizes with them. Channels-last input and CUDA keep ``F.batch_norm``, whose
    training-mode kernels are already within 2x of eval there.
    """
    if (
        input.device.type != "cpu"
        or input.dim() != 4
        or input.dtype not in (torch.float32, torch.float64)
        or not input.is_contiguous()
        or input.shape[2] * input.shape[3] < 16  # short rows: the native kernel is faster
        or input.requires_grad
    ):  # fmt: skip
        return None
    n, c, h, w = input.shape
    count = n * h * w
    rows = input.view(n, c, h * w)
    mean = rows.sum(-1).sum(0, dtype=torch.float64) / count
    squares = torch.linalg.vector_norm(rows, dim=-1).square().sum(0, dtype=torch.float64) / count
    var = (squares - mean * mean).clamp_min(0)
    if bool((mean * mean > _MAX_MEAN_SQUARED_TO_VAR * var).any()):
        return None
    return mean, var, count


def affine_normalize(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                      bias: Tensor | None, eps: float) -> Tensor:  # fmt: skip
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel of ``(N, C, ...)`` input, in
    the statistics' precision, returned in the input's dtype; differentiable in every argument
    (``F.batch_norm`` does not differentiate through given statistics)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return (input.to(scale.dtype) * scale.view(shape) + shift.view(shape)).to(input.dtype)


class _AllGather(torch.autograd.Function):
    """``all_gather`` as a differentiable op: (world, *shape) out, the summed slice back.

    The backward all-reduces the gradient of the gathered tensor (each rank's copy of it feeds
    that rank's loss) and keeps this rank's slice; ``all_reduce`` works on gloo and NCCL alike."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def global_batch_stats(input: Tensor, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(mean, biased variance, count)`` of ``input`` concatenated over all ranks.

    ``input`` is ``(N, C, ...)``; each rank may hold a different ``N``, also 0. Differentiable:
    gradients flow back to every rank's share of the batch (one ``all_reduce`` in the backward).
    Computed in float32 (float64 inputs stay float64); ``count`` (values per channel) is a
    0-dim tensor, so nothing waits for the device. Every rank of ``group`` must call it with the
    same ``C``, in the same order.
    """
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(dtype)
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = x.numel() // channels if channels else 0
    if count > 0:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    else:  # an empty shard still joins the collective, with zero weight
        mean = var = x.new_zeros(channels)
    local = torch.cat([x.new_full((1,), float(count)), mean, var])
    if world_size(group) > 1:
        gathered = _AllGather.apply(local, group)  # (world, 1 + 2C)
    else:
        gathered = local[None]
    counts = gathered[:, :1]
    means, variances = gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    total = counts.sum()
    weights = counts / total
    global_mean = (weights * means).sum(0)
    # Chan et al.: within-rank variances plus the spread of the rank means around the global one.
    global_var = (weights * (variances + (means - global_mean) ** 2)).sum(0)
    return global_mean, global_var, total
