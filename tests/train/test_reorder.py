"""Channel reordering: the full width is the same function, prefixes hold the important channels."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from usnet_testing import liven, zoo_model

import usnet
from usnet.state import get_state
from usnet.train.reorder import IMPORTANCES, ReorderError, _sites, reorder_channels


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics: a permutation mistake shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(1)
    return model.eval()


def _data(shape, classes: int = 10, batches: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen))
            for _ in range(batches)]  # fmt: skip


def _check_full_width(model: nn.Module, shape, importance: str, classes: int = 10) -> dict:
    data = _data(shape, classes)
    x = data[0][0]
    with torch.no_grad():
        before = model(x)
    perms = reorder_channels(
        model, importance, data=data, num_images=shape[0] * 2, log=lambda s: None
    )
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() < 1e-5 * max(1.0, before.abs().max().item())
    moved = [g for g, p in perms.items() if not torch.equal(p, torch.arange(p.numel()))]
    assert moved, "nothing was reordered: the test would pass for a no-op"
    return perms


# reconstruction's greedy order costs size^2 * outputs per consumer: tens of seconds on the
# widest models, which the smaller ones' groups, residual ties and attention already cover
_SLOW = {("us_resnet50", "reconstruction"), ("us_vit_small", "reconstruction"), ("us_vit", "reconstruction")}  # fmt: skip


@pytest.mark.parametrize(
    "name,importance",
    [(n, i) for n in usnet.models.list_models() for i in IMPORTANCES if (n, i) not in _SLOW],
)
def test_zoo_full_width_unchanged(name, importance):
    torch.manual_seed(0)
    # random Linear weights too: a zero-initialized head (torchvision's ViT) has no gradient
    # to rank channels by with "taylor"
    model = _randomized(liven(zoo_model(name)))
    _check_full_width(model, (2, 1, 28, 28), importance)


def _torchvision(name: str) -> nn.Module:
    kwargs = {"weights": None, "num_classes": 10}
    if name == "googlenet":
        kwargs.update(init_weights=False, aux_logits=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "googlenet",
                                  "densenet121", "resnext50_32x4d", "convnext_tiny"])  # fmt: skip
def test_torchvision_full_width_unchanged(name):
    torch.manual_seed(0)
    model = usnet.slimmable(_torchvision(name), (0.25, 1.0), input_size=(1, 3, 32, 32))
    _randomized(model)
    for importance in ("l1", "activation"):
        _check_full_width(model, (2, 3, 32, 32), importance)


def _kill_channels(model: nn.Module, width: float, seed: int = 0) -> None:
    """Zero every tensor entry of a random choice of channels of each non-fixed group, leaving
    exactly the count active at ``width`` alive: the network at ``width`` could compute what
    the full one does, if its prefixes held the live channels."""
    state = get_state(model)
    gen = torch.Generator().manual_seed(seed)
    active = state.plan.channels(width)
    dead = {}
    for name, group in state.plan.groups.items():
        if not group.fixed:
            dead[name] = torch.randperm(group.size, generator=gen)[active[name] :]
    with torch.no_grad():
        for site in _sites(model, state):
            for t in site.tensors:
                tensor = site.layer._parameters.get(t.name)
                if tensor is None or t.grouped > 1:
                    continue
                for group, factor, offset in site.spans:
                    if group in dead:
                        rows = (dead[group].unsqueeze(1) * factor + torch.arange(factor)).reshape(
                            -1
                        )
                        tensor.index_fill_(t.dim, rows + offset, 0.0)


@pytest.mark.parametrize("name", ["us_convnet", "us_resnet18", "us_mobilenet_v2"])
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_prefix_holds_the_live_channels(name, importance):
    """Consistency across tied layers: after killing all but the width-0.5 count of channels of
    every group, the reordered model at 0.5 computes exactly its full width (train-mode BN:
    batch statistics), which needs every producer and consumer of every group (residual adds,
    flatten + linear, expansions) to agree on the new order. Before reordering it does not."""
    torch.manual_seed(0)
    model = liven(zoo_model(name))
    _kill_channels(model, 0.5)
    model.train()
    x, y = _data((8, 1, 28, 28))[0]

    def gap() -> float:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()  # the same function both times
        with torch.no_grad():
            full = model(x)
            with usnet.width(model, 0.5):
                half = model(x)
        return (full - half).abs().max().item()

    assert gap() > 1e-3
    reorder_channels(model, importance, data=[(x, y)], log=lambda s: None)
    assert gap() < 1e-4


def test_order_follows_the_scores_and_all_layers_of_a_residual_group():
    """l1 on us_resnet18: every group's channels sorted by its aggregated score; the layers of a
    residual group hold the same permutation (the stem conv, its BN and each block's last BN)."""
    torch.manual_seed(0)
    model = _randomized(zoo_model("us_resnet18"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perms = reorder_channels(model, "l1", log=lambda s: None)
    after = model.state_dict()
    bindings = get_state(model).bindings
    group = bindings[0].outputs[0]  # the stem's group: a residual group
    perm = perms[group]

    def permuted(b, key):
        value = before[key][perm] if b.outputs == (group, 1) else before[key]
        if key.endswith("weight") and value.dim() > 1:
            value = value[:, perms.get(b.inputs[0], torch.arange(value.shape[1]))]
        return value

    tied = [b for b in bindings if b.outputs == (group, 1)]
    consumers = [b for b in bindings if b.inputs == (group, 1)]
    assert len(tied) >= 5 and len(consumers) >= 3
    for b in tied + consumers:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            key = f"{b.layer}.{suffix}"
            if key in before and not (b in consumers and suffix != "weight"):
                if b in consumers:
                    expected = before[key][:, perm]
                    if b.outputs[0] in perms:
                        expected = expected[perms[b.outputs[0]]]
                else:
                    expected = permuted(b, key)
                assert torch.equal(after[key], expected), key
    tied = [b.layer for b in tied]
    consumers = [b.layer for b in consumers]

    # the scores the permutation sorted: stem conv rows + consumers' columns, normalized per layer
    def normalized(magnitude):
        return magnitude / magnitude.mean()

    score = sum(normalized(before[f"{name}.weight"].abs().flatten(1).sum(1))
                for name in tied if before[f"{name}.weight"].dim() == 4)  # fmt: skip
    score = score + sum(
        normalized(before[f"{name}.weight"].abs().transpose(0, 1).flatten(1).sum(1))
        for name in consumers
    )
    assert torch.all(score[perm][:-1] >= score[perm][1:] - 1e-4)


def test_drops_width_statistics_and_says_so():
    model = liven(zoo_model("us_convnet"))
    usnet.calibrate(model, [torch.randn(8, 1, 28, 28)], [0.25, 0.5], num_images=8)
    assert usnet.is_calibrated(model, 0.5)
    notes = []
    reorder_channels(model, "bn", log=notes.append)
    assert not usnet.is_calibrated(model, 0.5)
    assert "calibrate" in notes[0] and "dropped" in notes[0]
    with pytest.raises(usnet.UncalibratedWidthError):
        with usnet.width(model, 0.5):
            model.eval()(torch.randn(1, 1, 28, 28))


def test_bad_arguments():
    model = zoo_model("us_convnet")
    with pytest.raises(usnet.UsnetError, match="valid: l1, bn, taylor, activation, reconstruction"):
        reorder_channels(model, "random")
    with pytest.raises(usnet.UsnetError, match="needs data"):
        reorder_channels(model, "taylor")
    with pytest.raises(usnet.UsnetError, match="labelled"):
        reorder_channels(model, "taylor", data=[torch.randn(2, 1, 28, 28)])
    with pytest.raises(usnet.UsnetError, match="not a slimmable model"):
        reorder_channels(nn.Linear(2, 2))


def test_switchable_bn_refused():
    model = zoo_model("us_convnet")
    usnet.state.enable_switchable_bn(model, [0.5, 1.0])
    with pytest.raises(ReorderError, match="switchable BN"):
        reorder_channels(model)


class _Blocks(nn.Module):
    """GroupNorm, a depthwise conv with a channel multiplier, a grouped conv, PReLU, a
    flattened 2x2 map into a linear layer: the layers whose channels move in blocks or follow
    another group's order."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # multiplier 2
        self.bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 16, 1, groups=2)
        self.act = nn.PReLU(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = self.gn(self.stem(x))
        x = self.act(self.grouped(self.bn(self.dw(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_blocks_and_multipliers_keep_the_full_width(importance):
    torch.manual_seed(0)
    model = _randomized(usnet.slimmable(_Blocks(), (0.25, 1.0), input_size=(1, 3, 8, 8), divisor=4))
    with torch.no_grad():
        model.act.weight.uniform_(0.0, 0.5)  # per-channel slopes: a misplaced one shows
        model.gn.weight.uniform_(0.5, 1.5)
    perms = _check_full_width(model, (4, 3, 8, 8), importance)
    stem = get_state(model).bindings[0].outputs[0]
    assert torch.equal(perms[stem] // 4, torch.arange(16) // 4)  # GroupNorm groups of 4 kept
    dw = next(b for b in get_state(model).bindings if b.layer == "dw").outputs[0]
    assert torch.equal(perms[dw], (perms[stem].unsqueeze(1) * 2 + torch.arange(2)).reshape(-1))
