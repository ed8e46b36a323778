"""The pure-PyTorch reference convolutions against a float64 brute-force Toeplitz product.

The brute force below is written from the definition (a lower-triangular banded Toeplitz matrix per
channel), independently of the reference code.
"""

import pytest
import torch

from sh2 import kernels
from sh2.kernels import reference


def toeplitz_conv(z: torch.Tensor, h_per_channel: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_s h[c, s] z[b, t-s, c] as an explicit [L, L] matrix product per channel (float64)."""
    B, L, D = z.shape
    K = h_per_channel.shape[1]
    out = torch.zeros(B, L, D, dtype=torch.float64)
    for c in range(D):
        T = torch.zeros(L, L, dtype=torch.float64)
        for i in range(L):
            for j in range(max(0, i - K + 1), i + 1):
                T[i, j] = h_per_channel[c, i - j]
        out[:, :, c] = z[:, :, c].double() @ T.t()
    return out


def brute_gated(q, k, v, h, bias):
    D = q.shape[-1]
    G = h.shape[0]
    hc = torch.stack([h[c // (D // G)] for c in range(D)]).double()
    z = k.double() * v.double()
    y = toeplitz_conv(z, hc)
    if bias is not None:
        y = y + bias.double() * z
    return q.double() * y


def rand_inputs(B, L, D, G, K, dtype, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    h = torch.randn(G, K, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(D, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    return q, k, v, h, bias


SHAPES = [(1, 1, 4, 2, 1), (2, 9, 8, 2, 3), (1, 17, 6, 3, 7), (2, 13, 4, 4, 13), (1, 20, 16, 1, 5)]


@pytest.mark.parametrize("B,L,D,G,K", SHAPES)
@pytest.mark.parametrize("op", ["fir", "fft"])
def test_gated_conv_matches_float64_toeplitz(B, L, D, G, K, op):
    if op == "fft" and K > L:
        pytest.skip("FFT path needs K <= L")
    q, k, v, h, bias = rand_inputs(B, L, D, G, K, torch.float64, seed=B * 100 + L)
    fn = kernels.gated_fir_conv if op == "fir" else kernels.gated_fft_conv
    out = fn(q, k, v, h, bias, backend="torch")
    torch.testing.assert_close(out, brute_gated(q, k, v, h, bias), rtol=1e-10, atol=1e-10)
    out_nb = fn(q, k, v, h, None, backend="torch")
    torch.testing.assert_close(out_nb, brute_gated(q, k, v, h, None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", ["fir", "fft"])
def test_gated_conv_bf16_within_bf16_tolerance(op):
    q, k, v, h, bias = rand_inputs(2, 33, 32, 4, 7, torch.bfloat16, seed=3)
    fn = kernels.gated_fir_conv if op == "fir" else kernels.gated_fft_conv
    out = fn(q, k, v, h, bias, backend="torch")
    assert out.dtype == torch.bfloat16
    ref = brute_gated(q, k, v, h, bias)
    # one bf16 rounding of the output: relative error ~ 2^-8 of the magnitude
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("op", ["fir", "fft"])
def test_gated_conv_gradcheck_float64(op):
    q, k, v, h, bias = rand_inputs(1, 6, 4, 2, 3, torch.float64, seed=7)
    fn = kernels.gated_fir_conv if op == "fir" else kernels.gated_fft_conv
    args = [t.requires_grad_() for t in (q, k, v, h, bias)]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, backend="torch"), args)


def test_grouped_filter_semantics():
    """Channel c uses filter c // (D // G): groups of contiguous channels."""
    q, k, v, h, _ = rand_inputs(1, 10, 6, 3, 4, torch.float64, seed=11)
    out = kernels.gated_fir_conv(q, k, v, h, None, backend="torch")
    for c in range(6):
        single = kernels.gated_fir_conv(q[..., c:c + 1], k[..., c:c + 1], v[..., c:c + 1], h[c // 2:c // 2 + 1],
                                        None, backend="torch")
        torch.testing.assert_close(out[..., c:c + 1], single)


def test_depthwise_conv_matches_toeplitz():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 11, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kernels.causal_depthwise_conv(x, w, backend="torch"), toeplitz_conv(x, w))


def test_modal_filter_closed_form():
    g = torch.Generator().manual_seed(2)
    lp = -torch.rand(5, 4, generator=g, dtype=torch.float64)
    r = torch.randn(5, 4, generator=g, dtype=torch.float64)
    h = reference.modal_filter_ref(lp, r, 9, chunk_channels=2)
    for c in range(5):
        for t in range(9):
            expected = sum(r[c, n] * torch.exp(lp[c, n] * t) for n in range(4))
            assert abs(h[c, t] - expected) < 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=torch.zeros(2, 3)), "q must have shape"),
    (dict(k=torch.zeros(1, 4, 6)), "same shape"),
    (dict(v=torch.zeros(1, 4, 8, dtype=torch.float64)), "same dtype"),
    (dict(h=torch.zeros(3, 2)), "groups G=3 must divide"),
    (dict(h=torch.zeros(2)), r"h must have shape \[G, K\]"),
    (dict(bias=torch.zeros(5)), r"bias must have shape \[D\]"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(q=torch.zeros(1, 4, 8), k=torch.zeros(1, 4, 8), v=torch.zeros(1, 4, 8), h=torch.zeros(2, 3),
                bias=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.gated_fir_conv(**args, backend="torch")


def test_fft_filter_longer_than_sequence_is_rejected():
    x = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="exceeds the sequence length"):
        kernels.gated_fft_conv(x, x, x, torch.zeros(8, 5), backend="torch")


def test_unknown_backend():
    x = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.gated_fir_conv(x, x, x, torch.zeros(2, 3), backend="cuda")
