"""Shared configuration of the usnet test suite (helpers live in usnet_testing.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Make the helper module importable whatever pytest's import mode / package layout.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield
