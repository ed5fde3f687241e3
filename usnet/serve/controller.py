"""The width controller of ``usnet serve``: which requests run next, and at which width.

Pure logic, no threads or I/O: the server calls :meth:`WidthController.admit` when a request
arrives, :meth:`WidthController.next_batch` whenever the model is free and
:meth:`WidthController.finished` with the time the batch took; ``now`` is always passed in, so
tests drive it with a fake clock.

The policy (slack-based, after SuperServe's SlackFit):

* Requests queue in arrival order. A batch is the oldest request and the requests after it that
  can share its width (unpinned ones together; pinned ones with the same pinned width), up to
  ``max_batch`` images. The model is never left idle while requests wait (work-conserving): a
  batch grows by itself while the previous one runs.
* Its width is the widest whose expected latency (:class:`LatencyTable`) fits the *slack* of
  its oldest request (deadline minus now minus a margin for the HTTP work around the model), and
  still lets every request waiting behind it meet its deadline at the narrowest width it allows
  (the admission check made that feasible when it queued them). At low load
  that is the full width; under load the slack shrinks and the width with it.
* Admission control: a request is refused (HTTP 429) only when, served at the narrowest width
  it allows behind everything already queued, it is expected to miss the SLO (never by an idle
  model: its latency is then observed, not predicted); a bounded queue
  (``max_queue`` images, HTTP 503) keeps memory bounded whatever the latency table says.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsnetValueError

EWMA_WEIGHT = 0.2
"""Weight of a new observation in the running mean and deviation of its (width, batch size)."""
DEVIATIONS = 2.0
"""Expected latency = mean + this many mean deviations (TCP's retransmission timer uses 4)."""
RECENT = 64
"""Batches whose slowdown (observed / measured) sets the level of the entries not yet seen."""
QUANTILE = 0.9


class LatencyTable:
    """Expected seconds of one batch per (width, batch size), kept on the safe side.

    It starts from measurements at some batch sizes (interpolated linearly between them,
    extrapolated per image past the largest) and follows what the server observes. An entry
    that has run keeps a running mean and mean deviation of its own observations (Jacobson's
    estimator of TCP round-trip times) and expects their mean plus :data:`DEVIATIONS`
    deviations. An entry that has not run expects its measurement times the 90th percentile of
    the slowdown (observed / measured) of the last batches: another process taking the CPU,
    seen at the widths that ran, slows the others' estimates too, and one stalled batch does
    not."""

    def __init__(self, widths: Sequence[float], max_batch: int,
                 measured: Mapping[tuple[float, int], float], weight: float = EWMA_WEIGHT):  # fmt: skip
        if max_batch < 1:
            raise UsnetValueError(f"max_batch must be at least 1, got {max_batch}")
        self.widths = tuple(widths)
        self.max_batch = max_batch
        self.weight = weight
        self._table: dict[float, list[float]] = {}
        self._observed: dict[tuple[float, int], tuple[float, float]] = {}  # (mean, deviation)
        self._ratios: deque[float] = deque(maxlen=RECENT)
        for w in self.widths:
            points = sorted((b, s) for (pw, b), s in measured.items() if pw == w and b >= 1)
            if not points:
                raise UsnetValueError(f"no latency measured for width {w:g}")
            row = [_interpolate(points, b) for b in range(1, max_batch + 1)]
            # a bigger batch never looks cheaper than a smaller one (noise in the measurement)
            self._table[w] = [max(row[: b + 1]) for b in range(max_batch)]

    def slowdown(self, q: float = QUANTILE) -> float:
        """The ``q`` quantile of observed / measured over the last batches (1 before any)."""
        return _quantile(self._ratios, q) if self._ratios else 1.0

    def measured(self, width: float, batch: int) -> float:
        """Seconds measured (or interpolated) for ``batch`` images at ``width``."""
        row = self._table[width]
        if batch <= self.max_batch:
            return row[batch - 1]
        return row[-1] * batch / self.max_batch

    def estimate(self, width: float, batch: int, safe: bool = True) -> float:
        """Seconds expected now for ``batch`` images at ``width``: on the safe side (see the
        class docstring), or with ``safe=False`` the central expectation (the mean of its
        observations, or its measurement times the median slowdown)."""
        seen = self._observed.get((width, batch))
        if seen is not None:
            return seen[0] + DEVIATIONS * seen[1] if safe else seen[0]
        return self.measured(width, batch) * self.slowdown(QUANTILE if safe else 0.5)

    def observe(self, width: float, batch: int, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0) or batch < 1:
            return
        self._ratios.append(seconds / self.measured(width, batch))
        key = (width, batch)
        if key not in self._observed:
            self._observed[key] = (seconds, seconds / 4)
            return
        mean, deviation = self._observed[key]
        deviation += self.weight * (abs(seconds - mean) - deviation)
        self._observed[key] = (mean + self.weight * (seconds - mean), deviation)

    def to_dict(self, batches: Iterable[int] | None = None) -> dict[str, dict[str, float]]:
        """``{width: {batch size: milliseconds}}`` (as JSON keys), at ``batches`` (default: the
        powers of two up to ``max_batch`` and ``max_batch``)."""
        if batches is None:
            batches = sorted({*_powers_of_two(self.max_batch), self.max_batch})
        return {f"{w:g}": {str(b): round(1e3 * self.estimate(w, b), 4) for b in batches}
                for w in self.widths}  # fmt: skip


def _quantile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def _powers_of_two(limit: int) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out


def _interpolate(points: Sequence[tuple[int, float]], b: int) -> float:
    if b <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if b0 <= b <= b1:
            return s0 + (s1 - s0) * (b - b0) / (b1 - b0)
    b_last, s_last = points[-1]
    return s_last * b / b_last  # past the largest measured batch: the same cost per image


@dataclass(eq=False)
class Pending:
    """One queued request: ``size`` images that arrived at ``arrival`` (seconds), pinned at
    ``width`` or running at any width >= ``min_width``. ``payload`` is the server's own."""

    size: int
    arrival: float
    width: float | None = None
    min_width: float | None = None
    payload: Any = field(default=None, repr=False)


@dataclass
class Batch:
    requests: list[Pending]
    width: float
    size: int
    started: float
    expected: float  # seconds, from the latency table


@dataclass(frozen=True)
class Admission:
    """Whether a request was queued; if not, the HTTP status, why, and when to retry."""

    accepted: bool
    status: int = 200
    reason: str = ""
    retry_after_s: int = 0


class WidthController:
    """Queue, admission control and per-batch width choice (see the module docstring).

    Args:
        widths: the widths the runner has, ascending.
        table: expected latency per (width, batch size).
        slo_s: the latency objective of every request, in seconds.
        max_batch: images per batch at most.
        max_queue: images waiting at most (a bound on memory).
        margin_s: time kept free of model work in every deadline (request parsing, response
            encoding, the client's own HTTP work); default 10% of the SLO (the server adds
            what it observes of its own).
        equivalent: width -> the narrowest width that gives the same network (pinning any
            width from there up runs it).
    """

    def __init__(self, widths: Sequence[float], table: LatencyTable, slo_s: float,
                 max_batch: int, max_queue: int, margin_s: float | None = None,
                 equivalent: Mapping[float, float] | None = None):  # fmt: skip
        if not widths or list(widths) != sorted(set(widths)):
            raise UsnetValueError(f"widths must be distinct and ascending, got {list(widths)}")
        if not slo_s > 0:
            raise UsnetValueError(f"the SLO must be a positive time, got {slo_s!r} s")
        if max_queue < max_batch:
            raise UsnetValueError(f"max_queue ({max_queue}) must hold a batch ({max_batch})")
        self.widths = tuple(widths)
        self.equivalent = {w: (equivalent or {}).get(w, w) for w in self.widths}
        self.table = table
        self.slo_s = float(slo_s)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.margin_s = 0.1 * self.slo_s if margin_s is None else float(margin_s)
        self.queue: deque[Pending] = deque()
        self.queued_images = 0
        self.running: Batch | None = None

    # --- widths a request allows ------------------------------------------------------------
    def resolve_width(self, width: float) -> float:
        """The width that runs for a pinned ``width``: the widest available at most it (or
        giving the same network as a width at most it)."""
        fitting = [w for w in self.widths if self.equivalent[w] <= width + 1e-9]
        if not fitting:
            raise UsnetValueError(f"width {width:g} is below the narrowest served width "
                                  f"{self.equivalent[self.widths[0]]:g}; served: "
                                  f"{_list(self.widths)}")  # fmt: skip
        return fitting[-1]

    def resolve_min_width(self, min_width: float) -> float:
        """The narrowest available width at least ``min_width``."""
        fitting = [w for w in self.widths if w >= min_width - 1e-9]
        if not fitting:
            raise UsnetValueError(f"min_width {min_width:g} is above the widest served width "
                                  f"{self.widths[-1]:g}; served: {_list(self.widths)}")  # fmt: skip
        return fitting[0]

    def _lowest(self, request: Pending) -> float:
        if request.width is not None:
            return request.width
        return request.min_width if request.min_width is not None else self.widths[0]

    # --- arrivals ---------------------------------------------------------------------------
    def admit(self, request: Pending, now: float) -> Admission:
        """Queue ``request`` unless it would miss the SLO even at the narrowest width it allows
        (429) or the queue is full (503). Pinned and floor widths must be resolved already."""
        if not 1 <= request.size <= self.max_batch:
            raise UsnetValueError(f"a request holds 1 to {self.max_batch} images (the server's "
                                  f"--max-batch), got {request.size}")  # fmt: skip
        if self.queued_images + request.size > self.max_queue:
            return Admission(False, 503, f"the queue is full ({self.queued_images} images "
                             f"waiting, at most {self.max_queue})", self._retry_after(now))  # fmt: skip
        finish = self._finish_at_lowest(now, extra=request)
        idle = self.running is None and not self.queue
        # An idle model always takes the request: refusing on a table that may be stale
        # (a slowdown that has passed) would leave nothing to observe, and refuse forever.
        if not idle and finish + self.margin_s > request.arrival + self.slo_s:
            return Admission(False, 429, f"overloaded: even at width {self._lowest(request):g} "
                             f"this request would take {1e3 * (finish - request.arrival):.1f} ms "
                             f"(SLO {1e3 * self.slo_s:g} ms)", self._retry_after(now))  # fmt: skip
        self.queue.append(request)
        self.queued_images += request.size
        return Admission(True)

    def _busy_until(self, now: float) -> float:  # the running batch's expected end
        if self.running is None:
            return now
        return max(now, self.running.started + self.running.expected)

    def _finish_at_lowest(self, now: float, extra: Pending | None = None) -> float:
        """When the queue (and ``extra`` behind it) is expected to be done, every request at
        the narrowest width it allows, batched as :meth:`next_batch` groups them. Central
        estimates, not safe ones: refusing is a certain failure, serving late only a possible
        one, so a request is refused only when it is expected to miss."""
        t = self._busy_until(now)
        chunk_width, chunk = None, 0
        for r in [*self.queue, *([extra] if extra is not None else [])]:
            w = self._lowest(r)
            if w != chunk_width or chunk + r.size > self.max_batch:
                if chunk:
                    t += self.table.estimate(chunk_width, chunk, safe=False)
                chunk_width, chunk = w, 0
            chunk += r.size
        if chunk:
            t += self.table.estimate(chunk_width, chunk, safe=False)
        return t

    def _retry_after(self, now: float) -> int:
        """Whole seconds until the queue is expected to have drained (at least 1)."""
        return max(1, math.ceil(self._finish_at_lowest(now) - now))

    # --- dispatch ---------------------------------------------------------------------------
    def next_batch(self, now: float) -> Batch | None:
        """The batch to run now (removed from the queue), or None if nothing waits."""
        if not self.queue:
            return None
        head = self.queue[0]
        members, size, rest = [], 0, []
        for r in self.queue:
            if r.width == head.width and size + r.size <= self.max_batch:
                members.append(r)
                size += r.size
            else:
                rest.append(r)
        if head.width is not None:
            width = head.width
        else:
            floor = max(self._lowest(r) for r in members)
            width = self._choose(now, head, size, floor, rest)
        self.queue = deque(rest)
        self.queued_images -= size
        batch = Batch(members, width, size, now, self.table.estimate(width, size, safe=False))
        self.running = batch
        return batch

    def _choose(self, now: float, head: Pending, size: int, floor: float,
                rest: Sequence[Pending]) -> float:  # fmt: skip
        candidates = [w for w in self.widths if w >= floor - 1e-9]
        deadline = head.arrival + self.slo_s - self.margin_s
        fits = [w for w in candidates if now + self.table.estimate(w, size) <= deadline]
        if not fits:
            return candidates[0]  # late already: clear it as fast as possible
        # Everything queued behind must still make its deadline at its narrowest width.
        latest_end = self._latest_start(rest)
        ahead = [w for w in fits if now + self.table.estimate(w, size) <= latest_end]
        return ahead[-1] if ahead else fits[0]

    def _latest_start(self, requests: Sequence[Pending]) -> float:
        """The latest time at which ``requests``, run in order at their narrowest widths, can
        start with each still finishing by its deadline (inf for none)."""
        latest, elapsed = math.inf, 0.0
        chunk_width, chunk, oldest = None, 0, math.inf
        for r in [*requests, None]:
            w = None if r is None else self._lowest(r)
            if r is None or w != chunk_width or chunk + r.size > self.max_batch:
                if chunk:
                    elapsed += self.table.estimate(chunk_width, chunk)
                    latest = min(latest, oldest + self.slo_s - self.margin_s - elapsed)
                if r is None:
                    break
                chunk_width, chunk, oldest = w, 0, r.arrival
            chunk += r.size
        return latest

    def finished(self, batch: Batch, seconds: float) -> None:
        """A batch ran in ``seconds``: the latency table learns it and the model is free."""
        self.table.observe(batch.width, batch.size, seconds)
        if self.running is batch:
            self.running = None


def _list(widths: Sequence[float]) -> str:
    return ", ".join(f"{w:g}" for w in widths)
