"""The width controller as pure logic: a fake clock and a simulated model whose batches take
what a known latency function says (an independent discrete-event simulation, not the server)."""

from __future__ import annotations

import math

import pytest

from usnet.serve.controller import Batch, LatencyTable, Pending, WidthController

WIDTHS = (0.25, 0.5, 1.0)
MAX_BATCH = 8
SLO = 0.020


def true_latency(width: float, batch: int) -> float:
    """Seconds of a batch: a fixed cost plus a cost per image, both growing with width."""
    fixed, per_image = {0.25: (0.5e-3, 0.1e-3), 0.5: (1e-3, 0.3e-3), 1.0: (2e-3, 1e-3)}[width]
    return fixed + per_image * batch


def measured(scale: float = 1.0) -> dict:
    return {(w, b): scale * true_latency(w, b) for w in WIDTHS for b in (1, 2, 4, 8)}


def make_controller(scale: float = 1.0, max_queue: int = 1024, margin: float | None = None):
    table = LatencyTable(WIDTHS, MAX_BATCH, measured(scale))
    return WidthController(WIDTHS, table, SLO, MAX_BATCH, max_queue, margin_s=margin)


def simulate(controller: WidthController, arrivals, latency=true_latency):
    """Run ``arrivals`` [(time, size, pinned width, min width)] through ``controller`` with one
    model; returns per request (status, latency or None, width or None) and the batches."""
    events = sorted(enumerate(arrivals), key=lambda e: e[1][0])
    results = [None] * len(arrivals)
    batches = []
    now, i, running = 0.0, 0, None  # running: (finish time, batch)
    while i < len(events) or running is not None or controller.queue:
        next_arrival = events[i][1][0] if i < len(events) else math.inf
        next_finish = running[0] if running is not None else math.inf
        now = min(next_arrival, next_finish)
        if running is not None and running[0] <= now:
            finish, batch = running
            controller.finished(batch, latency(batch.width, batch.size))
            for r in batch.requests:
                results[r.payload] = (200, finish - r.arrival, batch.width)
            running = None
        while i < len(events) and events[i][1][0] <= now:
            index, (t, size, width, min_width) = events[i]
            request = Pending(size, t, width, min_width, payload=index)
            admission = controller.admit(request, now)
            if not admission.accepted:
                results[index] = (admission.status, None, None)
                assert admission.retry_after_s >= 1
            i += 1
        if running is None:
            batch = controller.next_batch(now)
            if batch is not None:
                batches.append(batch)
                running = (now + latency(batch.width, batch.size), batch)
    return results, batches


def poisson(rate: float, duration: float, seed: int = 0, size: int = 1, **kw):
    import random

    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((t, size, kw.get("width"), kw.get("min_width")))


def attainment(results) -> float:
    return sum(1 for s, lat, _ in results if s == 200 and lat <= SLO + 1e-12) / len(results)


def full_width_capacity() -> float:
    """Images per second of the full width at the largest batch."""
    return MAX_BATCH / true_latency(1.0, MAX_BATCH)


def test_low_load_serves_full_width():
    results, batches = simulate(make_controller(), poisson(0.2 * full_width_capacity(), 2.0))
    assert len(results) > 100
    assert {w for _, _, w in results} == {1.0}
    assert attainment(results) == 1.0


def test_overload_narrows_instead_of_missing():
    # 3x what the full width can serve: a fixed full-width server would fall behind for good.
    arrivals = poisson(3 * full_width_capacity(), 1.0, seed=1)
    results, batches = simulate(make_controller(), arrivals)
    pinned, _ = simulate(make_controller(), [(t, s, 1.0, None) for t, s, _, _ in arrivals])
    assert attainment(pinned) < 0.5  # the baseline really is overloaded
    assert all(s == 200 for s, _, _ in results)  # the narrowest copes: nobody is refused
    assert attainment(results) >= 0.99
    widths = [w for _, _, w in results]
    assert sum(w < 1.0 for w in widths) > 0.5 * len(widths)
    assert max(widths) == 1.0  # the start of the trace, before a queue builds, is full width


def test_admission_control_only_when_the_narrowest_misses():
    narrowest_capacity = MAX_BATCH / true_latency(0.25, MAX_BATCH)
    results, _ = simulate(make_controller(), poisson(2 * narrowest_capacity, 0.5, seed=2))
    refused = [s for s, _, _ in results if s != 200]
    assert refused and set(refused) == {429}
    served = [lat for s, lat, _ in results if s == 200]
    assert sum(lat <= SLO for lat in served) >= 0.99 * len(served)
    # just under the narrowest's capacity: no refusal at all
    results, _ = simulate(make_controller(), poisson(0.6 * narrowest_capacity, 0.5, seed=3))
    assert all(s == 200 for s, _, _ in results)
    assert attainment(results) >= 0.99


def test_pinned_requests_run_at_their_width_and_batch_only_together():
    arrivals = poisson(3 * full_width_capacity(), 0.3, seed=4)
    arrivals = [(t, 1, 0.5 if k % 3 == 0 else None, None) for k, (t, *_) in enumerate(arrivals)]
    results, batches = simulate(make_controller(), arrivals)
    for (_, _, width, _), (status, _, ran) in zip(arrivals, results):
        if width is not None and status == 200:
            assert ran == 0.5
    for batch in batches:
        assert len({r.width for r in batch.requests}) == 1
        assert batch.size <= MAX_BATCH


def test_min_width_is_a_floor():
    arrivals = poisson(3 * full_width_capacity(), 0.3, seed=5, min_width=0.5)
    results, _ = simulate(make_controller(), arrivals)
    ran = [w for s, _, w in results if s == 200]
    assert ran and min(ran) == 0.5


def test_width_is_the_widest_that_fits_the_slack():
    c = make_controller(margin=0.0)
    for k in range(4):
        assert c.admit(Pending(1, 0.0, payload=k), 0.0).accepted
    # 4 images, head waited 13 ms: 7 ms of slack; full width needs 6 ms, fits
    batch = c.next_batch(0.013)
    assert (batch.width, batch.size) == (1.0, 4)
    c.finished(batch, true_latency(1.0, 4))
    for k in range(4):
        c.admit(Pending(1, 0.020, payload=k), 0.020)
    batch = c.next_batch(0.0345)  # 5.5 ms of slack: 1.0 needs 6 ms, 0.5 needs 2.2 ms
    assert batch.width == 0.5


def test_the_deadlines_queued_behind_narrow_this_batch():
    c = make_controller(margin=0.0)
    for k in range(8):
        c.admit(Pending(1, 0.0, payload=k), 0.0)
    c.admit(Pending(1, 0.0, payload=8), 0.0)  # the ninth waits for the next batch
    batch = c.next_batch(0.008)
    # full width (10 ms) fits the head's 12 ms of slack, and the ninth (0.6 ms at the
    # narrowest) then still finishes at 18.6 ms, within 20: full width.
    assert batch.width == 1.0
    c2 = make_controller(margin=0.0)
    for k in range(9):
        c2.admit(Pending(1, 0.0, payload=k), 0.0)
    batch = c2.next_batch(0.0095)  # full width ends at 19.5 ms; the ninth then needs 0.6 more
    assert batch.width == 0.5


def test_latency_table_learns_a_slower_model():
    # The table believes the model 3x faster than it is: the first batches miss, then the
    # observed latency takes over and the SLO is met again.
    c = make_controller(scale=1 / 3)
    arrivals = poisson(1.5 * full_width_capacity(), 2.0, seed=6)
    results, _ = simulate(c, arrivals)
    late_half = results[len(results) // 2 :]
    assert attainment(late_half) >= 0.99
    truth = true_latency(1.0, MAX_BATCH)
    assert truth <= c.table.estimate(1.0, MAX_BATCH) <= 1.2 * truth  # the believed 1/3 is gone


def test_a_slowdown_seen_at_one_width_slows_every_estimate():
    table = LatencyTable(WIDTHS, MAX_BATCH, measured())
    for _ in range(30):  # another process takes half the CPU: full width runs 2x slower
        table.observe(1.0, 4, 2 * true_latency(1.0, 4))
    assert table.estimate(1.0, 4) == pytest.approx(2 * true_latency(1.0, 4), rel=0.01)
    assert table.estimate(0.25, 8) == pytest.approx(2 * true_latency(0.25, 8))  # never ran
    table.observe(0.5, 8, 50 * true_latency(0.5, 8))  # one stalled batch moves no other entry
    assert table.estimate(0.25, 8) == pytest.approx(2 * true_latency(0.25, 8))
    for _ in range(70):  # the other process went away
        table.observe(1.0, 4, true_latency(1.0, 4))
    assert table.estimate(1.0, 4) == pytest.approx(true_latency(1.0, 4), rel=0.01)
    assert table.estimate(0.25, 8) == pytest.approx(true_latency(0.25, 8))


def test_a_noisy_entry_expects_its_mean_plus_two_deviations():
    table = LatencyTable((1.0,), 8, {(1.0, 1): 1.0, (1.0, 8): 8.0})
    for k in range(400):  # alternately 6 and 10: mean 8, mean deviation 2
        table.observe(1.0, 8, 6.0 if k % 2 else 10.0)
    assert table.estimate(1.0, 8) == pytest.approx(8.0 + 2 * 2.0, rel=0.12)
    assert table.estimate(1.0, 8) > 10.0  # above most observations, not at their mean


def test_latency_table_interpolates_and_never_decreases_with_batch():
    table = LatencyTable((1.0,), 8, {(1.0, 1): 1.0, (1.0, 4): 4.0, (1.0, 8): 2.0})
    assert table.estimate(1.0, 2) == pytest.approx(2.0)
    assert table.estimate(1.0, 3) == pytest.approx(3.0)
    assert table.estimate(1.0, 6) == pytest.approx(4.0)  # 3.0 interpolated, but 4 took 4.0
    assert table.estimate(1.0, 16) == pytest.approx(8.0)  # past max_batch: per image
    table.observe(1.0, 8, 12.0)  # 3x the table: others 3x; this one 12 + 2 * 12 / 4
    assert table.estimate(1.0, 8) == pytest.approx(18.0)
    assert table.estimate(1.0, 2) == pytest.approx(6.0)
    table.observe(1.0, 8, 2.0)  # mean 12 + 0.2 * (2 - 12), deviation 3 + 0.2 * (10 - 3)
    assert table.estimate(1.0, 8) == pytest.approx(10.0 + 2 * 4.4)
    assert table.to_dict()["1"]["8"] == pytest.approx(18800.0)
    table.observe(1.0, 8, math.nan)  # a failed batch teaches nothing
    assert table.estimate(1.0, 8) == pytest.approx(18.8)


def test_the_queue_is_bounded():
    c = make_controller(max_queue=8)
    for k in range(8):
        assert c.admit(Pending(1, 0.0, width=1.0, payload=k), 0.0).accepted
    refused = c.admit(Pending(1, 0.0, payload=9), 0.0)
    assert (refused.accepted, refused.status) == (False, 503)
    assert "queue is full" in refused.reason and refused.retry_after_s >= 1
    assert c.queued_images == 8


def test_request_widths_resolve_to_served_ones():
    c = make_controller()
    assert c.resolve_width(0.7) == 0.5
    assert c.resolve_width(1.0) == 1.0
    assert c.resolve_min_width(0.3) == 0.5
    with pytest.raises(
        ValueError, match="below the narrowest served width 0.25; served: 0.25, 0.5, 1"
    ):
        c.resolve_width(0.2)
    with pytest.raises(ValueError, match="above the widest"):
        c.resolve_min_width(1.5)
    with pytest.raises(ValueError, match="1 to 8 images"):
        c.admit(Pending(9, 0.0), 0.0)


def test_a_pinned_width_runs_the_network_it_rounds_to():
    # 0.5 stands for widths 0.4..0.5 (the same channels): pinning 0.45 runs it, not 0.25
    table = LatencyTable(WIDTHS, MAX_BATCH, measured())
    c = WidthController(WIDTHS, table, SLO, MAX_BATCH, 64, equivalent={0.5: 0.4})
    assert c.resolve_width(0.45) == 0.5
    assert c.resolve_width(0.39) == 0.25
    assert make_controller().resolve_width(0.45) == 0.25


def test_an_idle_model_takes_a_request_whatever_the_table_says():
    c = make_controller(scale=100.0)  # a stale table: every width looks 100x too slow
    first = c.admit(Pending(1, 0.0, payload=0), 0.0)
    assert first.accepted  # idle: served, and observed
    second = c.admit(Pending(1, 0.0, payload=1), 0.0)
    assert (second.accepted, second.status) == (False, 429)  # busy: the table decides
    batch = c.next_batch(0.0)
    c.finished(batch, true_latency(batch.width, batch.size))
    assert c.table.estimate(batch.width, 1) == pytest.approx(1.5 * true_latency(batch.width, 1))


def test_admission_expects_the_mean_and_the_width_choice_the_safe_side():
    table = LatencyTable(WIDTHS, MAX_BATCH, measured())
    for k in range(200):  # the narrowest at batch 1 takes 4 or 12 ms: mean 8, deviation 4
        table.observe(0.25, 1, 4e-3 if k % 2 else 12e-3)
    assert table.estimate(0.25, 1, safe=False) == pytest.approx(8e-3, rel=0.1)
    assert table.estimate(0.25, 1) == pytest.approx(16e-3, rel=0.1)
    c = WidthController(WIDTHS, table, SLO, MAX_BATCH, 64, margin_s=0.0)
    c.running = Batch([], 0.25, 1, 0.0, 5e-3)  # busy for 5 more ms
    # expected: 5 + 8 = 13 ms <= 20: taken (on the safe side, 5 + 16 = 21 would refuse it)
    assert c.admit(Pending(1, 0.0, min_width=0.25), 0.0).accepted
