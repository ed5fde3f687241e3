"""The ``reconstruction`` order: each prefix of a group best preserves its consumers' outputs.

Checked against brute force on real forward passes: the consumer's output with all but the
prefix's input channels zeroed, correlated with its full output, greedily one channel at a time.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import usnet
from usnet.state import get_state
from usnet.train.reorder import _greedy_prefix_order, _InputCovariance, _patches, reorder_channels


def _brute_force_greedy(consumer_outputs, size: int) -> list[int]:
    """``consumer_outputs(kept)`` -> list of (prefix outputs, full outputs) per consumer, each
    ``(samples, out)``; greedy on the mean over consumers of the mean over outputs of corr^2."""
    chosen: list[int] = []
    for _ in range(size):
        best = None
        for c in range(size):
            if c in chosen:
                continue
            score = 0.0
            pairs = consumer_outputs(chosen + [c])
            for prefix, full in pairs:
                prefix, full = prefix - prefix.mean(0), full - full.mean(0)
                corr2 = (prefix * full).sum(0) ** 2 / (
                    (prefix**2).sum(0) * (full**2).sum(0)
                ).clamp_min(1e-300)
                score += corr2.mean().item()
            if best is None or score > best[0] + 1e-12:
                best = (score, c)
        chosen.append(best[1])
    return chosen


def test_greedy_order_equals_brute_force_on_a_covariance():
    gen = torch.Generator().manual_seed(0)
    size, p, out, n = 7, 4, 5, 3000
    mix = torch.randn(p, p, generator=gen, dtype=torch.float64)
    x = torch.randn(n, size, p, generator=gen, dtype=torch.float64) @ mix
    x = x + 0.7 * x[:, [2]]  # correlated channels: the joint order differs from a per-channel one
    w = torch.randn(out, size, p, generator=gen, dtype=torch.float64)
    xc = x.reshape(n, -1) - x.reshape(n, -1).mean(0)
    cov = (xc.T @ xc / n).reshape(size, p, size, p)
    full = xc @ w.reshape(out, -1).T

    def outputs(kept):
        mask = torch.zeros(size, 1, dtype=torch.float64)
        mask[kept] = 1
        return [(xc @ (w * mask).reshape(out, -1).T, full)]

    assert _greedy_prefix_order([(w, cov)], size).tolist() == _brute_force_greedy(outputs, size)


@pytest.mark.parametrize("padding,stride", [(1, 1), (0, 2), ("same", 1), ("valid", 1)])
def test_patch_covariance_is_the_covariance_of_the_unfolded_input(padding, stride):
    conv = nn.Conv2d(3, 4, 3, padding=padding, stride=stride)
    x = torch.randn(5, 3, 9, 9)
    stat = _InputCovariance(conv)
    stat.ROWS = 40  # several chunks per batch
    stat(conv, (x[:2],))
    stat(conv, (x[2:],))
    rows = _patches(x, conv).double()
    # the patches are what the conv multiplies by its weight
    out = (rows.float() @ conv.weight.reshape(4, -1).T + conv.bias).reshape(5, -1, 4)
    assert torch.allclose(out.transpose(1, 2).reshape(conv(x).shape), conv(x), atol=1e-5)
    centered = rows - rows.mean(0)
    expected = centered.T @ centered / rows.shape[0]
    assert stat.count == rows.shape[0]
    assert torch.allclose(stat.covariance(), expected, atol=1e-6)


class _TwoConsumers(nn.Module):
    """One group (``stem``'s 8 channels) read by a 3x3 conv and, flattened, by a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        return self.head(self.conv(h).mean((2, 3))) + self.fc(torch.flatten(self.pool(h), 1))


def test_model_order_equals_brute_force_on_the_consumers_outputs():
    """End to end: the order ``reorder_channels`` gives the stem's group is the greedy order of
    the conv's and the linear layer's outputs with the other input channels zeroed."""
    torch.manual_seed(0)
    model = usnet.slimmable(_TwoConsumers(), (0.25, 1.0), input_size=(1, 2, 6, 6), divisor=1)
    x = torch.randn(64, 2, 6, 6)
    group = get_state(model).bindings[0].outputs[0]
    model.train()  # BN on batch statistics, as reorder_channels runs it
    with torch.no_grad():
        h = torch.relu(model.bn(model.stem(x)))
        pooled = torch.flatten(model.pool(h), 1)
        full_conv = model.conv(h).permute(0, 2, 3, 1).reshape(-1, 6).double()
        full_fc = model.fc(pooled).double()

    def outputs(kept):
        mask = torch.zeros(8)
        mask[kept] = 1
        with torch.no_grad():
            conv = nn.functional.conv2d(h * mask[:, None, None], model.conv.weight, None, 1, 1)
            fc = nn.functional.linear(pooled * mask.repeat_interleave(4), model.fc.weight)
        return [(conv.permute(0, 2, 3, 1).reshape(-1, 6).double(), full_conv),
                (fc.double(), full_fc)]  # fmt: skip

    expected = _brute_force_greedy(outputs, 8)
    perms = reorder_channels(model, "reconstruction", data=[x], log=lambda s: None)
    assert perms[group].tolist() == expected
    assert expected != list(range(8))  # the test would pass for a no-op


def test_groups_without_a_dense_consumer_fall_back_to_bn():
    """The last block's group feeds only a depthwise conv and its BN: ordered by BN scale."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.bn2 = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn2(self.dw(torch.relu(self.bn(self.stem(x))))).mean((2, 3))

    torch.manual_seed(0)
    model = usnet.slimmable(
        Net(), (0.25, 1.0), input_size=(1, 1, 6, 6), divisor=1, slim_outputs=True
    )
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4]))
        model.bn2.weight.copy_(model.bn.weight)
    perms = reorder_channels(
        model, "reconstruction", data=[torch.randn(4, 1, 6, 6)], log=lambda s: None
    )
    (perm,) = perms.values()
    assert perm.tolist() == [1, 6, 3, 4, 7, 2, 5, 0]


def test_reconstruction_needs_data():
    from usnet_testing import zoo_model

    with pytest.raises(usnet.UsnetError, match="needs data"):
        reorder_channels(zoo_model("us_convnet"), "reconstruction")
    with pytest.raises(usnet.UsnetError, match="no batches"):
        reorder_channels(zoo_model("us_convnet"), "reconstruction", data=[])


def test_consumers_over_the_input_limit_are_left_out(monkeypatch):
    """With every consumer over the limit the group falls back to BN scale (no covariance of
    their inputs is kept)."""
    import usnet.train.reorder as reorder

    torch.manual_seed(0)
    model = usnet.slimmable(_TwoConsumers(), (0.25, 1.0), input_size=(1, 2, 6, 6), divisor=1)
    scale = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4])
    with torch.no_grad():
        model.bn.weight.copy_(scale)
    monkeypatch.setattr(reorder, "MAX_INPUTS", 8)  # the fc reads 32 inputs, the conv 72
    kept = []
    monkeypatch.setattr(
        reorder, "_InputCovariance", lambda layer: kept.append(layer) or _InputCovariance(layer)
    )
    perms = reorder_channels(
        model, "reconstruction", data=[torch.randn(4, 2, 6, 6)], log=lambda s: None
    )
    assert kept == [model.head]  # the stem reads the fixed input group, the head 6 inputs
    group = get_state(model).bindings[0].outputs[0]
    assert perms[group].tolist() == torch.argsort(-scale).tolist()
