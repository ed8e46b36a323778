"""Triton causal depthwise convolution (the featurizer) against a float64 conv1d and the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernels_testutil import leaf64, rel_err

from sh2.kernels import causal_depthwise_conv, reference
from sh2.kernels.short_conv import (
    _BWD_CANDIDATES,
    _CANDIDATES,
    causal_depthwise_conv_triton,
    short_conv_backward,
    short_conv_forward,
)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# as the ``device`` fixture: the GPU where there is one, else the CPU with the Triton interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def conv64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y[b, t, c] = sum_s w[c, s] x[b, t - s, c]`` in float64 by a left-padded grouped ``conv1d``.

    Independent of ``sh2.kernels.reference``: conv1d correlates, so the causal filter is flipped.
    """
    C, K = w.shape
    xt = F.pad(x.double().transpose(1, 2), (K - 1, 0))
    return F.conv1d(xt, w.double().flip(-1)[:, None, :], groups=C).transpose(1, 2)


def _tol(dtype: torch.dtype) -> float:
    # outputs are rounded once to the input dtype (fp32 accumulation of at most 5 products); the CPU
    # interpreter rounds fp32 -> bf16 by truncation, doubling the bf16 error
    return {F32: 2e-6, F16: 2e-3, BF16: 1e-2}[dtype]


def _check(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> None:
    """Forward and both gradients against float64 on the same (rounded) inputs, and the reference forward."""
    x, w = (t.detach().to(DEVICE).requires_grad_(True) for t in (x, w))
    y = causal_depthwise_conv_triton(x, w)
    assert y.dtype == x.dtype and y.shape == x.shape
    x64, w64 = leaf64(x), leaf64(w)
    y64 = conv64(x64, w64)
    assert rel_err(y, y64) < _tol(dtype)
    assert rel_err(y, reference.causal_depthwise_conv_ref(x, w)) < 2 * _tol(dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), leaf64(dy))
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert rel_err(dx, dx64) < _tol(dtype)
    # dw is reduced in fp32 from exact products of the rounded inputs: fp32-accurate, then rounded once
    # to w's dtype
    assert rel_err(dw, dw64) < (1e-5 if w.dtype == F32 else _tol(w.dtype))


@pytest.mark.parametrize(
    "B,L,C,K",
    [(2, 1, 20, K) for K in range(1, 6)]  # L = 1: every tap but the first reaches before the sequence
    + [(1, 70, 20, K) for K in range(1, 6)]  # L and C multiples of no tile or channel block
    + [(3, 17, 130, 3)],  # C > 128, batch 3
)
def test_short_conv_matches_float64_fp32(B, L, C, K):
    gen = torch.Generator().manual_seed(B * 1000 + L * 10 + K)
    _check(torch.randn(B, L, C, generator=gen), torch.randn(C, K, generator=gen), F32)


@pytest.mark.parametrize("K", [3, 9])
@pytest.mark.parametrize("cfg", range(len(_BWD_CANDIDATES)))
def test_short_conv_every_launch_config_matches_float64(cfg, K):
    """Each configuration the autotuner may pick (forward and backward), with L and C multiples of no tile, and
    K = 9: three groups of taps on the backward's third grid axis, the last one partly empty."""
    gen = torch.Generator().manual_seed(cfg + 10 * K)
    B, L, C = 2, 37, 70
    x, w = torch.randn(B, L, C, generator=gen), torch.randn(C, K, generator=gen)
    dy = torch.randn(B, L, C, generator=gen)
    x64, w64 = leaf64(x), leaf64(w)
    y64 = conv64(x64, w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    x, w, dy = x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE)
    y = short_conv_forward(x, w, _CANDIDATES[cfg % len(_CANDIDATES)])
    dx, dw = short_conv_backward(x, w, dy, _BWD_CANDIDATES[cfg])
    assert rel_err(y, y64) < 2e-6
    assert rel_err(dx, dx64) < 2e-6
    assert rel_err(dw, dw64) < 1e-5


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_short_conv_matches_float64_16bit(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 45, 36, generator=gen).to(dtype)
    _check(x, torch.randn(36, 3, generator=gen), dtype)
    # a 16-bit filter keeps its dtype for the gradient
    _check(x, torch.randn(36, 4, generator=gen).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_short_conv_strided_views_are_read_in_place(dtype):
    """Channel slices of a [B, L, 3C] projection, every other batch row and every other token."""
    B, L, C, K = 4, 23, 24, 3
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(B, 2 * L, 3 * C, generator=gen).to(DEVICE, dtype)
    w = torch.randn(C, K, generator=gen).to(DEVICE)
    for x in (u[:, :L, C:2 * C], u[::2, :L, :C], u[:, ::2, 2 * C:]):
        assert x.stride(-1) == 1
        _check(x, w, dtype)
    # a layout whose channel stride is not 1 is copied, with the same result
    xt = u[:, :L, :C].transpose(1, 2).contiguous().transpose(1, 2)
    assert xt.stride(-1) != 1
    assert rel_err(causal_depthwise_conv_triton(xt, w), conv64(xt, w)) < _tol(dtype)


def test_short_conv_public_function_dispatches_and_validates():
    gen = torch.Generator().manual_seed(9)
    x, w = torch.randn(1, 9, 6, generator=gen).to(DEVICE), torch.randn(6, 3, generator=gen).to(DEVICE)
    triton_y = causal_depthwise_conv(x, w, backend="triton")
    torch_y = causal_depthwise_conv(x, w, backend="torch")
    assert rel_err(triton_y, torch_y) < 2e-6
    # float64 always runs the reference, bit for bit
    assert torch.equal(causal_depthwise_conv(x.double(), w.double(), backend="triton"),
                       reference.causal_depthwise_conv_ref(x.double(), w.double()))
    with pytest.raises(ValueError, match=r"expected x \[B, L, C\] and w \[C, K\]"):
        causal_depthwise_conv(x, w[:5], backend="triton")
    with pytest.raises(ValueError, match="at least one tap"):
        causal_depthwise_conv(x, w[:, :0], backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_short_conv_gpu_realistic_sizes_match_reference(dtype):
    """The featurizer's shape: a channel slice of [B, L, 3D] at L = 8195, D = 1024, K = 3."""
    dev = torch.device("cuda")
    B, L, D, K = 2, 8192 + 3, 1024, 3
    gen = torch.Generator(device=dev).manual_seed(4)
    u = torch.randn(B, L, 3 * D, generator=gen, device=dev).to(dtype).requires_grad_(True)
    w = torch.randn(3 * D, K, generator=gen, device=dev).requires_grad_(True)
    y = causal_depthwise_conv(u, w, backend="triton")
    u64, w64 = (t.detach().double().requires_grad_(True) for t in (u, w))
    y64 = reference.causal_depthwise_conv_ref(u64, w64)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert rel_err(y, y64) < tol
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (u, w), dy)
    dx64, dw64 = torch.autograd.grad(y64, (u64, w64), dy.double())
    assert rel_err(dx, dx64) < tol
    assert rel_err(dw, dw64) < 1e-5
