"""Triton-fused FFT long convolution (Hyena-LI) against a float64 Toeplitz product and the reference."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import leaf64, rel_err, toeplitz_gated_conv64

from sh2.kernels import gated_fft_conv, override_settings, reference
from sh2.kernels.fft import gated_fft_conv_triton

F32, BF16 = torch.float32, torch.bfloat16


def _tol(dtype: torch.dtype, device: torch.device) -> float:
    # fp32 FFT: rounding grows like log(L) * 2^-24; bf16: the inputs/outputs are rounded (interpreter
    # rounds fp32 -> bf16 by truncation, so the CPU bound is looser)
    if dtype == F32:
        return 1e-5
    return 1e-2 if device.type == "cuda" else 3e-2


def _inputs(B, L, D, G, K, dtype, device, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, D, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    decay = torch.exp(-torch.rand(G, 1, generator=gen) * torch.arange(K) / 4)
    h = (torch.randn(G, K, generator=gen) * decay).to(device).requires_grad_(True)
    b = torch.randn(D, generator=gen).to(device).requires_grad_(True) if bias else None
    return q, k, v, h, b


def _check(q, k, v, h, b, tol):
    y = gated_fft_conv_triton(q, k, v, h, b)
    assert y.dtype == q.dtype
    inputs = [x for x in (q, k, v, h, b) if x is not None]
    args64 = [leaf64(x) if x is not None else None for x in (q, k, v, h, b)]
    y64 = toeplitz_gated_conv64(*args64)
    assert rel_err(y, y64) < tol
    assert rel_err(y, reference.gated_fft_conv_ref(q, k, v, h, b)) < 2 * tol
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    grads64 = torch.autograd.grad(y64, [x for x in args64 if x is not None], leaf64(dy))
    for name, x, g, g64 in zip("qkvhb", inputs, grads, grads64):
        assert g.dtype == x.dtype
        assert rel_err(g, g64) < tol, (name, rel_err(g, g64))


@pytest.mark.parametrize(
    "B,L,D,G,K,dtype",
    [
        (2, 37, 8, 8, 37, F32),  # LI: G = D, K = L, batch 2
        (1, 1, 4, 4, 1, F32),  # L = 1
        (1, 50, 32, 2, 20, F32),  # grouped filters (dg 16), K < L
        (1, 33, 6, 6, 33, BF16),  # bf16
    ],
)
def test_fft_conv_matches_toeplitz_forward_and_gradients(B, L, D, G, K, dtype, device):
    _check(*_inputs(B, L, D, G, K, dtype, device), _tol(dtype, device))


def test_fft_conv_channel_slices_and_recomputed_spectrum(device):
    """Tiny slice budget (one group per slice) and no saved filter spectra: same result."""
    with override_settings(fft_slice_mb=0.0001, fft_save_spectrum_mb=0):
        _check(*_inputs(2, 21, 12, 3, 9, F32, device, seed=1), 1e-5)


def test_fft_conv_strided_views_without_bias(device):
    B, L, D = 1, 26, 8
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(B, L, 3 * D, generator=gen).to(device).requires_grad_(True)
    h = (0.3 * torch.randn(D, L, generator=gen)).to(device).requires_grad_(True)
    y = gated_fft_conv_triton(u[..., :D], u[..., D:2 * D], u[..., 2 * D:], h, None)
    u64, h64 = leaf64(u), leaf64(h)
    y64 = toeplitz_gated_conv64(u64[..., :D], u64[..., D:2 * D], u64[..., 2 * D:], h64, None)
    assert rel_err(y, y64) < 1e-5
    dy = torch.randn_like(y)
    for g, g64 in zip(torch.autograd.grad(y, (u, h), dy), torch.autograd.grad(y64, (u64, h64), leaf64(dy))):
        assert rel_err(g, g64) < 1e-5


def test_fft_conv_bad_inputs():
    q = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="exceeds the sequence length"):
        gated_fft_conv(q, q, q, torch.randn(4, 9), backend="triton")
    with pytest.raises(ValueError, match="bias"):
        gated_fft_conv(q, q, q, torch.randn(4, 8), torch.randn(3), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_fft_conv_gpu_realistic_sizes_match_reference(dtype):
    dev = torch.device("cuda")
    B, L, D = 1, 8192 + 3, 512
    gen = torch.Generator(device=dev).manual_seed(3)
    u = torch.randn(B, L, 3 * D, generator=gen, device=dev).to(dtype).requires_grad_(True)
    decay = torch.exp(-torch.rand(D, 1, generator=gen, device=dev) * torch.arange(L, device=dev) / 100)
    h = (0.1 * torch.randn(D, L, generator=gen, device=dev) * decay).requires_grad_(True)
    b = torch.randn(D, generator=gen, device=dev).requires_grad_(True)
    y = gated_fft_conv(u[..., :D], u[..., D:2 * D], u[..., 2 * D:], h, b, backend="triton")
    uf, hf, bf = (x.detach().double().requires_grad_(True) for x in (u, h, b))
    yr = reference.gated_fft_conv_ref(uf[..., :D], uf[..., D:2 * D], uf[..., 2 * D:], hf, bf)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert rel_err(y, yr) < tol
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, (u, h, b), dy), torch.autograd.grad(yr, (uf, hf, bf), dy.double())):
        assert rel_err(g, gr) < tol
