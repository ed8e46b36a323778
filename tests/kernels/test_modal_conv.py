"""Hyena-LI as its modal recurrence (``gated_modal_conv``) against independent float64 formulas.

Oracles: the explicit filter ``h[t] = sum_n R_n lambda_n^t`` in a float64 Toeplitz product (the definition of
the long convolution), plus the closed-form contribution of an initial state; the FFT path; and, for
``chunk=1``, the reference is literally the token-by-token recurrence. Gradients of every input (q, k, v, log
poles, residues, Dskip, initial state) are compared, with a loss that also reads the final state.
"""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import leaf64, rel_err, toeplitz_gated_conv64

from sh2.kernels import gated_fft_conv, gated_modal_conv, modal_filter, reference
from sh2.kernels.modal_conv import gated_modal_conv_triton, plan_chunks

F32, BF16 = torch.float32, torch.bfloat16


def _tol(dtype: torch.dtype) -> float:
    # fp32 states and sums: rounding ~ N * 2^-24 per step, far below 1e-5 at these lengths. bf16: inputs and
    # outputs rounded to 8 bits (the interpreter truncates rather than rounds, hence the looser CPU bound).
    return 1e-5 if dtype == F32 else 3e-2


def _inputs(B, L, D, N, dtype, device, seed=0, bias=True, state=True, slow=False):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3 * D, generator=gen).to(device, dtype)
    q, k, v = (t.requires_grad_(True) for t in qkv.detach().split(D, dim=-1))  # strided views, like the model
    scale = 0.02 if slow else 1.0  # slow: decays near 1 (lambda = exp(-~0.01)), long memory
    log_poles = (-torch.exp(torch.randn(D, N, generator=gen)) * scale).to(device).requires_grad_(True)
    residues = (torch.randn(D, N, generator=gen) / N**0.5).to(device).requires_grad_(True)
    b = torch.randn(D, generator=gen).to(device).requires_grad_(True) if bias else None
    s0 = torch.randn(B, D, N, generator=gen).to(device).requires_grad_(True) if state else None
    return q, k, v, log_poles, residues, b, s0


def modal_conv64(q, k, v, log_poles, residues, bias, s0):
    """``(y, final_state)`` in float64 from the explicit filter, written independently of sh2.kernels."""
    B, L, D = q.shape
    t = torch.arange(L, dtype=torch.float64)
    decay = torch.exp(log_poles[..., None] * t)  # [D, N, L]: lambda^t
    h = torch.einsum("dn,dnt->dt", residues, decay)
    y = toeplitz_gated_conv64(torch.ones_like(q), k, v, h, None)  # conv(z, h) with z = k v
    z = k * v
    final = torch.einsum("dnt,btd->bdn", decay.flip(-1), z)  # sum_t lambda^(L-1-t) z_t
    if s0 is not None:
        lam = torch.exp(log_poles)
        y = y + torch.einsum("bdn,dnt->btd", s0 * residues, decay * lam[..., None])  # R lambda^(t+1) s0
        final = final + s0 * lam**L
    if bias is not None:
        y = y + bias * z
    return q * y, final


def _check(args, tol, fn=gated_modal_conv_triton):
    inputs = [x for x in args if x is not None]
    y, final = fn(*args)
    assert y.dtype == args[0].dtype and final.dtype == torch.float32
    args64 = [leaf64(x) if x is not None else None for x in args]
    y64, final64 = modal_conv64(*args64)
    assert rel_err(y, y64) < tol
    assert rel_err(final, final64) < 1e-5
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(y)
    dfinal = torch.randn(final.shape, generator=gen).to(final)
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), inputs)
    grads64 = torch.autograd.grad((y64 * leaf64(dy)).sum() + (final64 * leaf64(dfinal)).sum(),
                                  [x for x in args64 if x is not None])
    names = [n for n, x in zip(("q", "k", "v", "log_poles", "residues", "bias", "initial_state"), args)
             if x is not None]
    for name, x, g, g64 in zip(names, inputs, grads, grads64):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert rel_err(g, g64) < tol, (name, rel_err(g, g64))


@pytest.mark.parametrize(
    "B,L,D,N,dtype,bias,state",
    [
        (2, 37, 24, 16, F32, True, True),  # L not a multiple of the chunk, D not a multiple of the block
        (1, 1, 8, 16, F32, True, True),  # one token
        (1, 64, 16, 3, F32, False, False),  # few poles, no Dskip, zero initial state, whole chunks
        (2, 20, 8, 16, BF16, True, True),  # bf16 inputs and outputs, fp32 states
    ],
)
def test_modal_conv_matches_float64_filter(B, L, D, N, dtype, bias, state, device):
    _check(_inputs(B, L, D, N, dtype, device, bias=bias, state=state), _tol(dtype))


def test_modal_conv_slow_decays_matches_float64(device):
    _check(_inputs(1, 45, 8, 16, F32, device, seed=3, slow=True), 1e-5)


def test_reference_is_the_recurrence_and_matches_float64(device):
    """The pure-PyTorch reference, token by token (chunk=1) and vectorised (chunk=16), forward and backward."""
    for chunk in (1, 16):
        def ref(*a, chunk=chunk):
            return reference.gated_modal_conv_ref(*a, return_state=True, chunk=chunk)

        _check(_inputs(2, 29, 8, 16, F32, device, seed=2), 1e-5, fn=ref)


def test_modal_conv_equals_fft_path(device):
    """The recurrence and the FFT convolution with the materialised modal filter are the same operator."""
    q, k, v, lp, r, b, _ = _inputs(2, 50, 16, 16, F32, device, seed=4, state=False)
    y = gated_modal_conv(q, k, v, lp, r, b)
    y_fft = gated_fft_conv(q, k, v, modal_filter(lp, r, q.shape[1]), b)
    assert rel_err(y, y_fft) < 1e-5
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (q, k, v, lp, r, b), dy)
    g_fft = torch.autograd.grad(y_fft, (q, k, v, lp, r, b), dy)
    for a, c in zip(g, g_fft):
        assert rel_err(a, c) < 1e-5


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    B, L, D, N = 1, 7, 2, 3
    q, k, v = (torch.randn(B, L, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lp = (-torch.rand(D, N, generator=gen, dtype=torch.float64) - 0.1).requires_grad_(True)
    r = torch.randn(D, N, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, generator=gen, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(B, D, N, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(*a):
        y, s = reference.gated_modal_conv_ref(*a, return_state=True, chunk=3)
        return y, s

    assert torch.autograd.gradcheck(f, (q, k, v, lp, r, b, s0))


def test_chunked_state_passing_equals_one_call(device):
    """Running two halves with the first half's final state as the second's initial state is the whole call."""
    q, k, v, lp, r, b, s0 = _inputs(1, 40, 8, 16, F32, device, seed=6)
    y, fin = gated_modal_conv(q, k, v, lp, r, b, s0, return_state=True, backend="triton")
    y1, mid = gated_modal_conv(q[:, :17], k[:, :17], v[:, :17], lp, r, b, s0, return_state=True, backend="triton")
    y2, fin2 = gated_modal_conv(q[:, 17:], k[:, 17:], v[:, 17:], lp, r, b, mid, return_state=True,
                                backend="triton")
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-6
    assert rel_err(fin2, fin) < 1e-6


def test_decays_near_zero_and_one_constant_input(device):
    """z = 1 gives s_t = (1 - lambda^(t+1)) / (1 - lambda): the closed form, for lambda -> 0 and lambda -> 1."""
    L, D = 3000, 2
    log_poles = torch.tensor([[-30.0, -1e-6], [-1e-3, -5.0]], device=device)  # lambda ~ 1e-13, 1 - 1e-6, ...
    residues = torch.ones(D, 2, device=device)
    ones = torch.ones(1, L, D, device=device)
    for backend in ("torch", "triton"):
        y = gated_modal_conv(ones, ones, ones, log_poles, residues, backend=backend)
        t = torch.arange(L, dtype=torch.float64, device=device)
        # (1 - lambda^(t+1)) / (1 - lambda) written without cancellation: -expm1((t+1) log) / -expm1(log)
        s = torch.expm1((t[:, None, None] + 1) * log_poles.double()) / torch.expm1(log_poles.double())
        expected = (s * residues.double()).sum(-1)[None]
        assert rel_err(y, expected) < 2e-5, backend


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 8, 4)
    lp, r = -torch.rand(4, 16) - 0.1, torch.randn(4, 16)
    with pytest.raises(ValueError, match="log_poles must be finite and <= 0"):
        gated_modal_conv(q, q, q, lp.abs(), r)
    with pytest.raises(ValueError, match="log_poles must be finite"):
        gated_modal_conv(q, q, q, torch.full_like(lp, float("nan")), r)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gated_modal_conv(q, q, q, lp, r, initial_state=torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="initial_state must be a floating-point"):
        gated_modal_conv(q, q, q, lp, r, initial_state=torch.zeros(1, 4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"log_poles and residues must both have shape \[D, N\]"):
        gated_modal_conv(q, q, q, lp[:3], r[:3])
    with pytest.raises(ValueError, match="bias must have shape"):
        gated_modal_conv(q, q, q, lp, r, bias=torch.ones(3))


def test_plan_chunks_cover_the_sequence():
    for L in (1, 7, 8, 9, 1000, 1 << 20):
        plan = plan_chunks(1, L, 4096, torch.device("cpu"))
        assert plan.chunk % 8 == 0 and plan.n_chunks * plan.chunk >= L > (plan.n_chunks - 1) * plan.chunk


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 127, 8192, 65537])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_modal_conv_gpu_realistic_sizes(L, dtype):
    """At the 7B width on the GPU: Triton against the float64 filter (short L) or the fp32 FFT path (long L)."""
    dev = torch.device("cuda")
    args = _inputs(1, L, 4096 if L <= 8192 else 1024, 16, dtype, dev, seed=7)
    tol = 1e-5 if dtype == F32 else 1e-2
    if L <= 127:
        _check(args, tol)
        return
    q, k, v, lp, r, b, s0 = args
    y, fin = gated_modal_conv(q, k, v, lp, r, b, return_state=True)
    with torch.no_grad():
        y_fft = reference.gated_fft_conv_ref(q.float(), k.float(), v.float(), modal_filter(lp, r, L), b)
    assert rel_err(y, y_fft) < (2e-5 if dtype == F32 else 1e-2)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v, lp, r, b), dy)
    ref_grads = torch.autograd.grad(gated_fft_conv(q, k, v, modal_filter(lp, r, L), b), (q, k, v, lp, r, b), dy)
    for name, a, c in zip("qkvlrb", grads, ref_grads):
        assert rel_err(a, c) < (1e-4 if dtype == F32 else 2e-2), (name, rel_err(a, c))


@pytest.mark.gpu
def test_modal_conv_gpu_one_million_tokens_slow_decay():
    """1M tokens, decays within 1e-6 of 1: the fp32 recurrence against the float64 closed form for z = 1."""
    dev = torch.device("cuda")
    L, D = 1 << 20, 256
    log_poles = -torch.logspace(-6, 1, 16, device=dev).repeat(D, 1)
    residues = torch.full((D, 16), 1e-3, device=dev)
    ones = torch.ones(1, L, D, device=dev, dtype=BF16)
    y = gated_modal_conv(ones, ones, ones, log_poles, residues)
    t = torch.arange(L, device=dev, dtype=torch.float64)[::4099]
    lp = log_poles[0].double()
    s = torch.expm1((t[:, None] + 1) * lp) / torch.expm1(lp)
    expected = (s * 1e-3).sum(-1)
    assert rel_err(y[0, ::4099, 0].float(), expected) < 1e-2  # bf16 output rounding
