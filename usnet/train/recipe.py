"""The paper's optimization recipe: parameter groups without weight decay on norms, biases,
depthwise convolutions and per-channel parameters, SGD with Nesterov momentum or AdamW, and a
per-iteration warmup + linear/cosine learning-rate decay."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..errors import UsnetValueError
from ..nn import slimmable_class_of

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "lr_lambda",
    "make_optimizer",
    "make_scheduler",
    "param_groups",
]

SCHEDULES = ("linear", "cosine")
"""Learning-rate decay shapes accepted by :func:`lr_lambda` and :func:`make_scheduler`."""

WEIGHT_DECAY = 5e-5
SCHEDULE = "cosine"
"""The recipe's defaults, for the Python API and the run config (``weight_decay``,
``lr_schedule``) alike."""


# -- optimizer -----------------------------------------------------------------------------------
def _decayed(module: nn.Module) -> list[nn.Parameter]:
    """The weight-decayed parameters ``module`` holds directly: what its slimmable class (its
    own, or the one registered for its plain type) names in ``decayed_weights``."""
    cls = slimmable_class_of(module)
    if cls is None:
        return []
    # _parameters, not getattr: a slimmable module may show a slice of the parameter.
    found = (module._parameters.get(name) for name in cls.decayed_weights(module))
    return [p for p in found if p is not None]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the parameters into a weight-decayed and a non-decayed group (the paper's recipe,
    also the usual vision transformer one).

    Weight decay applies only to the matrix weights of convolutions, linear layers and attention
    input projections (each layer class's ``decayed_weights``). Normalization parameters (BatchNorm, LayerNorm,
    GroupNorm), all biases, the weights of depthwise convolutions (``groups == in_channels >
    1``) and every parameter a module holds directly (a class token, a position embedding, a
    layer scale) get none. Every parameter of the model (shared ones once) is in exactly one
    group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay},
        {"params": not_decayed, "weight_decay": 0.0}]``, ready for ``torch.optim.SGD`` or
        ``torch.optim.AdamW``.
    """
    if not weight_decay >= 0:
        raise UsnetValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed_ids = {id(p) for module in model.modules() for p in _decayed(module)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():  # deduplicated, in registration order
        (decay if id(p) in decayed_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]


OPTIMIZERS = ("sgd", "adamw")
"""Optimizer kinds of :func:`make_optimizer` (and of the run config's ``optimizer`` key)."""


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = WEIGHT_DECAY,
    nesterov: bool = True,
    *,
    kind: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """An optimizer over :func:`param_groups` (weight decay on conv/linear weights only).

    * ``kind="sgd"``: SGD with ``momentum`` and ``nesterov`` (the paper: momentum 0.9,
      Nesterov, weight decay 1e-4).
    * ``kind="adamw"``: ``torch.optim.AdamW`` with ``betas`` and decoupled weight decay (the
      usual vision transformer recipe, e.g. lr 1e-3 and weight decay 0.05 at batch 1024);
      ``momentum`` and ``nesterov`` are not used.
    """
    if kind not in OPTIMIZERS:
        raise UsnetValueError(
            f"unknown optimizer {kind!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    groups = param_groups(model, weight_decay)
    if kind == "adamw":
        betas = tuple(betas)  # type: ignore[assignment]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise UsnetValueError(f"betas must be (beta1, beta2), each in [0, 1), got {betas}")
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if nesterov and momentum <= 0:
        raise UsnetValueError(f"nesterov momentum needs momentum > 0, got {momentum}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


# -- learning-rate schedule ----------------------------------------------------------------------
def lr_lambda(
    step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "linear"
) -> float:
    """The learning-rate factor of iteration ``step`` (0-based), for ``LambdaLR``.

    * Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, from ``1/warmup_steps``
      up to 1.
    * Decay, with ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` going from 0 to 1:
      ``1 - p`` (``"linear"``, the paper's per-iteration linear decay) or ``(1 + cos(pi p)) / 2``
      (``"cosine"``). The factor is 1 right after warmup and 0 from ``step = total_steps`` on.
    """
    _check_schedule(total_steps, warmup_steps, schedule)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = SCHEDULE,
) -> LambdaLR:
    """A per-iteration ``LambdaLR`` following :func:`lr_lambda`: call ``scheduler.step()`` after
    every optimizer step (not every epoch)."""
    _check_schedule(total_steps, warmup_steps, schedule)
    fn = functools.partial(
        lr_lambda, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule
    )
    return LambdaLR(optimizer, fn)


def _check_schedule(total_steps: int, warmup_steps: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise UsnetValueError(
            f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}"
        )
    if total_steps < 1:
        raise UsnetValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise UsnetValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
