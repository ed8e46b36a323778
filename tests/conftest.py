"""Test-suite setup shared by every directory.

Without a GPU the Triton kernels run under the CPU interpreter. ``TRITON_INTERPRET=1`` must be set
before ``triton.jit`` decorates any kernel, i.e. before any test module (of any directory) imports a
kernel module, so it is set here, in the root conftest, which pytest loads first. Tests marked ``gpu``
are skipped when CUDA is absent.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu``-marked tests when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
