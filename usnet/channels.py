"""Channel plans: which channels are tied together and how many are active at a width.

A *channel group* is a set of channel dimensions that must always have the same number of active
channels (both sides of a residual add, a depthwise conv's input and output, ...). A *channel plan*
is the ordered collection of a model's groups. Everything here is plain arithmetic: no tensors.

Active channels follow torchvision's rule ``make_divisible(full * width, divisor)``, capped at the
full size; at width 1.0 every group is at its full size, whatever its divisor. A *derived* group
follows another group at a fixed ratio (an inverted-residual expansion layer is ``t`` times its
block's input; a flattened feature map is ``H*W`` times its channels), and a *fixed* group never
changes (image input channels, classifier outputs).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Union

from .errors import UsnetTypeError, UsnetValueError

Width = Union[float, Mapping[str, float]]
"""A uniform width multiplier, or a mapping from root group name to multiplier."""


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it.

    This is the rule torchvision and the MobileNet/US-Nets reference code use for channel counts.
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def active_channels(size: int, width: float, divisor: int = 8) -> int:
    """Active channels of a root group of ``size`` channels at ``width``.

    Width 1.0 is the network as built: every group is at its full size whatever its divisor
    (``make_divisible(34, 8)`` is 32, which would drop two channels of a pretrained layer and
    refuse its own BatchNorm statistics). Below 1.0 the count is ``make_divisible(size * width,
    divisor)``, capped at the full size.
    """
    if width >= 1.0:
        return size
    return min(size, make_divisible(size * width, divisor))


@dataclass(frozen=True)
class ChannelGroup:
    """One set of tied channel dimensions.

    Attributes:
        name: unique name, by convention the module that first produces these channels.
        size: number of channels at full width.
        divisor: active channel counts are multiples of this (raised to the lcm with the group
            counts of grouped convs that consume or produce the group).
        fixed: never slimmed (image input, classifier outputs).
        parent: for a derived group, the group it follows.
        ratio: for a derived group, ``active = round(active(parent) * ratio)``.
    """

    name: str
    size: int
    divisor: int = 8
    fixed: bool = False
    parent: str | None = None
    ratio: float = 1.0

    @property
    def is_root(self) -> bool:
        """A root group has its own width multiplier: neither fixed nor derived."""
        return not self.fixed and self.parent is None


class ChannelPlan:
    """The ordered channel groups of one model, and the arithmetic from width to channels."""

    def __init__(self, groups: list[ChannelGroup], width_range: tuple[float, float]):
        lo, hi = check_range(width_range)
        self.width_range = (lo, hi)
        self.groups: dict[str, ChannelGroup] = {}
        for group in groups:
            if group.name in self.groups:
                raise UsnetValueError(f"duplicate channel group name {group.name!r}")
            if group.parent is not None and group.parent not in self.groups:
                raise UsnetValueError(
                    f"derived group {group.name!r} must come after its parent {group.parent!r}"
                )
            if group.size < 1 or group.divisor < 1:
                raise UsnetValueError(f"group {group.name!r}: size and divisor must be positive")
            self.groups[group.name] = group

    # -- queries ---------------------------------------------------------------------------------
    @property
    def root_names(self) -> list[str]:
        """Names of the groups a non-uniform width may set."""
        return [g.name for g in self.groups.values() if g.is_root]

    def check_width(self, width: Width) -> Width:
        """Validate a uniform width or a per-group mapping against the range; return it normalized."""
        lo, hi = self.width_range
        if isinstance(width, Mapping):
            roots = set(self.root_names)
            out = {}
            for name, value in width.items():
                if name not in roots:
                    raise UsnetValueError(
                        f"unknown channel group {name!r}; valid groups: {', '.join(self.root_names)}"
                    )
                out[name] = _check_value(value, lo, hi, f"width of group {name!r}")
            return out
        return _check_value(width, lo, hi, "width")

    def channels(self, width: Width) -> dict[str, int]:
        """Active channels of every group at ``width`` (validated).

        A mapping sets the multiplier of the root groups it names; the others stay at the top of
        the width range.
        """
        width = self.check_width(width)
        hi = self.width_range[1]
        active: dict[str, int] = {}
        for g in self.groups.values():
            if g.fixed:
                active[g.name] = g.size
            elif g.parent is not None:
                active[g.name] = min(g.size, max(1, int(round(active[g.parent] * g.ratio))))
            else:
                w = width.get(g.name, hi) if isinstance(width, Mapping) else width
                active[g.name] = active_channels(g.size, w, g.divisor)
        return active

    def config(self, width: Width) -> tuple[int, ...]:
        """The network's channel configuration at ``width``: one count per group, in plan order.

        Two widths with the same configuration are the same network (same shapes, same BN stats).
        """
        return tuple(self.channels(width).values())

    def width_intervals(self, step: float = 0.001) -> list[WidthInterval]:
        """Every distinct uniform-width configuration in the range, narrowest first, with the
        interval of widths that give it and a representative width.

        The range is scanned at ``step`` (and its top); ``lo``/``hi`` are the first and last
        scanned widths with that configuration, so consecutive intervals tile the scan. The
        representative is the roundest number in the interval (:func:`roundest`: 0.5 for
        [0.438, 0.562], 0.25 for [0.25, 0.277]).
        """
        lo, hi = self.width_range
        n = max(0, int(math.floor((hi - lo) / step + 1e-9)))
        # rounded so that 0.355 is 0.355, not 0.35500000000000004; the config is taken of the
        # rounded number, so every endpoint is a width that really gives its configuration
        grid = sorted({round(min(hi, lo + i * step), 9) for i in range(n + 1)} | {hi})
        spans: list[list] = []
        for w in grid:
            config = self.config(w)
            if spans and spans[-1][0] == config:
                spans[-1][2] = w
            else:
                spans.append([config, w, w])
        out = []
        for config, a, b in spans:
            width = roundest(a, b)
            out.append(WidthInterval(config, a, b, width if self.config(width) == config else a))
        return out

    def distinct_configs(self, step: float = 0.001) -> list[tuple[int, ...]]:
        """All distinct uniform-width configurations in the range (scanned at ``step``)."""
        return [i.config for i in self.width_intervals(step)]

    def distinct_widths(self, step: float = 0.001) -> list[float]:
        """One uniform width per distinct configuration, in the order of :meth:`distinct_configs`:
        the representative of :meth:`width_intervals` (the roundest width giving it).

        A uniform random width is always one of these networks, so this finite list is the set
        of shapes a US-Net trains at: warming per-shape caches (cuDNN autotuning, compiled
        graphs) over it covers every width. A :class:`~usnet.train.samplers.WidthSampler` with
        ``choices`` set to it draws the same set of networks as a continuous one, but uniformly
        over configurations, not weighted by the length of each one's width interval.
        """
        return [i.width for i in self.width_intervals(step)]

    # -- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "width_range": list(self.width_range),
            "groups": [asdict(g) for g in self.groups.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "ChannelPlan":
        try:
            groups = [ChannelGroup(**g) for g in data["groups"]]
            width_range = tuple(data["width_range"])
        except (KeyError, TypeError) as err:
            raise UsnetValueError(f"malformed channel plan: {err}") from None
        return cls(groups, width_range)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChannelPlan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        roots = len(self.root_names)
        return (
            f"ChannelPlan({len(self.groups)} groups, {roots} root, width_range={self.width_range})"
        )


@dataclass(frozen=True)
class WidthInterval:
    """The uniform widths ``lo..hi`` (scanned) that give one channel configuration."""

    config: tuple[int, ...]
    lo: float
    hi: float
    width: float  # the representative: the roundest number in [lo, hi]


def roundest(lo: float, hi: float) -> float:
    """The roundest number in [lo, hi]: the largest multiple of the coarsest of 1, 0.5, 0.1,
    0.05, ... that has one there (0.25 for [0.25, 0.277], 0.41 for [0.407, 0.416])."""
    for digits in range(7):
        for unit in (5, 1):
            step = unit / 10**digits
            top = math.floor(hi / step + 1e-6) * step
            if top >= lo - 1e-9:
                return round(top, digits + 1)
    return hi


def config_key(config: tuple[int, ...]) -> str:
    """The exact string form of a channel configuration (the BN-cache and checkpoint key)."""
    return "-".join(str(c) for c in config)


def config_id(config: tuple[int, ...]) -> str:
    """A short stable id of a channel configuration, for tables and file names."""
    return hashlib.sha1(config_key(config).encode()).hexdigest()[:10]


MAX_WIDTHS = 100_000
"""The most widths a spec may list: a model has far fewer distinct channel configurations (a
step of 1e-7 would list millions of widths, most of them the same network)."""


def parse_widths(spec: str) -> list[float]:
    """Parse ``"0.25:1.0:0.25"`` (start:stop:step, inclusive) or ``"0.25,0.5,1.0"``."""
    text = str(spec).strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if (
                len(parts) != 3
                or not all(map(math.isfinite, parts))
                or parts[2] <= 0
                or parts[1] < parts[0]
            ):
                raise ValueError
            start, stop, step = parts
            count = int(math.floor((stop - start) / step + 1e-9))
            if count >= MAX_WIDTHS:
                raise UsnetValueError(
                    f"widths {spec!r} list {count + 1} widths, more than {MAX_WIDTHS}; use a "
                    f"larger step such as {(stop - start) / 1000:.2g} (widths closer than a channel "
                    "apart are the same network)"
                )
            values = [round(start + i * step, 10) for i in range(count + 1)]
            if stop - values[-1] > 1e-9:
                values.append(stop)
            return values
        values = [float(p) for p in text.split(",") if p.strip()]
        if not values:
            raise ValueError
        return values
    except UsnetValueError:
        raise
    except ValueError:
        raise UsnetValueError(
            f"invalid widths {spec!r}; expected start:stop:step (e.g. 0.25:1.0:0.25) "
            "or a comma-separated list (e.g. 0.25,0.5,1.0)"
        ) from None


def distinct_widths(plan: ChannelPlan, widths: list[Width]) -> list[Width]:
    """``widths`` without those that give the same channel configuration as an earlier one
    (the same network: evaluating or profiling it again gives the same numbers)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for w in widths:
        config = plan.config(w)
        if config not in seen:
            seen.add(config)
            out.append(w)
    return out


def _check_value(value: object, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsnetTypeError(f"{what} must be a number in [{lo}, {hi}], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not (lo - 1e-9 <= value <= hi + 1e-9):
        raise UsnetValueError(f"{what} {value} is outside the width range [{lo}, {hi}]")
    return min(max(value, lo), hi)


def check_range(width_range: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in width_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise UsnetTypeError(f"width_range must be a pair (lo, hi), got {width_range!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        # 1.0 is the network as built: its weights hold no channels beyond it.
        raise UsnetValueError(f"width_range must satisfy 0 < lo <= hi <= 1.0, got ({lo}, {hi})")
    return lo, hi


def width_value(width: Width) -> float | dict[str, float]:
    """``width`` as plain data (a float, or a dict for a per-group width): what checkpoints,
    reports and JSON hold."""
    if isinstance(width, Mapping):
        return {str(k): float(v) for k, v in width.items()}
    return float(width)


def format_width(width: Width, spec: str = "g") -> str:
    """``width`` for a message or a table: ``0.5`` (``spec`` formats a uniform width), or
    ``{'layer1': 0.5, ...}`` for a per-group width."""
    if isinstance(width, Mapping):
        return str(width_value(width))
    return format(float(width), spec)
