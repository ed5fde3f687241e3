"""Mutation checks of the ``usnet serve`` tests (docs/testing.md): each case switches one
feature off with monkeypatch, calls the test that guards it, and requires it to fail."""

from __future__ import annotations

import math
import socket

import pytest
import test_serve_app as app_tests
import test_serve_controller as controller_tests
import test_serve_runners as runner_tests
import torch

from usnet.serve import app, controller, runners


def fails(test, *args) -> None:
    with pytest.raises(AssertionError):
        test(*args)


def test_always_full_width_fails_the_overload_test(monkeypatch):
    monkeypatch.setattr(controller.WidthController, "_choose",
                        lambda self, now, head, size, floor, rest: self.widths[-1])  # fmt: skip
    fails(controller_tests.test_overload_narrows_instead_of_missing)


def test_no_admission_control_fails_the_admission_test(monkeypatch):
    admit = controller.WidthController.admit

    def admit_all(self, request, now):
        self.slo_s, saved = math.inf, self.slo_s  # never predicts a miss
        try:
            return admit(self, request, now)
        finally:
            self.slo_s = saved

    monkeypatch.setattr(controller.WidthController, "admit", admit_all)
    fails(controller_tests.test_admission_control_only_when_the_narrowest_misses)


def test_admission_at_the_widest_width_fails_the_overload_test(monkeypatch):
    monkeypatch.setattr(controller.WidthController, "_lowest",
                        lambda self, r: r.width if r.width is not None else self.widths[-1])  # fmt: skip
    fails(controller_tests.test_overload_narrows_instead_of_missing)


def test_ignoring_the_queue_behind_fails_its_test(monkeypatch):
    monkeypatch.setattr(controller.WidthController, "_latest_start", lambda self, rest: math.inf)
    fails(controller_tests.test_the_deadlines_queued_behind_narrow_this_batch)


def test_a_table_that_never_learns_fails_its_tests(monkeypatch):
    monkeypatch.setattr(controller.LatencyTable, "observe", lambda self, w, b, s: None)
    fails(controller_tests.test_latency_table_learns_a_slower_model)
    fails(controller_tests.test_a_slowdown_seen_at_one_width_slows_every_estimate)


def test_the_largest_slowdown_fails_the_stall_test(monkeypatch):
    monkeypatch.setattr(controller, "_quantile", lambda values, q: max(values))
    fails(controller_tests.test_a_slowdown_seen_at_one_width_slows_every_estimate)


def test_expecting_the_mean_fails_the_noise_test(monkeypatch):
    monkeypatch.setattr(controller, "DEVIATIONS", 0.0)
    fails(controller_tests.test_a_noisy_entry_expects_its_mean_plus_two_deviations)


def test_an_unbounded_queue_fails_its_test(monkeypatch):
    monkeypatch.setattr(
        controller.WidthController, "__init__", _unbounded(controller.WidthController.__init__)
    )
    fails(controller_tests.test_the_queue_is_bounded)


def _unbounded(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.max_queue = 10**9

    return patched


def test_pinning_the_narrowest_fails_the_pinning_test(monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(controller.WidthController, "resolve_width", lambda self, w: self.widths[0])
    runner = runners.open_runner(tiny_checkpoint[0])
    client, _ = app_tests.make_client(runner, max_batch=8)
    with client:
        fails(app_tests.test_a_pinned_width_runs_the_widest_served_at_most_it, client,
              tiny_checkpoint, 0.6, 0.5)  # fmt: skip


def test_sharing_unequal_tensors_fails_the_sharing_test(monkeypatch):
    monkeypatch.setattr(runners.torch, "equal", lambda a, b: True)
    try:
        fails(runner_tests.test_narrower_widths_share_the_full_widths_storage)
    finally:
        monkeypatch.undo()
    assert torch.equal(torch.zeros(1), torch.zeros(1))


def test_a_socket_without_nodelay_fails_its_test(monkeypatch):
    real = socket.socket

    def plain(family=-1, type=-1, proto=-1, fileno=None):
        return real(family, type, 0 if proto == socket.IPPROTO_TCP else proto, fileno)

    monkeypatch.setattr(app.socket, "socket", plain)
    fails(app_tests.test_accepted_connections_send_without_delay)


def test_safe_admission_fails_the_admission_test(monkeypatch):
    estimate = controller.LatencyTable.estimate
    monkeypatch.setattr(controller.LatencyTable, "estimate",
                        lambda self, w, b, safe=True: estimate(self, w, b, True))  # fmt: skip
    fails(controller_tests.test_admission_expects_the_mean_and_the_width_choice_the_safe_side)
