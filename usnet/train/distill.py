"""The losses of US-Net training: in-place distillation (:class:`InplaceDistillationLoss`: labels
for the widest width, its detached soft predictions for the others), the soft cross-entropy,
and the loss kinds the run log names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsnetValueError

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


DISTILL_LABEL_WEIGHT = 0.5
"""The default weight of the labels in the narrower widths' loss, for the Python API and the
run config alike (``distill_label_weight``)."""


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


def soft_targets(external: Tensor | None, inplace: Tensor | None) -> tuple[Tensor | None, str]:
    """What a width distils from, and the loss kind that names it: an external teacher's soft
    targets, the widest width's (in-place), the mean of both, or neither (the labels)."""
    if external is None:
        return (None, LABELS) if inplace is None else (inplace, DISTILL)
    if inplace is None:
        return external, TEACHER
    return (external + inplace) / 2, TEACHER_INPLACE


Criterion = Union[InplaceDistillationLoss, Callable[[Tensor, Tensor], Tensor]]
"""What :func:`usnet.train.sandwich.sandwich_step` accepts as its loss: an
:class:`InplaceDistillationLoss`, or a plain ``loss(logits, labels)``."""
