"""Tests of usnet.training: width sampling, losses, the sandwich step, optimizer and schedule."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import usnet
from usnet.train.distill import DISTILL, LABELS, InplaceDistillationLoss, soft_cross_entropy
from usnet.train.recipe import SCHEDULES, lr_lambda, make_optimizer, make_scheduler, param_groups
from usnet.train.samplers import WidthSampler
from usnet.train.sandwich import StepResult, sandwich_step

RANGE = (0.25, 1.0)
NUM_CLASSES = 4


def tiny_model(seed: int = 0) -> nn.Module:
    """conv+BN, depthwise conv(+bias)+BN, 1x1 conv+BN, linear: a slimmable CNN in 1 ms."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, NUM_CLASSES),
        )
    return usnet.slimmable(model, RANGE, input_size=(1, 1, 8, 8), divisor=4).train()


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def hand_gradients(model, images, labels, widths, smoothing, temperature):
    """Sum over widths of each width's loss gradient, each taken on its own with autograd.grad."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    teacher = None
    for i, w in enumerate(widths):
        usnet.set_width(model, w)
        logits = model(images)
        if i == 0:
            loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            teacher = F.softmax(logits.detach() / temperature, dim=1)
        else:
            log_p = F.log_softmax(logits / temperature, dim=1)
            loss = -(teacher * log_p).sum(1).mean() * temperature**2
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t += g
    return total


# -- sandwich step ---------------------------------------------------------------------------
def test_sandwich_step_accumulates_exactly_the_drawn_widths():
    model = tiny_model()
    ref = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    images, labels = batch()
    sampler = WidthSampler(RANGE, num_widths=4, seed=3)
    criterion = InplaceDistillationLoss(label_smoothing=0.1, temperature=2.0, label_weight=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    result = sandwich_step(model, images, labels, optimizer, sampler, criterion)

    assert isinstance(result, StepResult)
    assert result.widths == WidthSampler(RANGE, num_widths=4, seed=3).sample()
    assert result.loss_kinds == [LABELS, DISTILL, DISTILL, DISTILL]
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    for k, v in model.state_dict().items():  # lr=0: the step changed nothing
        assert torch.equal(v, before[k]), k

    expected = hand_gradients(ref, images, labels, result.widths, 0.1, 2.0)
    assert max_diff(grads(model), expected) <= 1e-6
    # Sensitivity: leaving out one drawn width gives a clearly different gradient.
    partial = hand_gradients(copy.deepcopy(ref), images, labels, result.widths[:-1], 0.1, 2.0)
    assert max_diff(grads(model), partial) > 1e-4
    # The model ends at the widest width.
    assert usnet.get_width(model) == 1.0


def test_sandwich_step_fixed_widths_and_losses_match_forward():
    model = tiny_model()
    ref = copy.deepcopy(model)
    images, labels = batch()
    criterion = InplaceDistillationLoss()
    usnet.set_width(model, 0.5)
    result = sandwich_step(
        model,
        images,
        labels,
        torch.optim.SGD(model.parameters(), lr=0.0),
        [1.0, 0.6, 0.25],
        criterion,
    )
    assert result.widths == [1.0, 0.6, 0.25]
    assert usnet.get_width(model) == 1.0
    teacher = F.softmax(ref(images), dim=1)
    assert result.losses[0] == pytest.approx(F.cross_entropy(ref(images), labels).item(), abs=1e-6)
    usnet.set_width(ref, 0.25)
    narrow = ref(images)
    # the default recipe: half distillation from the widest, half the labels
    expected = 0.5 * soft_cross_entropy(narrow, teacher) + 0.5 * F.cross_entropy(narrow, labels)
    assert result.losses[2] == pytest.approx(expected.item(), abs=1e-6)
    assert result.narrowest_loss == result.losses[2] and result.widest_loss == result.losses[0]
    assert result.total_loss == pytest.approx(sum(result.losses))


def test_sandwich_step_rejects_non_widest_first_width():
    model = tiny_model()
    images, labels = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="widest"):
        sandwich_step(model, images, labels, optimizer, [0.5, 1.0], InplaceDistillationLoss())


def test_teacher_is_detached():
    model = tiny_model()
    images, labels = batch()
    params = list(model.parameters())
    criterion = InplaceDistillationLoss(temperature=1.5, label_weight=0.0)

    def narrow_grads(teacher_of):
        usnet.set_width(model, 1.0)
        wide_logits = model(images)
        teacher = teacher_of(wide_logits)
        usnet.set_width(model, 0.25)
        loss = criterion(model(images), labels, teacher)
        return torch.autograd.grad(loss, params, allow_unused=True), teacher

    def dense(gs):
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]

    got, teacher = narrow_grads(criterion.teacher_probs)
    assert not teacher.requires_grad and teacher.grad_fn is None
    constant, _ = narrow_grads(lambda z: F.softmax(z / 1.5, dim=1).detach().clone())
    assert max_diff(dense(got), dense(constant)) <= 1e-7
    # Control: a teacher left in the graph would send gradient into the widest forward.
    attached, _ = narrow_grads(lambda z: F.softmax(z / 1.5, dim=1))
    assert max_diff(dense(got), dense(attached)) > 1e-5


def test_distillation_disabled_uses_labels_everywhere():
    model = tiny_model()
    ref = copy.deepcopy(model)
    images, labels = batch()
    criterion = InplaceDistillationLoss(enabled=False)
    result = sandwich_step(
        model,
        images,
        labels,
        torch.optim.SGD(model.parameters(), lr=0.0),
        WidthSampler(RANGE, seed=1),
        criterion,
    )
    assert result.loss_kinds == [LABELS] * 4
    for w, value in zip(result.widths, result.losses):
        usnet.set_width(ref, w)
        assert value == pytest.approx(F.cross_entropy(ref(images), labels).item(), abs=1e-6)
    # A plain criterion is applied to every width too.
    plain = sandwich_step(
        model,
        images,
        labels,
        torch.optim.SGD(model.parameters(), lr=0.0),
        result.widths,
        nn.CrossEntropyLoss(),
    )
    assert plain.loss_kinds == [LABELS] * 4
    assert plain.losses == pytest.approx(result.losses, abs=1e-6)


def test_nan_loss_raises_and_skips_the_step():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    images, labels = batch()
    images[0, 0, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="width 1"):
        sandwich_step(
            model, images, labels, optimizer, WidthSampler(RANGE), InplaceDistillationLoss()
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert usnet.get_width(model) == 1.0


def record_output_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Forward hooks on every conv and linear layer: the dtypes of their outputs, in call order."""
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def record_grad_norms(param: nn.Parameter) -> list[float]:
    """A tensor hook on one parameter: the norm of every gradient backward hands it."""
    seen: list[float] = []
    param.register_hook(lambda g: seen.append(float(g.float().norm())))
    return seen


def test_grad_scaler_scales_the_backward_and_unscales_the_step():
    """The losses are scaled before backward (the gradients reaching a parameter are 2**10 times
    the plain ones) and the step sees the unscaled gradients (equal to the plain ones)."""
    images, labels = batch()
    widths = [1.0, 0.25, 0.7]
    plain, scaled = tiny_model(), tiny_model()
    plain_seen, scaled_seen = (
        record_grad_norms(plain[0].weight),
        record_grad_norms(scaled[0].weight),
    )
    sandwich_step(plain, images, labels, torch.optim.SGD(plain.parameters(), lr=0.0), widths,
                  InplaceDistillationLoss())  # fmt: skip
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    result = sandwich_step(scaled, images, labels, torch.optim.SGD(scaled.parameters(), lr=0.0),
                           widths, InplaceDistillationLoss(), scaler=scaler)  # fmt: skip
    assert all(math.isfinite(v) for v in result.losses)
    # scaled: one gradient per width, each 2**10 times the plain one
    assert len(scaled_seen) == len(plain_seen) == len(widths)
    for s, p in zip(scaled_seen, plain_seen):
        assert s == pytest.approx(scale * p, rel=1e-4)
    # unscaled: what the optimizer stepped with equals the plain gradients
    assert max_diff(grads(plain), grads(scaled)) <= 1e-6
    # the scaler ran its step (found no inf) and kept its scale
    assert scaler.get_scale() == scale and scaler._get_growth_tracker() == 1


def test_bf16_autocast_step():
    """Every conv and linear layer computes in bfloat16 inside the forward; the losses stay close
    to float32's and the parameters' gradients are float32."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    images, labels = batch()
    widths = [1.0, 0.25]
    fp32_seen, bf16_seen = record_output_dtypes(ref), record_output_dtypes(model)
    fp32 = sandwich_step(ref, images, labels, torch.optim.SGD(ref.parameters(), lr=0.0), widths,
                         InplaceDistillationLoss())  # fmt: skip
    bf16 = sandwich_step(
        model,
        images,
        labels,
        torch.optim.SGD(model.parameters(), lr=0.0),
        widths,
        InplaceDistillationLoss(),
        autocast_dtype=torch.bfloat16,
    )
    assert len(bf16_seen) == 4 * len(widths)  # 3 convs + 1 linear per width
    assert set(bf16_seen) == {torch.bfloat16} and set(fp32_seen) == {torch.float32}
    assert bf16.losses == pytest.approx(fp32.losses, abs=0.05)
    assert bf16.losses != fp32.losses  # rounding to 8 mantissa bits shows in the losses
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_fp16_autocast_with_grad_scaler_step_on_cpu():
    """amp: fp16 as the trainer runs it (autocast float16 + GradScaler), on the CPU: the forward
    computes in float16, the step's gradients equal float32's to fp16 rounding, and the weights
    move."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    images, labels = batch()
    widths = [1.0, 0.25, 0.7]
    fp16_seen = record_output_dtypes(model)
    sandwich_step(ref, images, labels, torch.optim.SGD(ref.parameters(), lr=0.0), widths,
                  InplaceDistillationLoss())  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    result = sandwich_step(model, images, labels, torch.optim.SGD(model.parameters(), lr=0.1),
                           widths, InplaceDistillationLoss(), scaler=scaler,
                           autocast_dtype=torch.float16)  # fmt: skip
    assert all(math.isfinite(v) for v in result.losses)
    assert set(fp16_seen) == {torch.float16} and len(fp16_seen) == 4 * len(widths)
    assert scaler.get_scale() == 2.0**8  # no overflow: the step was taken, not skipped
    relative = max_diff(grads(ref), grads(model)) / max(float(g.abs().max()) for g in grads(ref))
    assert relative < 0.02
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_ddp_wrapped_model_matches_plain(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        images, labels = batch()
        plain, inner = tiny_model(), tiny_model()
        ddp = nn.parallel.DistributedDataParallel(inner)
        widths = [1.0, 0.25, 0.6, 0.4]
        sandwich_step(plain, images, labels, torch.optim.SGD(plain.parameters(), lr=0.0), widths,
                      InplaceDistillationLoss())  # fmt: skip
        result = sandwich_step(ddp, images, labels, torch.optim.SGD(ddp.parameters(), lr=0.0),
                               widths, InplaceDistillationLoss())  # fmt: skip
        assert result.widths == widths
        assert max_diff(grads(plain), grads(inner)) <= 1e-6
        assert usnet.get_width(inner) == 1.0
    finally:
        dist.destroy_process_group()


def test_not_slimmable_model_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES))
    images, labels = batch()
    with pytest.raises(TypeError, match="not a slimmable model"):
        sandwich_step(model, images, labels, torch.optim.SGD(model.parameters(), lr=0.1),
                      WidthSampler(RANGE), InplaceDistillationLoss())  # fmt: skip


def test_sandwich_training_reduces_widest_loss():
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    # Separable: the class decides which quadrant of the image is bright.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % NUM_CLASSES
    images = 0.3 * torch.randn(64, 1, 8, 8, generator=g)
    for c in range(NUM_CLASSES):
        r, q = divmod(c, 2)
        images[labels == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 1.0
    optimizer = make_optimizer(model, lr=0.1, weight_decay=1e-4)
    scheduler = make_scheduler(optimizer, total_steps=30, warmup_steps=3)
    sampler = WidthSampler(RANGE, num_widths=4, seed=0)
    criterion = InplaceDistillationLoss()
    history = []
    for _ in range(30):
        history.append(sandwich_step(model, images, labels, optimizer, sampler, criterion))
        scheduler.step()
    first, last = history[0].losses[0], history[-1].losses[0]
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9


# -- width sampler ---------------------------------------------------------------------------
def test_width_sampler_sandwich_rule_and_range():
    sampler = WidthSampler(RANGE, num_widths=5, seed=0)
    for _ in range(50):
        widths = sampler.sample()
        assert len(widths) == 5
        assert widths[:2] == [1.0, 0.25]
        assert all(isinstance(w, float) and 0.25 <= w <= 1.0 for w in widths[2:])
    assert WidthSampler(RANGE, num_widths=2).sample() == [1.0, 0.25]


def test_width_sampler_reproducible_and_seeded():
    first = WidthSampler(RANGE, seed=7).sample()
    s1, s2 = WidthSampler(RANGE, seed=7), WidthSampler(RANGE, seed=7)
    s3 = WidthSampler(RANGE, seed=8)
    seq1 = [s1.sample() for _ in range(10)]
    assert seq1 == [s2.sample() for _ in range(10)]
    assert seq1 != [s3.sample() for _ in range(10)]
    assert first == seq1[0]
    assert len({w for ws in seq1 for w in ws[2:]}) == 20  # real draws, not a constant


def test_width_sampler_state_dict_resumes_exactly():
    sampler = WidthSampler(RANGE, num_widths=4, seed=5)
    for _ in range(3):
        sampler.sample()
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    continuation = [sampler.sample() for _ in range(5)]
    buffer.seek(0)
    resumed = WidthSampler(RANGE, num_widths=4, seed=123)
    resumed.load_state_dict(torch.load(buffer))
    assert [resumed.sample() for _ in range(5)] == continuation
    assert resumed.seed == 5
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})


def test_width_sampler_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    sampler = WidthSampler(RANGE, num_widths=6, seed=0)
    for _ in range(10):
        sampler.sample()
    sampler.load_state_dict(sampler.state_dict())
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("ends, fixed", [("max", [1.0]), ("min", [0.25]), ("none", [])])
def test_width_sampler_one_end_or_none_for_the_ablation(ends, fixed):
    sampler = WidthSampler(RANGE, num_widths=4, seed=0, ends=ends)
    draws = [sampler.sample() for _ in range(30)]
    for widths in draws:
        assert len(widths) == 4 and widths == sorted(widths, reverse=True)  # widest = the teacher
        assert all(w in widths for w in fixed)
    # the ends other than the fixed ones appear only by chance: never exactly, with floats
    missing = {1.0, 0.25} - set(fixed)
    assert not any(w in missing for ws in draws for w in ws)
    resumed = WidthSampler(RANGE, num_widths=4, seed=9)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.ends == ends and resumed.sample() == sampler.sample()
    with pytest.raises(ValueError, match="ends must be one of 'both', 'max', 'min', 'none'"):
        WidthSampler(RANGE, ends="middle")


def test_width_sampler_validation():
    with pytest.raises(ValueError, match=">= 2"):
        WidthSampler(RANGE, num_widths=1)
    with pytest.raises(TypeError):
        WidthSampler(RANGE, num_widths=2.5)
    with pytest.raises(ValueError, match="width_range"):
        WidthSampler((0.5, 1.5))


# -- losses ----------------------------------------------------------------------------------
def test_soft_cross_entropy_one_hot_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (16,), generator=g)
    one_hot = F.one_hot(labels, 10).double()
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(soft_cross_entropy(logits, one_hot).double(), expected)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_cross_entropy_is_kl_plus_entropy(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 10, generator=g)
    targets = F.softmax(2 * torch.randn(16, 10, generator=g), dim=1)
    log_q = F.log_softmax(logits / temperature, dim=1)
    kl = F.kl_div(log_q, targets, reduction="batchmean")
    entropy = -(targets * targets.log()).sum(1).mean()
    expected = temperature**2 * (kl + entropy)
    assert soft_cross_entropy(logits, targets, temperature).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(logits, targets[:, :5])


def test_inplace_distillation_loss_kinds_and_values():
    g = torch.Generator().manual_seed(2)
    logits, wide = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    labels = torch.randint(0, 5, (8,), generator=g)
    criterion = InplaceDistillationLoss(label_smoothing=0.2, temperature=2.0, label_weight=0.0)
    teacher = criterion.teacher_probs(wide.requires_grad_())
    assert not teacher.requires_grad
    assert torch.allclose(teacher, F.softmax(wide.detach() / 2.0, dim=1))
    assert criterion.loss_kind(None) == LABELS and criterion.loss_kind(teacher) == DISTILL
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2)
    assert torch.allclose(criterion(logits, labels), smoothed)
    distilled = soft_cross_entropy(logits, teacher, 2.0)
    assert torch.allclose(criterion.loss(logits, labels, teacher), distilled)
    off = InplaceDistillationLoss(enabled=False)
    assert off.loss_kind(teacher) == LABELS
    assert torch.allclose(off(logits, labels, teacher), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError):
        InplaceDistillationLoss(temperature=0.0)
    with pytest.raises(ValueError):
        InplaceDistillationLoss(label_smoothing=1.0)


# -- optimizer -------------------------------------------------------------------------------
def test_param_groups_decay_only_conv_and_linear_weights():
    model = tiny_model()
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    not_decayed = {id(p) for p in no_decay["params"]}
    all_params = list(model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(all_params)
    assert decayed | not_decayed == {id(p) for p in all_params} and not decayed & not_decayed
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert {id(module.weight), id(module.bias)} <= not_decayed, name
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if module.bias is not None:
                assert id(module.bias) in not_decayed, name
            depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            assert (id(module.weight) in not_decayed) == depthwise, name
    assert id(model[3].weight) in not_decayed  # the depthwise conv
    assert {id(model[0].weight), id(model[6].weight), id(model[11].weight)} == decayed


def test_param_groups_counts_shared_parameters_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["params"] == [shared.weight] and no_decay["params"] == [shared.bias]


def test_make_optimizer():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=0.2, weight_decay=4e-5)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [4e-5, 0.0]
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"] and group["lr"] == 0.2


def test_make_optimizer_adamw_over_the_same_groups():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.05, kind="adamw", betas=(0.8, 0.95))
    assert type(optimizer) is torch.optim.AdamW
    expected = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    for group, want in zip(optimizer.param_groups, expected):
        assert group["params"] == want["params"]
        assert group["betas"] == (0.8, 0.95) and group["lr"] == 1e-3
    with pytest.raises(
        usnet.UsnetError, match="unknown optimizer 'adam'; valid optimizers: sgd, adamw"
    ):
        make_optimizer(model, lr=1e-3, kind="adam")
    with pytest.raises(usnet.UsnetError, match="betas must be"):
        make_optimizer(model, lr=1e-3, kind="adamw", betas=(0.9, 1.5))


def test_param_groups_of_a_vision_transformer():
    """The ViT recipe: decay on the matrices (patch embedding, attention in/out projections, MLP,
    head); none on LayerNorm, biases, the class token and the position embedding."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2,
                                                 num_heads=4, hidden_dim=64, mlp_dim=128,
                                                 num_classes=10)  # fmt: skip
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert {
        "class_token",
        "encoder.pos_embedding",
        "encoder.ln.weight",
        "heads.head.bias",
    } <= not_decayed
    layer = "encoder.layers.encoder_layer_1."
    assert {layer + n for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight",
                                "self_attention.in_proj_bias")} <= not_decayed  # fmt: skip
    assert decayed == {"conv_proj.weight", "heads.head.weight"} | {
        f"encoder.layers.encoder_layer_{i}.{n}"
        for i in range(2)
        for n in ("self_attention.in_proj_weight", "self_attention.out_proj.weight",
                  "mlp.0.weight", "mlp.3.weight")
    }  # fmt: skip
    assert all(p.dim() >= 2 for p in decay["params"])  # matrices and conv kernels only

    # A subclass of a registered layer inherits its entry (the slimmable layers do).
    class Projection(nn.Linear):
        pass

    wrapped = nn.Sequential(Projection(4, 4), nn.LayerNorm(4))
    assert param_groups(wrapped, 0.1)[0]["params"] == [wrapped[0].weight]


# -- schedule --------------------------------------------------------------------------------
def scheduled_lrs(total, warmup, schedule, base=0.4):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = make_scheduler(optimizer, total, warmup, schedule)
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_warmup_peak_and_end(schedule):
    base, total, warmup = 0.4, 100, 10
    lrs = scheduled_lrs(total, warmup, schedule, base)
    assert lrs[0] == pytest.approx(base / warmup) and lrs[0] < 0.2 * base
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # warmup rises
    assert lrs[warmup] == pytest.approx(base) and max(lrs) == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # then decays
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert lrs[total - 1] < 0.05 * base


def test_schedule_shapes():
    total, warmup = 110, 10
    mid = warmup + (total - warmup) // 2
    assert lr_lambda(mid, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_lambda(mid, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_lambda(warmup + 25, total, warmup, "linear") == pytest.approx(0.75)
    assert lr_lambda(warmup + 25, total, warmup, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_lambda(0, 10) == 1.0 and lr_lambda(10, 10) == 0.0 and lr_lambda(50, 10) == 0.0
    # Warmup over the whole run: it peaks at the last step, then the run is over.
    assert lr_lambda(3, 5, warmup_steps=5) == pytest.approx(0.8)
    assert lr_lambda(4, 5, warmup_steps=5) == 1.0 and lr_lambda(5, 5, warmup_steps=5) == 0.0


def test_schedule_validation():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="linear, cosine"):
        make_scheduler(optimizer, 100, schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        make_scheduler(optimizer, 100, warmup_steps=101)
    with pytest.raises(ValueError, match="total_steps"):
        lr_lambda(0, 0)


def test_scheduler_state_dict_round_trip():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, 50, 5, "cosine")
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler2 = make_scheduler(optimizer2, 50, 5, "cosine")
    scheduler2.load_state_dict(state)
    optimizer.step(), scheduler.step()
    optimizer2.step(), scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_distillation_label_weight_mixes_the_two_losses():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    plain = InplaceDistillationLoss(label_weight=0.0)
    teacher = plain.teacher_probs(teacher_logits)
    distill = plain(logits, labels, teacher)
    labels_only = F.cross_entropy(logits, labels)
    assert torch.allclose(
        InplaceDistillationLoss(label_weight=1.0)(logits, labels, teacher), labels_only
    )
    mixed = InplaceDistillationLoss(label_weight=0.25)(logits, labels, teacher)
    assert torch.allclose(mixed, 0.75 * distill + 0.25 * labels_only)
    # the widest width (no teacher) is unaffected
    assert torch.allclose(InplaceDistillationLoss(label_weight=0.25)(logits, labels), labels_only)
    with pytest.raises(ValueError, match="label_weight must be in"):
        InplaceDistillationLoss(label_weight=1.5)


def test_python_api_and_run_config_share_one_distillation_default():
    from usnet.train.config import TrainConfig

    assert InplaceDistillationLoss().label_weight == TrainConfig().distill_label_weight == 0.5


def test_python_api_and_run_config_share_the_recipe_defaults():
    import inspect

    from usnet.train.config import TrainConfig

    config = TrainConfig()
    optimizer = make_optimizer(tiny_model(), lr=0.1)
    assert optimizer.param_groups[0]["weight_decay"] == config.weight_decay == 5e-5
    assert inspect.signature(make_scheduler).parameters["schedule"].default == config.lr_schedule


@pytest.mark.parametrize("ends", ["both", "max", "min", "none"])
def test_narrowest_loss_is_the_narrowest_widths_whatever_the_order(ends):
    """The trainer logs ``loss_narrowest`` from it: with ``sandwich_ends`` other than "both" the
    widths come sorted widest first, so the narrowest is not the second."""
    model = tiny_model()
    images, labels = batch()
    sampler = WidthSampler(RANGE, num_widths=4, seed=1, ends=ends)
    result = sandwich_step(model, images, labels, torch.optim.SGD(model.parameters(), lr=0.0),
                           sampler, InplaceDistillationLoss())  # fmt: skip
    narrowest = result.widths.index(min(result.widths))
    assert result.narrowest_loss == result.losses[narrowest]
    if ends != "both":
        assert narrowest == 3


# -- the public training API -------------------------------------------------------------------
def norm_free_model(seed: int = 0) -> nn.Module:
    """No BatchNorm: a batch's gradient is then the mean of its halves' (micro-batches)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NUM_CLASSES),
        )  # fmt: skip
    return usnet.slimmable(model, RANGE, input_size=(1, 1, 8, 8), divisor=4).train()


def test_sandwich_rule_step_is_the_hand_computed_sandwich_gradient():
    model = tiny_model()
    images, labels = batch()
    rule = usnet.SandwichRule(model, num_widths=4, seed=3, label_weight=0.0,
                              label_smoothing=0.1, temperature=2.0)  # fmt: skip
    widths = usnet.WidthSampler(RANGE, num_widths=4, seed=3).sample()
    expected = hand_gradients(tiny_model(), images, labels, widths, 0.1, 2.0)
    result = rule.step(images, labels, torch.optim.SGD(model.parameters(), lr=0.0))
    assert result.widths == widths and result.loss_kinds == [LABELS] + [DISTILL] * 3
    assert max_diff(grads(model), expected) <= 1e-6


def test_sandwich_rule_accumulation_equals_one_step_on_the_whole_batch():
    images, labels = batch(16, seed=1)
    whole, parts = norm_free_model(), norm_free_model()
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.5)
    opt_parts = torch.optim.SGD(parts.parameters(), lr=0.5)
    rule_whole = usnet.SandwichRule(whole, num_widths=3, seed=5)
    rule_parts = usnet.SandwichRule(parts, num_widths=3, seed=5, accumulation_steps=2)
    for _ in range(2):  # two optimizer steps: the widths are drawn once per optimizer step
        expected = rule_whole.step(images, labels, opt_whole)
        assert rule_parts.step(images[:8], labels[:8], opt_parts) is None  # no step yet
        got = rule_parts.step(images[8:], labels[8:], opt_parts)
        assert got.widths == expected.widths
        assert got.losses == pytest.approx(expected.losses, abs=1e-5)
    for a, b in zip(whole.parameters(), parts.parameters()):
        assert (a - b).abs().max() <= 1e-5
    # and the steps moved the weights (a test of "nothing happened" would pass too)
    assert (next(whole.parameters()) - next(norm_free_model().parameters())).abs().max() > 1e-3


def test_sandwich_rule_refuses_bad_arguments():
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1"):
        usnet.SandwichRule(tiny_model(), accumulation_steps=0)
    with pytest.raises(TypeError, match="not a slimmable model|not slimmable"):
        usnet.SandwichRule(nn.Linear(2, 2))
