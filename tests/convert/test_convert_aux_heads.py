"""Auxiliary heads (GoogLeNet, Inception v3): run in training mode only, converted and
calibrated all the same."""

from __future__ import annotations

import torch
from torch import nn

import usnet


class WithAuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            return self.head(x), self.aux(x)
        return self.head(x)


def test_aux_heads_are_bound_calibrated_and_exported():
    model = usnet.slimmable(WithAuxHead().eval(), input_size=(1, 3, 8, 8))
    bound = {b.layer for b in usnet.state.get_state(model).bindings}
    assert {"aux.0", "aux.1", "aux.5"} <= bound
    images = torch.randn(8, 3, 8, 8)
    usnet.calibrate(model, [images[:4], images[4:]], [0.5], num_images=8)
    bn = model.aux[1]
    usnet.set_width(model, 0.5)
    assert bn.current_stats() is not None  # reached in training mode only
    plain = usnet.export(model, 0.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), usnet.width(model.eval(), 0.5):
        assert torch.allclose(plain(x), model(x), atol=1e-6)
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (2, 10)
