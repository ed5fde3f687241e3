"""Mutation checks: each test named here must FAIL when the feature it checks is switched off.

A test that still passes with its feature removed proves nothing (docs/testing.md). Each case
below removes one feature with ``monkeypatch`` (the bug a regression would introduce), runs the
checking test's function directly, and asserts that it raises ``AssertionError`` (a failed
assertion of the test itself, not a crash). The cases are the cheap ones (a few seconds in all);
docs/testing.md lists how the others were checked by hand.
"""

from __future__ import annotations

import contextlib

import pytest
import test_calibrate
import test_channels
import torch
from convert import test_convert_attention
from deploy import test_select
from train import test_reorder_reconstruction, test_trainer
from train import test_sandwich as test_training
from usnet_testing import zoo_model

import usnet.checkpoint
import usnet.deploy.select
import usnet.nn.norm
import usnet.state
import usnet.train.reorder
import usnet.train.sandwich


def fails(test, *args) -> str:
    """Run ``test(*args)``; it must fail on one of its own assertions. Returns the message."""
    with pytest.raises(AssertionError) as failure:
        test(*args)
    return str(failure.value)


def _no_autocast(*args, **kwargs):
    return contextlib.nullcontext()


def test_autocast_ignored_fails_the_bf16_and_fp16_tests(monkeypatch):
    monkeypatch.setattr(torch, "autocast", _no_autocast)
    fails(test_training.test_bf16_autocast_step)
    fails(test_training.test_fp16_autocast_with_grad_scaler_step_on_cpu)


def test_scaler_ignored_fails_the_grad_scaler_test(monkeypatch):
    step = usnet.train.sandwich.sandwich_step
    monkeypatch.setattr(test_training, "sandwich_step",
                        lambda *args, scaler=None, **kwargs: step(*args, **kwargs))  # fmt: skip
    fails(test_training.test_grad_scaler_scales_the_backward_and_unscales_the_step)


def test_step_without_unscaling_fails_the_grad_scaler_test(monkeypatch):
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, optimizer: optimizer.step())
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self: None)
    fails(test_training.test_grad_scaler_scales_the_backward_and_unscales_the_step)


def test_trainer_without_learning_fails_the_accuracy_check(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
    message = fails(test_trainer.test_channels_last_and_autocast_runs, tmp_path, ["amp=bf16"],
                    torch.bfloat16)  # fmt: skip
    assert message.startswith("[0.")  # the accuracy assertion, with the accuracies at chance


def test_trainer_ignoring_amp_fails_the_dtype_check(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "autocast", _no_autocast)
    fails(test_trainer.test_channels_last_and_autocast_runs, tmp_path, ["amp=bf16"], torch.bfloat16)


def test_constant_latency_fails_the_real_latency_test(monkeypatch, tmp_path):
    monkeypatch.setattr(usnet.deploy.select, "measure_latency",
                        lambda module, input_size, **kwargs: [1.0] * kwargs.get("repeats", 1))  # fmt: skip
    fails(test_select.test_real_latency_measurement_orders_widths_and_chooses_by_it,
          zoo_model("us_convnet"), tmp_path)  # fmt: skip


def test_biased_calibration_fails_the_every_layer_check(monkeypatch):
    stats = usnet.nn.norm._cpu_batch_stats

    def shifted(input):
        out = stats(input)
        return None if out is None else (out[0] + 1e-3, out[1], out[2])

    monkeypatch.setattr(usnet.nn.norm, "_cpu_batch_stats", shifted)
    fails(
        test_calibrate.test_every_bn_layer_equals_pytorch_cumulative_batchnorm, "us_resnet18", 0.4
    )


def test_unstable_config_id_fails_the_pinned_id(monkeypatch):
    monkeypatch.setattr(test_channels, "config_id",
                        lambda config: f"{hash(('salt', config)) & 0xFFFFFFFFFF:010x}")  # fmt: skip
    fails(test_channels.test_config_and_plan_equality)


def _converted_vits() -> dict:
    return test_convert_attention.converted.__wrapped__()


def test_size_attributes_not_kept_fail_the_export_attribute_test(monkeypatch):
    """``usnet.attributes`` switched off: exports keep full-width mlp_dim / num_heads."""
    monkeypatch.setattr(usnet.state, "size_attributes_of", lambda module: None)
    fails(test_convert_attention.test_export_descriptive_size_attributes_follow_the_width,
          _converted_vits())  # fmt: skip


def test_attention_slicing_bug_fails_the_hand_sliced_reference_test(monkeypatch):
    """``SlimmableMultiheadAttention`` taking k and v from the query's rows: every shape stays
    right (and the export copies the same bug), so only an independent reference catches it."""
    monkeypatch.setattr(usnet.nn.attention.SlimmableMultiheadAttention, "active_parameters",
                        lambda self: _first_heads_of_the_wrong_rows(self))  # fmt: skip
    fails(test_convert_attention.test_narrow_attention_equals_a_hand_sliced_multihead_attention)


def _first_heads_of_the_wrong_rows(mha) -> dict:
    """q, k and v all from the query rows (a slicing bug that keeps every shape right)."""
    e, index = mha.active_embed, mha.active_index
    rows = torch.cat([torch.arange(e)] * 3)
    take = usnet.nn.base.take
    return {
        "in_proj_weight": take(mha.in_proj_weight.index_select(0, rows), 1, e, index),
        "in_proj_bias": None
        if mha.in_proj_bias is None
        else mha.in_proj_bias.index_select(0, rows),
        "out_proj.weight": take(mha.out_proj.weight[:, :e], 0, e, index),
        "out_proj.bias": None
        if mha.out_proj.bias is None
        else take(mha.out_proj.bias, 0, e, index),
        "bias_k": None,
        "bias_v": None,
    }


def _per_channel_order(terms, size):
    """Each channel ranked by its own share of the outputs, ``mean_o corr(z_c, z_o)^2``: the
    per-channel score the joint greedy order replaces (cross-channel covariances ignored)."""
    score = torch.zeros(size, dtype=torch.float64)
    for w, cov in terms:
        flat = cov.reshape(size * w.shape[2], -1)
        t = (flat @ w.reshape(w.shape[0], -1).T).reshape(size, w.shape[2], -1)
        u = (w.permute(1, 2, 0) * t).sum(1)
        blocks = cov[torch.arange(size), :, torch.arange(size), :]
        var_c = torch.einsum("ocp,cpq,ocq->co", w, blocks, w)
        score += (u**2 / (var_c * u.sum(0)).clamp_min(1e-30)).mean(1)
    return torch.argsort(-score)


def test_per_channel_scores_fail_the_reconstruction_brute_force_tests(monkeypatch):
    monkeypatch.setattr(usnet.train.reorder, "_greedy_prefix_order", _per_channel_order)
    monkeypatch.setattr(test_reorder_reconstruction, "_greedy_prefix_order", _per_channel_order)
    fails(test_reorder_reconstruction.test_greedy_order_equals_brute_force_on_a_covariance)
    fails(test_reorder_reconstruction.test_model_order_equals_brute_force_on_the_consumers_outputs)


def test_uncentered_covariance_fails_the_reconstruction_model_test(monkeypatch):
    """The second moment instead of the covariance: ReLU outputs have large means, so the order
    changes (correlation is about centered outputs, as BatchNorm centres them)."""
    monkeypatch.setattr(usnet.train.reorder._InputCovariance, "covariance",
                        lambda self: self.outer / self.count)  # fmt: skip
    fails(test_reorder_reconstruction.test_model_order_equals_brute_force_on_the_consumers_outputs)


def test_narrowest_loss_read_from_the_second_width_fails_its_test(monkeypatch):
    """The old trainer bug: ``losses[1]`` is the narrowest only under the plain sandwich rule."""
    monkeypatch.setattr(usnet.train.sandwich.StepResult, "narrowest_loss",
                        property(lambda self: self.losses[1]))  # fmt: skip
    fails(test_training.test_narrowest_loss_is_the_narrowest_widths_whatever_the_order, "max")


def test_old_checkpoints_fail_to_load_without_the_moved_class_map(monkeypatch):
    """tests/test_checkpoint_fixtures.py proves something only if the fixture needs the map."""
    import test_checkpoint_fixtures

    monkeypatch.setattr(usnet.checkpoint, "MOVED_MODULES", {})
    with pytest.raises(usnet.UsnetError, match="not a readable checkpoint"):
        test_checkpoint_fixtures.test_old_checkpoint_loads_with_identical_outputs("converted")
