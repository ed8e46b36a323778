"""Triton modal filter (Hyena-LI) against a float64 sum of exponentials, forward and gradients."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import leaf64, rel_err

from sh2.kernels import modal_filter, reference
from sh2.kernels.modal import modal_filter_triton


def _params(D: int, N: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # the model's initialisation: decay exp(p) * exp(gamma), gamma = log U(0.01, 0.1), p = -1
    rate = torch.exp(torch.tensor(-1.0)) * torch.empty(D, N).uniform_(0.01, 0.1, generator=gen)
    log_poles = (-rate).to(device).requires_grad_(True)
    residues = (0.1 * torch.randn(D, N, generator=gen) / N**0.5).to(device).requires_grad_(True)
    return log_poles, residues


def _brute64(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> torch.Tensor:
    t = torch.arange(length, dtype=torch.float64)
    return (residues[..., None] * torch.exp(log_poles[..., None] * t)).sum(1)


@pytest.mark.parametrize("D,N,L", [(5, 16, 1), (20, 16, 77), (3, 5, 40)])
def test_modal_filter_matches_sum_of_exponentials(D, N, L, device):
    lp, r = _params(D, N, device)
    h = modal_filter_triton(lp, r, L)
    assert h.shape == (D, L) and h.dtype == torch.float32
    lp64, r64 = leaf64(lp), leaf64(r)
    h64 = _brute64(lp64, r64, L)
    assert rel_err(h, h64) < 1e-5
    assert rel_err(h, reference.modal_filter_ref(lp, r, L)) < 1e-5
    dh = torch.randn_like(h)
    dlp, dr = torch.autograd.grad(h, (lp, r), dh)
    dlp64, dr64 = torch.autograd.grad(h64, (lp64, r64), leaf64(dh))
    assert rel_err(dlp, dlp64) < 1e-5
    assert rel_err(dr, dr64) < 1e-5


def test_modal_filter_public_dispatch_and_errors():
    with pytest.raises(ValueError, match="log_poles and residues"):
        modal_filter(torch.zeros(4, 16), torch.zeros(4, 8), 10)


@pytest.mark.gpu
def test_modal_filter_gpu_large_matches_reference():
    dev = torch.device("cuda")
    lp, r = _params(1024, 16, dev, seed=1)
    L = 32768 + 5
    h = modal_filter(lp, r, L, backend="triton")
    lp64, r64 = (x.detach().double().requires_grad_(True) for x in (lp, r))
    href = reference.modal_filter_ref(lp64, r64, L)
    assert rel_err(h, href) < 1e-5
    dh = torch.randn_like(h)
    for g, gr in zip(torch.autograd.grad(h, (lp, r), dh), torch.autograd.grad(href, (lp64, r64), dh.double())):
        assert rel_err(g, gr) < 1e-4
