"""Triton gated FIR convolution (Hyena-SE / MR) against a float64 Toeplitz product and the reference."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import leaf64, rel_err, toeplitz_gated_conv64

from sh2.kernels import gated_fir_conv, reference
from sh2.kernels.fir import BlockedConfig, fir_backward, fir_forward, gated_fir_conv_triton, use_blocked

F32, BF16 = torch.float32, torch.bfloat16


def _tol(dtype: torch.dtype, device: torch.device) -> float:
    # fp32: exact fp32 dots. bf16: operands of the tensor-core products are rounded to bf16 (~2^-9),
    # outputs too; the CPU interpreter rounds fp32 -> bf16 by truncation, which doubles the error.
    if dtype == F32:
        return 2e-5
    return 1e-2 if device.type == "cuda" else 3e-2


def _inputs(B, L, D, G, K, dtype, device, seed=0, h_dtype=F32, bias=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, D, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(3))
    h = (torch.randn(G, K, generator=gen) / K**0.5).to(device, h_dtype).requires_grad_(True)
    b = torch.randn(D, generator=gen).to(device, F32).requires_grad_(True) if bias else None
    return q, k, v, h, b


def _check_against_oracles(fn, q, k, v, h, b, tol):
    """Forward and all gradients of ``fn`` vs the float64 brute force (and the reference forward)."""
    y = fn(q, k, v, h, b)
    assert y.dtype == q.dtype and y.shape == q.shape
    args64 = [leaf64(x) if x is not None else None for x in (q, k, v, h, b)]
    y64 = toeplitz_gated_conv64(*args64)
    assert rel_err(y, y64) < tol
    assert rel_err(y, reference.gated_fir_conv_ref(q, k, v, h, b)) < 2 * tol
    dy = torch.randn_like(y)
    inputs = [x for x in (q, k, v, h, b) if x is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    grads64 = torch.autograd.grad(y64, [x for x in args64 if x is not None], leaf64(dy))
    for name, x, g, g64 in zip("qkvhb", inputs, grads, grads64):
        assert g.dtype == x.dtype, name
        assert rel_err(g, g64) < tol, (name, rel_err(g, g64))


# B, L, D, G, K, dtype, expected path
CASES = [
    (2, 37, 32, 2, 7, F32, True),  # dg 16, L not a multiple of the chunk, batch 2
    (1, 1, 16, 1, 2, F32, True),  # L = 1, K = 2
    (1, 45, 64, 2, 3, BF16, True),  # dg 32, K = 3, bf16
    (1, 70, 32, 2, 64, F32, True),  # K = 64
    (1, 131, 16, 1, 128, BF16, True),  # K = 128, two chunks, the last one masked, separate dh kernel
    (1, 67, 16, 1, 128, F32, False),  # fp32 with K > 64: the direct kernel (fp32 blocks would not fit)
    (1, 40, 32, 2, 128, BF16, True),  # K = 128 > L
    (2, 33, 8, 8, 5, F32, False),  # dg = 1 (depthwise): direct kernel
    (1, 29, 6, 2, 7, BF16, False),  # odd dg = 3: direct kernel
    (1, 20, 16, 1, 130, F32, False),  # K > 128: direct kernel
]


@pytest.mark.parametrize("B,L,D,G,K,dtype,blocked", CASES)
def test_fir_matches_toeplitz_forward_and_gradients(B, L, D, G, K, dtype, blocked, device):
    q, k, v, h, b = _inputs(B, L, D, G, K, dtype, device)
    assert use_blocked(q, h) == blocked
    _check_against_oracles(gated_fir_conv_triton, q, k, v, h, b, _tol(dtype, device))


def test_fir_direct_kernel_on_grouped_shape_without_bias(device):
    """The direct kernel also serves dg = 16 shapes (the dispatcher may pick it for short K)."""
    q, k, v, h, _ = _inputs(1, 23, 32, 2, 7, F32, device, seed=1, bias=False)
    y = fir_forward(q.detach(), k.detach(), v.detach(), h.detach(), None, blocked=False)
    y_blk = fir_forward(q.detach(), k.detach(), v.detach(), h.detach(), None, blocked=True)
    y64 = toeplitz_gated_conv64(leaf64(q), leaf64(k), leaf64(v), leaf64(h), None)
    assert rel_err(y, y64) < 2e-5 and rel_err(y_blk, y64) < 2e-5
    dy = torch.randn_like(y)
    for blocked in (False, True):
        dq, dk, dv, dh, db = fir_backward(q.detach(), k.detach(), v.detach(), h.detach(), None, dy, blocked=blocked)
        assert db is None
        q64, k64, v64, h64 = (leaf64(x) for x in (q, k, v, h))
        grads64 = torch.autograd.grad(toeplitz_gated_conv64(q64, k64, v64, h64, None), (q64, k64, v64, h64),
                                      leaf64(dy))
        for g, g64 in zip((dq, dk, dv, dh), grads64):
            assert rel_err(g, g64) < 2e-5


@pytest.mark.parametrize(
    "cfg",
    [
        BlockedConfig(32, 16, 4, 4, 3, fuse_dh=False),
        BlockedConfig(32, 16, 4, 4, 3, fuse_dh=True),
        BlockedConfig(32, 32, 2, 4, 3, fuse_dh=False),
        BlockedConfig(32, 16, 4, 4, 3, fuse_dh=True, channel_fast=False),
        BlockedConfig(16, 16, 8, 4, 3, fuse_dh=False, channel_fast=False),
    ],
    ids=str,
)
def test_fir_blocked_autotune_candidates_agree(cfg, device):
    """Every variant the autotuner may pick (fused dh, channel tiles, either grid order) is exact in fp32."""
    q, k, v, h, b = (x.detach() for x in _inputs(2, 75, 64, 2, 9, F32, device, seed=5))
    y = fir_forward(q, k, v, h, b, blocked=True, config=cfg)
    args64 = [leaf64(x) for x in (q, k, v, h, b)]
    y64 = toeplitz_gated_conv64(*args64)
    assert rel_err(y, y64) < 2e-5
    dy = torch.randn_like(y)
    grads = fir_backward(q, k, v, h, b, dy, blocked=True, config=cfg)
    for g, g64 in zip(grads, torch.autograd.grad(y64, args64, leaf64(dy))):
        assert rel_err(g, g64) < 2e-5


def test_fir_no_bias_and_bf16_filter_keeps_filter_dtype(device):
    q, k, v, h, _ = _inputs(1, 40, 16, 1, 7, BF16, device, seed=2, h_dtype=BF16, bias=False)
    _check_against_oracles(gated_fir_conv_triton, q, k, v, h, None, _tol(BF16, device))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fir_strided_views_of_projection(dtype, device):
    """q, k, v as channel slices of one [B, L, 3D] tensor are used in place and get correct gradients."""
    B, L, D, G, K = 2, 19, 32, 2, 7
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(B, L, 3 * D, generator=gen).to(device, dtype).requires_grad_(True)
    h = torch.randn(G, K, generator=gen).to(device).requires_grad_(True)
    b = torch.randn(D, generator=gen).to(device).requires_grad_(True)
    q, k, v = u[..., :D], u[..., D:2 * D], u[..., 2 * D:]
    assert q.stride() == (L * 3 * D, 3 * D, 1)
    y = gated_fir_conv_triton(q, k, v, h, b)
    u64, h64, b64 = leaf64(u), leaf64(h), leaf64(b)
    y64 = toeplitz_gated_conv64(u64[..., :D], u64[..., D:2 * D], u64[..., 2 * D:], h64, b64)
    tol = _tol(dtype, device)
    assert rel_err(y, y64) < tol
    dy = torch.randn_like(y)
    for g, g64 in zip(torch.autograd.grad(y, (u, h, b), dy), torch.autograd.grad(y64, (u64, h64, b64), leaf64(dy))):
        assert rel_err(g, g64) < tol
    # a layout whose channel stride is not 1 is copied, with the same result
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert qt.stride(-1) != 1
    assert rel_err(gated_fir_conv_triton(qt, kt, v, h, b), y) < 1e-6


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q, h, b: dict(q=q[0], k=q, v=q, h=h, bias=b), "q must have shape"),
        (lambda q, h, b: dict(q=q, k=q[:, :-1], v=q, h=h, bias=b), "same shape"),
        (lambda q, h, b: dict(q=q, k=q.double(), v=q, h=h, bias=b), "same dtype"),
        (lambda q, h, b: dict(q=q, k=q, v=q, h=h[:, None], bias=b), "h must have shape"),
        (lambda q, h, b: dict(q=q, k=q, v=q, h=torch.randn(3, 7), bias=b), "groups G=3"),
        (lambda q, h, b: dict(q=q, k=q, v=q, h=h, bias=b[:-1]), "bias must have shape"),
    ],
)
def test_fir_bad_inputs_raise_value_error_naming_argument(make, match):
    q = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match=match):
        gated_fir_conv(**make(q, torch.randn(2, 7), torch.randn(16)), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("K", [7, 128])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_fir_gpu_realistic_sizes_match_reference(K, dtype):
    """L = 4113 (not a chunk multiple), D = 1024, dg = 16, q/k/v strided views, vs the fp32 reference."""
    dev = torch.device("cuda")
    B, L, D, G = 1, 4113, 1024, 64
    gen = torch.Generator(device=dev).manual_seed(4)
    u = torch.randn(B, L, 3 * D, generator=gen, device=dev).to(dtype).requires_grad_(True)
    h = (torch.randn(G, K, generator=gen, device=dev) / K**0.5).requires_grad_(True)
    b = torch.randn(D, generator=gen, device=dev).requires_grad_(True)
    q, k, v = u[..., :D], u[..., D:2 * D], u[..., 2 * D:]
    y = gated_fir_conv(q, k, v, h, b, backend="triton")
    uf, hf, bf = (x.detach().double().requires_grad_(True) for x in (u, h, b))
    yr = reference.gated_fir_conv_ref(uf[..., :D], uf[..., D:2 * D], uf[..., 2 * D:], hf, bf)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert rel_err(y, yr) < tol
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, (u, h, b), dy), torch.autograd.grad(yr, (uf, hf, bf), dy.double())):
        assert rel_err(g, gr) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("G,K", [(512, 7), (256, 3), (64, 130)])
def test_fir_gpu_direct_path_matches_reference(G, K):
    dev = torch.device("cuda")
    B, L, D = 2, 1000, 512
    q, k, v = (torch.randn(B, L, D, device=dev, requires_grad=True) for _ in range(3))
    h = torch.randn(G, K, device=dev, requires_grad=True)
    b = torch.randn(D, device=dev, requires_grad=True)
    y = gated_fir_conv(q, k, v, h, b, backend="triton")
    args = [x.detach().double().requires_grad_(True) for x in (q, k, v, h, b)]
    yr = reference.gated_fir_conv_ref(*args)
    assert rel_err(y, yr) < 1e-5
    dy = torch.randn_like(y)
    for g, gr in zip(torch.autograd.grad(y, (q, k, v, h, b), dy), torch.autograd.grad(yr, args, dy.double())):
        assert rel_err(g, gr) < 1e-5


def test_blocked_grid_order_respects_the_cuda_axis_limit():
    """Channel blocks go on grid axis 0 unless the rows (batch x segments) would exceed axis 1's 65,535."""
    cfg = BlockedConfig(64, 16, 1024, 4)
    assert cfg.channel_fast and cfg.grid(10, 256) == (256, 10)
    assert not cfg.channels_first(70_000) and cfg.grid(70_000, 4) == (70_000, 4)
    assert BlockedConfig(64, 16, 1024, 4, channel_fast=False).grid(10, 256) == (10, 256)
