"""Training building blocks for universally slimmable networks (US-Nets, Yu & Huang, ICCV 2019).

Each piece is independent and works in a user's own training loop::

    import usnet
    from usnet.train.recipe import make_optimizer, make_scheduler
    from usnet.train.sandwich import InplaceDistillationLoss, WidthSampler, sandwich_step

    model = usnet.models.us_mobilenet_v1(num_classes=10)
    sampler = WidthSampler(usnet.channel_plan(model).width_range, num_widths=4, seed=0)
    criterion = InplaceDistillationLoss(label_smoothing=0.1)
    optimizer = make_optimizer(model, lr=0.1)
    scheduler = make_scheduler(optimizer, total_steps=epochs * len(loader), warmup_steps=500)
    model.train()
    for images, labels in loader:
        result = sandwich_step(model, images, labels, optimizer, sampler, criterion)
        scheduler.step()

* :class:`WidthSampler` draws the widths of one step by the *sandwich rule*: the widest, the
  narrowest and ``n - 2`` random widths, from its own seeded generator.
* :class:`InplaceDistillationLoss` trains the widest width on the labels and every narrower width
  on the widest width's (detached) predictions: *inplace distillation*.
* :func:`sandwich_step` runs one optimizer step over the drawn widths, accumulating gradients.
* :mod:`usnet.train.recipe` holds the paper's optimization recipe (optimizer, schedule).

Nothing here holds global state: the sampler owns its ``torch.Generator`` and the width of a model
is the model's own state (:func:`usnet.set_width`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..channels import Width, check_range, format_width, width_value
from ..errors import UsnetTypeError, UsnetValueError
from ..process_group import is_distributed, world_size
from ..state import get_state, is_slimmable, keep_width_and_mode, set_width

__all__ = [
    "DISTILL",
    "LABELS",
    "TEACHER",
    "TEACHER_INPLACE",
    "DISTILL_LABEL_WEIGHT",
    "FixedWidths",
    "InplaceDistillationLoss",
    "Sampler",
    "StepResult",
    "WidthSampler",
    "sandwich_step",
    "draw_widths",
    "soft_cross_entropy",
    "soft_targets",
    "unwrap",
    "warm_up_widths",
]

LABELS = "labels"
"""Loss kind: cross-entropy with the ground-truth labels."""

DISTILL = "distill"
"""Loss kind: soft cross-entropy with the widest width's predictions (inplace distillation)."""

TEACHER = "teacher"
"""Loss kind: soft cross-entropy with an external teacher's predictions (``teacher_probs`` of
:func:`sandwich_step`, e.g. the trained model a US-Net is fine-tuned from)."""

TEACHER_INPLACE = "teacher+inplace"
"""Loss kind: soft cross-entropy with the mean of the external teacher's and the widest width's
predictions (both distillations, equally weighted)."""

# -- width sampling ------------------------------------------------------------------------------
SANDWICH_ENDS = ("both", "max", "min", "none")

DISTILL_LABEL_WEIGHT = 0.5
"""The default weight of the labels in the narrower widths' loss, for the Python API and the
run config alike (``distill_label_weight``)."""


class FixedWidths:
    """A sampler that always returns the same widths, widest first (the individual and
    slimmable-network baselines)."""

    def __init__(self, widths: Sequence[float]):
        self.widths = sorted(widths, reverse=True)

    def sample(self) -> list[float]:
        return list(self.widths)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class WidthSampler:
    r"""Draws the widths of one training step by the sandwich rule.

    :meth:`sample` returns ``[max, min, w_1, ..., w_{n-2}]``: the top and the bottom of
    ``width_range`` (the "bread", which bound the performance of every width in between) followed
    by ``num_widths - 2`` widths drawn uniformly from the range. The widest comes first because
    inplace distillation uses its predictions as the soft targets of the others.

    The random widths come from the sampler's own ``torch.Generator`` seeded with ``seed``; the
    global RNG is never used. A run is therefore reproducible, every distributed rank created with
    the same seed draws the same widths (which data-parallel training requires: all ranks must run
    the same sub-networks in a step), and :meth:`state_dict` / :meth:`load_state_dict` let a
    resumed run continue the exact same sequence.

    Args:
        width_range: ``(lo, hi)`` with ``0 < lo <= hi <= 1``, usually
            ``usnet.channel_plan(model).width_range``.
        num_widths: widths per step, at least 2 (the paper uses 4).
        seed: seed of the sampler's generator.
        ends: which ends of the range every step trains: ``"both"`` (the sandwich rule),
            ``"max"`` or ``"min"`` (only one end, for the paper's ablation of the rule) or
            ``"none"`` (all widths random). The other widths are random; a step's widths are then
            returned widest first, so the widest of the step is the distillation teacher.
        choices: optional finite set of widths in the range; the random widths are then drawn
            uniformly from it instead of from the whole interval. With
            ``usnet.channel_plan(model).distinct_widths()`` the sampler draws exactly the networks a
            continuous one can (one width per distinct channel configuration, uniformly over
            configurations); a shorter list bounds the shapes training ever sees, e.g. the graphs
            ``torch.compile`` builds (one per configuration).

    Example::

        >>> sampler = WidthSampler((0.25, 1.0), num_widths=4, seed=0)
        >>> widths = sampler.sample()
        >>> widths[:2]
        [1.0, 0.25]
    """

    def __init__(
        self,
        width_range: tuple[float, float],
        num_widths: int = 4,
        seed: int = 0,
        choices: Sequence[float] | None = None,
        ends: str = "both",
    ):
        self.width_range: tuple[float, float] = check_range(width_range)
        self.choices: list[float] | None = _check_choices(choices, self.width_range)
        if ends not in SANDWICH_ENDS:
            raise UsnetValueError(
                f"ends must be one of {', '.join(map(repr, SANDWICH_ENDS))}, got {ends!r}"
            )
        self.ends = ends
        if isinstance(num_widths, bool) or not isinstance(num_widths, numbers.Integral):
            raise UsnetTypeError(f"num_widths must be an integer >= 2, got {num_widths!r}")
        if num_widths < 2:
            raise UsnetValueError(
                f"num_widths must be an integer >= 2 (the widest and the narrowest width, plus "
                f"any number of random ones; the paper uses 4), got {num_widths}"
            )
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise UsnetTypeError(f"seed must be an integer, got {seed!r}")
        self.num_widths = int(num_widths)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def sample(self) -> list[float]:
        """The widths of the next step: ``[max, min]`` and ``num_widths - 2`` uniform draws
        (with ``ends`` other than ``"both"``: the fixed ends and uniform draws, widest first)."""
        lo, hi = self.width_range
        fixed = {"both": [hi, lo], "max": [hi], "min": [lo], "none": []}[self.ends]
        count = self.num_widths - len(fixed)
        if self.choices is not None:
            picks = torch.randint(len(self.choices), (count,), generator=self.generator)
            random = [self.choices[i] for i in picks.tolist()]
        else:
            draws = torch.rand(count, generator=self.generator, dtype=torch.float64)
            random = [min(hi, lo + (hi - lo) * float(u)) for u in draws]
        if self.ends == "both":
            return fixed + random
        return sorted(fixed + random, reverse=True)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's settings and generator state, for checkpoints."""
        return {
            "width_range": list(self.width_range),
            "num_widths": self.num_widths,
            "seed": self.seed,
            "ends": self.ends,
            "choices": None if self.choices is None else list(self.choices),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`, so the next draws continue that sequence."""
        try:
            generator_state = state_dict["generator"]
        except (KeyError, TypeError):
            raise UsnetValueError("malformed WidthSampler state: no 'generator' entry") from None
        if not isinstance(generator_state, Tensor) or generator_state.dtype != torch.uint8:
            raise UsnetValueError(
                "malformed WidthSampler state: 'generator' must be a uint8 tensor"
            )
        # Validate everything before changing anything: a bad state leaves the sampler as it was.
        ends = state_dict.get("ends", "both")  # states saved before the option: the sandwich rule
        if ends not in SANDWICH_ENDS:
            raise UsnetValueError(
                f"malformed WidthSampler state: ends {ends!r}, expected one of "
                f"{', '.join(map(repr, SANDWICH_ENDS))}"
            )
        width_range = check_range(state_dict.get("width_range", self.width_range))
        num_widths = int(state_dict.get("num_widths", self.num_widths))
        if num_widths < 2:
            raise UsnetValueError(f"malformed WidthSampler state: num_widths {num_widths} < 2")
        choices = (
            _check_choices(state_dict["choices"], width_range)
            if "choices" in state_dict
            else self.choices
        )
        self.ends, self.width_range, self.num_widths, self.choices = (
            ends,
            width_range,
            num_widths,
            choices,
        )
        self.seed = int(state_dict.get("seed", self.seed))
        self.generator.set_state(generator_state.cpu())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(width_range={self.width_range}, "
            f"num_widths={self.num_widths}, seed={self.seed}, ends={self.ends!r}"
            + ("" if self.choices is None else f", choices={len(self.choices)} widths")
            + ")"
        )


def _check_choices(
    choices: Sequence[float] | None, width_range: tuple[float, float]
) -> list[float] | None:
    if choices is None:
        return None
    lo, hi = width_range
    values = []
    for c in choices:
        if (
            isinstance(c, bool)
            or not isinstance(c, numbers.Real)
            or not lo - 1e-9 <= c <= hi + 1e-9
        ):
            raise UsnetValueError(f"WidthSampler choices must be widths in [{lo}, {hi}], got {c!r}")
        values.append(min(hi, max(lo, float(c))))
    if not values:
        raise UsnetValueError(f"WidthSampler choices must hold at least one width in [{lo}, {hi}]")
    return values


# -- losses --------------------------------------------------------------------------------------
def soft_cross_entropy(logits: Tensor, soft_targets: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Cross-entropy of ``logits`` against a probability distribution, averaged over the batch.

    .. math::
        \ell = \frac{T^2}{N} \sum_n -\sum_c p_{n,c} \log \operatorname{softmax}(z_n / T)_c

    ``soft_targets`` are probabilities over the last dimension (for distillation, the teacher's
    softmax taken at the same temperature ``T``). The loss is multiplied by ``T**2`` (Hinton et
    al., 2015): the gradient of the softened softmax scales as ``1/T**2``, so the factor keeps the
    gradient magnitude independent of ``T`` and a loss comparable to the labels' cross-entropy. At
    ``T = 1`` the factor is 1 and, for one-hot targets, the result equals ``F.cross_entropy``.

    Args:
        logits: ``(N, C)`` unnormalized scores.
        soft_targets: ``(N, C)`` target probabilities (rows sum to 1); never differentiated
            through by this function's callers in :mod:`usnet.train.sandwich`.
        temperature: softmax temperature ``T > 0``.
    """
    if not temperature > 0:
        raise UsnetValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape != soft_targets.shape:
        raise UsnetValueError(
            f"logits {tuple(logits.shape)} and soft_targets {tuple(soft_targets.shape)} must have "
            "the same shape"
        )
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    per_sample = -(soft_targets.to(log_probs.dtype) * log_probs).sum(dim=-1)
    return per_sample.mean() * (temperature**2)


class InplaceDistillationLoss(nn.Module):
    r"""The US-Nets loss: labels for the widest width, its predictions for the others.

    * Without ``teacher_probs`` (the widest width), or with ``enabled=False``: cross-entropy with
      ``labels``, with optional label smoothing.
    * With ``teacher_probs`` (narrower widths): :func:`soft_cross_entropy` against them at
      ``temperature``. :meth:`teacher_probs` makes them from the widest width's logits: a softmax
      at ``temperature`` of the **detached** logits, so the narrower widths' losses train only the
      narrower sub-networks and never pull the widest one towards them.

    Call it as ``criterion(logits, labels, teacher_probs)`` (or ``criterion.loss(...)``), and
    :meth:`loss_kind` with the same ``teacher_probs`` says which loss that call used
    (:data:`LABELS` or :data:`DISTILL`), for the run log.

    Args:
        label_smoothing: label smoothing of the labels' cross-entropy, in ``[0, 1)``.
        temperature: distillation temperature ``T > 0`` (the paper uses 1).
        enabled: ``False`` trains every width on the labels (no inplace distillation).
        label_weight: weight ``λ`` of the labels in the narrower widths' loss,
            ``(1 - λ) * distillation + λ * cross-entropy``; default :data:`DISTILL_LABEL_WEIGHT`
            (0.5, the ``usnet train`` config's default too; 0 is the paper's pure distillation).
            Early in a short schedule the widest width is a poor teacher; label signal helps.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        enabled: bool = True,
        label_weight: float = DISTILL_LABEL_WEIGHT,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise UsnetValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= label_weight <= 1.0:
            raise UsnetValueError(f"label_weight must be in [0, 1], got {label_weight}")
        self.label_weight = float(label_weight)
        if not temperature > 0:
            raise UsnetValueError(f"temperature must be > 0, got {temperature}")
        self.label_smoothing = float(label_smoothing)
        self.temperature = float(temperature)
        self.enabled = bool(enabled)

    def teacher_probs(self, logits: Tensor) -> Tensor:
        """Soft targets from the widest width's logits: detached float32 softmax at ``T``."""
        return F.softmax(logits.detach().float() / self.temperature, dim=-1)

    def loss_kind(self, teacher_probs: Tensor | None = None) -> str:
        """:data:`DISTILL` if a call with these ``teacher_probs`` distills, else :data:`LABELS`."""
        return DISTILL if self.enabled and teacher_probs is not None else LABELS

    def forward(
        self, logits: Tensor, labels: Tensor, teacher_probs: Tensor | None = None
    ) -> Tensor:
        if teacher_probs is not None and self.enabled:
            return self.distill_loss(logits, labels, teacher_probs)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def distill_loss(self, logits: Tensor, labels: Tensor, teacher_probs: Tensor) -> Tensor:
        """``(1 - λ) * soft cross-entropy with teacher_probs + λ * cross-entropy with labels``,
        also when in-place distillation is off (an external teacher's targets)."""
        distill = soft_cross_entropy(logits, teacher_probs, self.temperature)
        if self.label_weight == 0.0:
            return distill
        labels_loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return (1.0 - self.label_weight) * distill + self.label_weight * labels_loss

    def loss(self, logits: Tensor, labels: Tensor, teacher_probs: Tensor | None = None) -> Tensor:
        """Same as calling the module."""
        return self(logits, labels, teacher_probs)

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, "
            f"enabled={self.enabled}, label_weight={self.label_weight}"
        )


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


@runtime_checkable
class Sampler(Protocol):
    """Anything that draws the widths of one step, widest first (:class:`WidthSampler`,
    :class:`FixedWidths`)."""

    def sample(self) -> Sequence[Width]: ...


Criterion = Union[InplaceDistillationLoss, Callable[[Tensor, Tensor], Tensor]]


def draw_widths(sampler: Sampler | Iterable[Width]) -> list[Width]:
    """The widths of one step: ``sampler.sample()``, or the sequence itself; the first must be
    the widest (the teacher of the others)."""
    widths = list(sampler.sample() if isinstance(sampler, Sampler) else sampler)
    if not widths:
        raise UsnetValueError("the sampler gave no widths")
    values = [width_value(w) for w in widths]
    uniform = [v for w, v in zip(widths, values) if not isinstance(w, Mapping)]
    if len(uniform) == len(widths) and values[0] < max(uniform):
        raise UsnetValueError(
            f"the first width must be the widest (the teacher of the others), got {widths}"
        )
    return widths


def soft_targets(external: Tensor | None, inplace: Tensor | None) -> tuple[Tensor | None, str]:
    """What a width distils from, and the loss kind that names it: an external teacher's soft
    targets, the widest width's (in-place), the mean of both, or neither (the labels)."""
    if external is None:
        return (None, LABELS) if inplace is None else (inplace, DISTILL)
    if inplace is None:
        return external, TEACHER
    return (external + inplace) / 2, TEACHER_INPLACE


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


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


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
    distiller = criterion if isinstance(criterion, InplaceDistillationLoss) else None
    if teacher_probs is not None and distiller is None:
        raise UsnetTypeError(
            "sandwich_step: teacher_probs needs an InplaceDistillationLoss criterion"
        )
    no_sync = getattr(model, "no_sync", None)
    optimizer.zero_grad(set_to_none=True)
    losses: list[Tensor] = []
    kinds: list[str] = []
    inplace: Tensor | None = None  # the widest width's soft targets, once it has run
    try:
        for i, w in enumerate(widths):
            set_width(inner, w)
            last = i == len(widths) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with _autocast(images.device, autocast_dtype):
                    logits = model(images)
                    targets, kind = soft_targets(teacher_probs, inplace)
                    if targets is None or distiller is None:
                        loss = criterion(logits, labels)
                    else:
                        loss = distiller.distill_loss(logits, labels, targets)
                if i == 0 and distiller is not None and distiller.enabled:
                    inplace = distiller.teacher_probs(logits)
                (loss if scaler is None else scaler.scale(loss)).backward()
            losses.append(loss.detach().float())
            kinds.append(kind)
            del logits, loss
        values = _ranks_mean(model, torch.stack(losses)).tolist()  # one device sync per step
        _check_finite(widths, values)
        _optimizer_step(optimizer, scaler)
    finally:
        set_width(inner, widths[0])
    return StepResult(widths=[width_value(w) for w in widths], losses=values, loss_kinds=kinds)


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
