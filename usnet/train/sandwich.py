"""The US-Net training step (Yu & Huang, ICCV 2019), for ``usnet train`` and users' own loops.

    import usnet

    model = usnet.models.us_mobilenet_v1(num_classes=10)
    rule = usnet.SandwichRule(model, num_widths=4, seed=0, label_smoothing=0.1)
    optimizer = usnet.make_optimizer(model, lr=0.1)
    scheduler = usnet.make_scheduler(optimizer, total_steps=epochs * len(loader), warmup_steps=500)
    model.train()
    for images, labels in loader:
        result = rule.step(images, labels, optimizer)
        scheduler.step()

* :class:`SandwichRule` holds a model's sampler and loss and runs :func:`sandwich_step` per batch
  (with gradient accumulation over micro-batches if asked).
* :func:`sandwich_step` runs one optimizer step over the drawn widths (:mod:`.samplers`),
  accumulating gradients; the losses are :mod:`.distill`'s.
* :mod:`usnet.train.recipe` holds the paper's optimization recipe (optimizer, schedule).

Nothing here holds global state: the sampler owns its ``torch.Generator`` and the width of a model
is the model's own state (:func:`usnet.set_width`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..channels import Width, format_width, width_value
from ..errors import UsnetTypeError, UsnetValueError
from ..process_group import is_distributed, world_size
from ..state import get_state, is_slimmable, keep_width_and_mode, set_width
from .distill import DISTILL_LABEL_WEIGHT, Criterion, InplaceDistillationLoss, soft_targets
from .samplers import Sampler, WidthSampler, draw_widths

__all__ = [
    "SandwichRule",
    "StepResult",
    "backward_widths",
    "sandwich_step",
    "unwrap",
    "warm_up_widths",
]


# -- the training step ---------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one :func:`sandwich_step` did, in the order the widths ran (widest first).

    Attributes:
        widths: the widths trained.
        losses: each width's loss value (under DDP: the mean over ranks).
        loss_kinds: each width's loss kind: :data:`LABELS` or :data:`DISTILL`.
    """

    widths: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    loss_kinds: list[str] = field(default_factory=list)

    @property
    def narrowest_loss(self) -> float:
        """The loss of the narrowest width of the step (wherever the sampler put it: the
        sandwich rule puts it second, other ``ends`` sort the widths widest first)."""
        return self.losses[min(range(len(self.widths)), key=self.widths.__getitem__)]

    @property
    def widest_loss(self) -> float:
        return self.losses[0]

    @property
    def total_loss(self) -> float:
        """The sum of the widths' losses: the objective whose gradient the step followed."""
        return float(sum(self.losses))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _ranks_mean(model: nn.Module, losses: Tensor) -> Tensor:
    """The mean of each width's loss over the ranks of a DDP ``model`` (unchanged outside one):
    every rank then sees a non-finite loss of any rank, and all refuse the step together (DDP
    already averaged the gradients, NaNs included)."""
    if getattr(model, "no_sync", None) is None or not is_distributed():
        return losses
    group = getattr(model, "process_group", None)
    torch.distributed.all_reduce(losses, group=group)
    return losses / world_size(group)


def _check_finite(widths: Sequence[Width], values: Sequence[float]) -> None:
    for w, value in zip(widths, values):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"non-finite loss ({value}) at width {format_width(w)}; the optimizer did not step"
            )


def _finish_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, widths: Sequence[Width],
                 losses: Tensor) -> list[float]:  # fmt: skip
    """The optimizer step after the widths' backward passes, unless a width's loss (``losses``,
    one per width; the mean over ranks under DDP) is not finite. Returns the losses."""
    values = _ranks_mean(model, losses).tolist()  # one device sync per step
    _check_finite(widths, values)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return values


def sandwich_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler | Iterable[Width],
    criterion: Criterion,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    teacher_probs: Tensor | None = None,
) -> StepResult:
    r"""One optimizer step of US-Nets training over the widths the sampler draws.

    1. ``optimizer.zero_grad(set_to_none=True)``.
    2. For each width of ``sampler.sample()``, in order: :func:`usnet.set_width`, forward,
       loss, ``backward()``. The first width is the teacher (the sandwich rule puts the widest
       first): with an :class:`InplaceDistillationLoss` it learns from ``labels`` and each later
       width from its detached softmax; any other ``criterion(logits, labels)`` is applied to
       every width.
    3. One ``optimizer.step()``.

    Gradients **accumulate** over the widths: the step follows the gradient of the *sum* of the
    widths' losses, not their mean. This is the paper's (and its reference code's) choice; it means
    the effective learning rate grows with ``num_widths``, which the paper's recipe is tuned for.

    The model should be in training mode (slimmable BatchNorm then normalizes with batch
    statistics at every width). After the step, or if it fails, the model is left at the widest
    width of the step. A model wrapped in ``DistributedDataParallel`` (or ``torch.compile``) is
    accepted: its width is set on the wrapped module, and gradients are synchronized only once,
    in the last width's backward (``no_sync`` for the others).

    Args:
        model: a slimmable model (or a DDP / compiled wrapper of one).
        images, labels: one batch.
        optimizer: any optimizer over the model's parameters.
        sampler: a :class:`WidthSampler` (anything with ``sample()``), or a fixed sequence of
            widths, widest first.
        criterion: an :class:`InplaceDistillationLoss`, or a plain ``loss(logits, labels)``.
        scaler: a ``torch.amp.GradScaler`` for float16 training: losses are scaled before
            ``backward`` and ``scaler.step(optimizer)`` / ``scaler.update()`` replace the plain
            step.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16``, or ``torch.float16`` with a ``scaler``); ``None``: no autocast.
        teacher_probs: soft targets of an external teacher for this batch (a frozen trained
            model's softmax at the criterion's temperature): every width, the widest included,
            distils from them (:data:`TEACHER`); with in-place distillation on, the narrower
            widths distil from the mean of these and the widest's (:data:`TEACHER_INPLACE`).
            Needs an :class:`InplaceDistillationLoss`.

    Returns:
        a :class:`StepResult` with the widths, loss values and loss kinds.

    Raises:
        FloatingPointError: a width's loss is NaN or infinite. The error names the width; the
            optimizer did not step (the gradients of the failed step are left in ``.grad``).
    """
    inner = unwrap(model)
    widths = draw_widths(sampler)
    optimizer.zero_grad(set_to_none=True)
    try:
        losses, kinds = backward_widths(model, images, labels, widths, criterion, scaler=scaler,
                                        autocast_dtype=autocast_dtype, teacher_probs=teacher_probs)  # fmt: skip
        values = _finish_step(model, optimizer, scaler, widths, torch.stack(losses))
    finally:
        set_width(inner, widths[0])
    return StepResult(widths=[width_value(w) for w in widths], losses=values, loss_kinds=kinds)


def backward_widths(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    widths: Sequence[Width],
    criterion: Criterion,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    teacher_probs: Tensor | None = None,
    sync: bool = True,
    loss_scale: float = 1.0,
) -> tuple[list[Tensor], list[str]]:
    """The forward and backward passes of one batch at each of ``widths`` (widest first),
    adding to the gradients already there: the heart of :func:`sandwich_step`, without its
    ``zero_grad`` and optimizer step (for gradient accumulation). ``loss_scale`` multiplies each
    loss before ``backward`` (``1 / micro-batches``); the returned losses are unscaled. Under DDP
    the gradients are synchronized in the last width's backward only if ``sync``. The model is
    left at the last width. Returns each width's detached loss and its loss kind."""
    inner = unwrap(model)
    distiller = criterion if isinstance(criterion, InplaceDistillationLoss) else None
    if teacher_probs is not None and distiller is None:
        raise UsnetTypeError("teacher_probs needs an InplaceDistillationLoss criterion")
    no_sync = getattr(model, "no_sync", None)
    losses: list[Tensor] = []
    kinds: list[str] = []
    inplace: Tensor | None = None  # the widest width's soft targets, once it has run
    for i, w in enumerate(widths):
        set_width(inner, w)
        synced = sync and i == len(widths) - 1
        with contextlib.nullcontext() if synced or no_sync is None else no_sync():
            with _autocast(images.device, autocast_dtype):
                logits = model(images)
                targets, kind = soft_targets(teacher_probs, inplace)
                if targets is None or distiller is None:
                    loss = criterion(logits, labels)
                else:
                    loss = distiller.distill_loss(logits, labels, targets)
            if i == 0 and distiller is not None and distiller.enabled:
                inplace = distiller.teacher_probs(logits)
            scaled = loss * loss_scale if loss_scale != 1.0 else loss
            (scaled if scaler is None else scaler.scale(scaled)).backward()
        losses.append(loss.detach().float())
        kinds.append(kind)
        del logits, loss, scaled
    return losses, kinds


class SandwichRule:
    """The paper's training step for a user's own loop: the sandwich rule and in-place
    distillation over one slimmable model, one call per batch.

    ::

        model = usnet.slimmable(timm.create_model("resnet18", num_classes=10), (0.25, 1.0),
                                input_size=(1, 3, 32, 32))
        rule = usnet.SandwichRule(model, num_widths=4, seed=0)
        optimizer = usnet.make_optimizer(model, lr=0.1)
        for images, labels in loader:
            result = rule.step(images, labels, optimizer)  # StepResult: widths, losses, kinds

    Each :meth:`step` draws the widths (widest, narrowest, ``num_widths - 2`` random, from the
    rule's own seeded :class:`WidthSampler`), runs each width's forward and backward (the widest
    on the labels, the others on its detached soft targets mixed with the labels by
    ``label_weight``), accumulating their gradients, and takes one optimizer step: the same
    implementation ``usnet train`` runs (:func:`sandwich_step`).

    Args:
        model: a slimmable model, or a ``DistributedDataParallel`` / ``torch.compile`` wrapper
            of one (gradients are then synchronized once per optimizer step).
        num_widths: widths per step (the paper uses 4); ignored with ``sampler``.
        seed: seed of the width sampler (every rank must use the same).
        sampler: widths of each step instead of the sandwich rule (a :class:`WidthSampler`,
            :class:`FixedWidths`, or anything with ``sample()``).
        criterion: the loss; default an :class:`InplaceDistillationLoss` built from
            ``distill``, ``label_smoothing``, ``temperature`` and ``label_weight``.
        distill: in-place distillation on (the narrower widths learn from the widest).
        scaler: a ``torch.amp.GradScaler`` (float16 training).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` forward passes under autocast.
        accumulation_steps: micro-batches per optimizer step: the widths are drawn once per
            optimizer step and kept for its micro-batches, each loss is divided by the count,
            and only the last micro-batch steps the optimizer (and synchronizes DDP).

    The rule's :meth:`state_dict` holds its sampler's state, so a resumed run draws the same
    widths.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_widths: int = 4,
        seed: int = 0,
        sampler: Sampler | None = None,
        criterion: Criterion | None = None,
        distill: bool = True,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        label_weight: float = DISTILL_LABEL_WEIGHT,
        scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
        accumulation_steps: int = 1,
    ) -> None:
        inner = unwrap(model)
        if (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, int)
            or accumulation_steps < 1
        ):
            raise UsnetValueError(
                f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}"
            )
        self.model = model
        self.sampler: Sampler = (
            sampler
            if sampler is not None
            else WidthSampler(get_state(inner).plan.width_range, num_widths=num_widths, seed=seed)
        )
        self.criterion: Criterion = (
            criterion
            if criterion is not None
            else InplaceDistillationLoss(
                label_smoothing=label_smoothing,
                temperature=temperature,
                enabled=distill,
                label_weight=label_weight,
            )
        )
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.accumulation_steps = accumulation_steps
        self._pending: list[Width] | None = None  # widths of the optimizer step in progress
        self._losses: list[Tensor] = []  # its micro-batches' losses so far

    def step(
        self,
        images: Tensor,
        labels: Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        teacher_probs: Tensor | None = None,
    ) -> StepResult | None:
        """Train one batch at the step's widths. With ``accumulation_steps == 1`` (default) this
        is :func:`sandwich_step`. With more, each call adds one micro-batch's gradients and the
        call that completes the optimizer step returns its :class:`StepResult` (losses averaged
        over the micro-batches); the others return None.

        Raises ``FloatingPointError`` (the optimizer did not step) on a non-finite loss."""
        if self.accumulation_steps == 1:
            return sandwich_step(self.model, images, labels, optimizer, self.sampler,
                                 self.criterion, scaler=self.scaler,
                                 autocast_dtype=self.autocast_dtype, teacher_probs=teacher_probs)  # fmt: skip
        inner = unwrap(self.model)
        if self._pending is None:
            self._pending = draw_widths(self.sampler)
            self._losses = []
            optimizer.zero_grad(set_to_none=True)
        widths = self._pending
        last = len(self._losses) + 1 == self.accumulation_steps
        try:
            losses, kinds = backward_widths(
                self.model, images, labels, widths, self.criterion, scaler=self.scaler,
                autocast_dtype=self.autocast_dtype, teacher_probs=teacher_probs, sync=last,
                loss_scale=1.0 / self.accumulation_steps,
            )  # fmt: skip
            self._losses.append(torch.stack(losses))
            if not last:
                return None
            self._pending = None
            mean = torch.stack(self._losses).mean(0)
            values = _finish_step(self.model, optimizer, self.scaler, widths, mean)
        except BaseException:
            self._pending = None  # the next call starts a new optimizer step
            raise
        finally:
            set_width(inner, widths[0])
        return StepResult(widths=[width_value(w) for w in widths], losses=values, loss_kinds=kinds)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (for checkpoints)."""
        state = getattr(self.sampler, "state_dict", None)
        return {"sampler": state() if callable(state) else {}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        load = getattr(self.sampler, "load_state_dict", None)
        if callable(load):
            load(state_dict.get("sampler", {}))


def warm_up_widths(
    model: nn.Module,
    images: Tensor,
    widths: Iterable[Width],
    *,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Run one forward and backward pass at each distinct channel configuration of ``widths``.

    Caches keyed by tensor shapes then hold every shape training will meet: with
    ``torch.backends.cudnn.benchmark`` on, cuDNN autotunes each convolution shape the first time
    it runs, so a US-Net trained at random widths re-tunes whenever the sampler draws a new
    configuration (slow early steps); a ``torch.compile`` wrapper builds one graph per
    configuration. Warming ``usnet.channel_plan(model).distinct_widths()`` (a finite list) once
    before training moves all of that here. Use the training batch shape, memory format and
    ``autocast_dtype``.

    Weights, optimizer and BatchNorm statistics are untouched (call it in training mode, where
    slimmable BatchNorm uses batch statistics); the gradients are set to ``None``; the random
    state (dropout) and the model's width are restored. Returns the number of configurations run.
    """
    inner = unwrap(model)
    state = get_state(inner)
    seen: set[tuple[int, ...]] = set()
    devices = [images.device] if images.device.type != "cpu" else []
    try:
        with (
            keep_width_and_mode(inner),
            torch.random.fork_rng(devices=devices, device_type=images.device.type),
        ):
            for w in widths:
                config = state.plan.config(w)
                if config in seen:
                    continue
                seen.add(config)
                set_width(inner, w)
                ctx = (contextlib.nullcontext() if autocast_dtype is None
                       else torch.autocast(images.device.type, dtype=autocast_dtype))  # fmt: skip
                with ctx:
                    out = model(images)
                out.float().mean().backward()
                del out
    finally:
        for p in model.parameters():
            p.grad = None
    return len(seen)


def unwrap(model: nn.Module) -> nn.Module:
    """The slimmable module inside a DDP / DataParallel / ``torch.compile`` wrapper."""
    current = model
    for _ in range(4):
        if is_slimmable(current):
            return current
        for attr in ("module", "_orig_mod"):
            inner = getattr(current, attr, None)
            if isinstance(inner, nn.Module):
                current = inner
                break
        else:
            break
    get_state(model)  # raises the standard "not a slimmable model" error
    return model  # pragma: no cover
