"""The alternative FIR designs of bench/fir_designs.py compute the same function as the float64 reference."""

from __future__ import annotations

import pytest
import torch

from bench.fir_designs import DESIGNS, check_designs


@pytest.mark.parametrize("design", DESIGNS[1:])
def test_design_matches_float64_reference(design: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    errs = check_designs(device, (design,))
    assert set(errs) == ({f"{design} K=64"} if design.startswith("three") else {f"{design} K=64", f"{design} K=7"})
    assert max(errs.values()) < 1e-5, errs
