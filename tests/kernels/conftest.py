"""Kernel tests: run the Triton kernels under the CPU interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, so it is set here, at
collection time, before any test module imports :mod:`sh2.kernels.fir` and friends (the rest of the
package imports them lazily, on the first Triton call, so collecting other test directories first is
harmless). Tests marked ``gpu`` (realistic sizes) are skipped when CUDA is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu``-marked tests of this directory when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and _HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device the small kernel tests run on: CUDA if present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
