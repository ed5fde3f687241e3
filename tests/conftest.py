"""Shared configuration of the usnet test suite (helpers live in usnet_testing.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

# Reproducible property tests by default (same examples on every run, no example database
# written to the checkout); HYPOTHESIS_PROFILE=random explores new examples on each run.
settings.register_profile("usnet", derandomize=True, database=None)
settings.register_profile("random", database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "usnet"))

# Make the helper module importable whatever pytest's import mode / package layout.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The suite runs many small ops: intra-op threads only add synchronization, and on a busy
# 2-core machine spinning OpenMP workers slow it down by 10-50x. Override with USNET_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("USNET_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield
