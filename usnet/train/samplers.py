"""Which widths a training step runs: the sandwich rule (:class:`WidthSampler`: the widest, the
narrowest and ``n - 2`` random widths from its own seeded generator) and fixed widths
(:class:`FixedWidths`, the baselines)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..channels import Width, check_range, width_value
from ..errors import UsnetTypeError, UsnetValueError

SANDWICH_ENDS = ("both", "max", "min", "none")


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


@runtime_checkable
class Sampler(Protocol):
    """Anything that draws the widths of one step, widest first (:class:`WidthSampler`,
    :class:`FixedWidths`)."""

    def sample(self) -> Sequence[Width]: ...


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
