"""Accuracy of a slimmable model across widths: the one evaluation every command uses.

:func:`evaluate` runs each batch once per width (the batch is loaded once for all widths), in
eval mode and without autograd, and restores the model's width and mode afterwards;
:func:`eval_forward` is the same for one batch at one width (export verification). The trainer,
``usnet eval``, ``usnet search`` and the benchmarks call these, so a number means the same
everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist
from .channels import Width
from .errors import UsnetValueError
from .progress import progress_bar
from .state import keep_width_and_mode, set_width

__all__ = ["eval_forward", "evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[tuple[Tensor, Tensor]], widths: Sequence[Width],
             device: torch.device | None = None, *, distributed: bool = False, progress: bool = False,
             loss: bool = False) -> list[tuple[float, ...]]:  # fmt: skip
    """Top-1 and top-5 accuracy (fractions) at each width of ``widths`` on ``data`` (a
    ``DataLoader`` or any iterable of ``(images, labels)`` batches); with ``loss=True`` also the
    mean cross-entropy (``inf`` where it overflows): ``(top1, top5, loss)`` per width.

    ``distributed=True`` (in a process group, on every rank): ``data`` holds this rank's share
    and the counts are summed over the ranks (exact integers), so every rank returns the
    accuracy on the whole data."""
    param = next(model.parameters())
    device = device or param.device
    correct1 = [0] * len(widths)
    correct5 = [0] * len(widths)
    losses = [0.0] * len(widths)
    total = 0
    bar = progress_bar(len(data) if hasattr(data, "__len__") else 0, progress, "evaluating")
    with keep_width_and_mode(model, training=False):
        try:
            for images, labels in data:
                dtype = param.dtype if images.is_floating_point() else None  # a float64 model too
                images, labels = images.to(device=device, dtype=dtype), labels.to(device)
                total += labels.shape[0]
                for i, w in enumerate(widths):
                    set_width(model, w)
                    logits = model(images)
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    hits = top == labels[:, None]
                    correct1[i] += int(hits[:, 0].sum())
                    correct5[i] += int(hits.any(dim=1).sum())
                    if loss:
                        losses[i] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                bar.update(1)
        finally:
            bar.close()
    if distributed:
        summed = dist.all_reduce_sum([total, *correct1, *correct5])
        total, correct1 = summed[0], summed[1 : 1 + len(widths)]
        correct5 = summed[1 + len(widths) :]
        if loss:
            losses = dist.all_reduce_sum(losses)
    if total == 0:
        raise UsnetValueError("evaluation data is empty")
    if not loss:
        return [(c1 / total, c5 / total) for c1, c5 in zip(correct1, correct5)]
    means = [s / total if math.isfinite(s) else math.inf for s in losses]
    return [(c1 / total, c5 / total, m) for c1, c5, m in zip(correct1, correct5, means)]


def eval_forward(model: nn.Module, width: Width, images: Tensor) -> Tensor:
    """``model``'s output on ``images`` in eval mode at ``width``, without autograd; the input is
    moved to the model's device and dtype, and the model's mode and width are restored."""
    param = next(model.parameters())
    with torch.no_grad(), keep_width_and_mode(model, width=width, training=False):
        return model(images.to(device=param.device, dtype=param.dtype))
