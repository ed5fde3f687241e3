"""Shared configuration of the usnet test suite (helpers live in usnet_testing.py, importable
through pytest's ``pythonpath``)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Reproducible property tests by default (same examples on every run, no example database
# written to the checkout); HYPOTHESIS_PROFILE=random explores new examples on each run.
settings.register_profile("usnet", derandomize=True, database=None)
settings.register_profile("random", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "usnet"))

# The suite runs many small ops: intra-op threads only add synchronization, and on a busy
# 2-core machine spinning OpenMP workers slow it down by 10-50x. Override with USNET_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("USNET_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield
