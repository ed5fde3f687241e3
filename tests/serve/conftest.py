"""Fixtures of the ``usnet serve`` tests: a tiny calibrated checkpoint with a spectrum."""

from __future__ import annotations

import pytest
import torch
from usnet_testing import liven, tiny_slimmable

import usnet

WIDTHS = [0.25, 0.5, 0.75, 1.0]
SPATIAL = 8


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs ray[serve] (pip install 'ray[serve]')")


def tiny_model():
    model = tiny_slimmable(spatial=SPATIAL, channels=32)
    liven(model)
    gen = torch.Generator().manual_seed(1)
    usnet.calibrate(model, [torch.randn(32, 3, SPATIAL, SPATIAL, generator=gen)], widths=WIDTHS,
                    num_images=32)  # fmt: skip
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(path, model, spectrum): four distinct widths (8, 16, 24, 32 channels), made-up top-1."""
    model = tiny_model()
    plan = usnet.channel_plan(model)
    spectrum = [{"width": w, "config_id": usnet.config_id(plan.config(w)), "top1": 0.6 + 0.1 * i}
                for i, w in enumerate(WIDTHS)]  # fmt: skip
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    usnet.save(model, path, extra={"spectrum": spectrum})
    return path, model, spectrum


def reference_logits(model, width, images):
    """Logits of the standalone plain export of ``width`` (the independent reference)."""
    with torch.no_grad():
        return usnet.export(model, width)(torch.as_tensor(images)).numpy()
