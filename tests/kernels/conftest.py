"""Kernel tests: fixtures. ``TRITON_INTERPRET`` and the skipping of ``gpu`` tests without CUDA live in the
root ``tests/conftest.py`` (the variable must be set before any test module imports triton)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """The device the small kernel tests run on: CUDA if present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
