"""Every kernel reads and writes only inside its tensors, at every awkward length, in every configuration.

The CPU interpreter does not fault on an out-of-bounds address, so these tests place every input between
NaN guard bands and route every buffer the launchers allocate (outputs, per-program partials) through
:class:`GuardBands` (see ``kernels_testutil``): a stray read turns the result into NaN, a stray write
overwrites a guard, a missing write leaves NaN in an output. Each result is also compared with the
float64 reference. Lengths cover each side of every chunk size (16, 32, 64, 128) and the 12-token calls
of the overlapped context-parallel boundary corrections (2(K-1) tokens, K = 7).
"""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import GuardBands, rel_err

from sh2.kernels import fft, fir, modal, override_settings, reference, short_conv, use_backend
from sh2.kernels import gated_fir_conv as gated_fir_conv_public

F32, BF16 = torch.float32, torch.bfloat16
# Lengths on each side of the 32-, 64- and 128-token chunks and tiles, L = 1, and the 12-token corrections.
# The interpreter runs each launch slowly (about 0.3 s here), so every configuration is not tried at every
# length: the exhaustive length sweep runs the default configurations (test_fir_bf16_every_length_...).
BOUNDARY_L = (1, 2, 12, 31, 33, 63, 65, 127, 129, 140)
# name: (D, G, K, lengths). SE: dg = 16, K = 7 (blocked; the direct kernel is a forward autotuning
# candidate); MR: K = 128 (blocked, bf16); dg = 1: the direct kernels, whose addressing depends on K only
# through K > L (covered at L = 1, 2 with K = 5).
FIR_SHAPES = {
    "se": (32, 2, 7, (1, 12, 33, 65, 129)),
    "mr": (16, 1, 128, BOUNDARY_L),
    "depthwise": (6, 6, 5, (1, 2, 12, 33, 65, 129)),
}


def _tol(dtype: torch.dtype) -> float:
    # as in test_fir: exact fp32 dots; bf16 operands and outputs rounded (truncated on the interpreter)
    return 2e-5 if dtype == F32 else 3e-2


def _fir_inputs(B, L, D, G, K, dtype, bias, seed, device):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(B, L, D, generator=gen).to(device, dtype) for _ in range(4))
    h = (torch.randn(G, K, generator=gen) / K**0.5).to(device)
    b = torch.randn(D, generator=gen).to(device) if bias else None
    return q, k, v, h, b, dy


def _fir_oracle(q, k, v, h, b, dy):
    """float64 reference output and gradients (q, k, v, h, bias) of the rounded inputs."""
    args = [x.double().requires_grad_(True) if x is not None else None for x in (q, k, v, h, b)]
    y = reference.gated_fir_conv_ref(*args)
    grads = torch.autograd.grad(y, [x for x in args if x is not None], dy.double())
    return y, grads


def _fir_configs(q, h, backward):
    """(blocked, config) of every candidate the dispatcher or the autotuner may run for this shape."""
    G, K = h.shape
    fp32 = q.dtype == F32
    direct = [(False, c) for c in fir._DIRECT_CANDIDATES]
    if not fir.use_blocked(q, h):
        return direct
    blocked = [(True, c) for c in fir._blocked_candidates(K, fp32, backward)]
    return blocked + (direct if not backward and K <= 16 else [])


def _check_fir_all_configs(L, shape, dtype, bias, monkeypatch, device):
    D, G, K, _ = FIR_SHAPES[shape]
    guards = GuardBands().patch(monkeypatch)
    q, k, v, h, b, dy = _fir_inputs(2, L, D, G, K, dtype, bias, L, device)
    y64, grads64 = _fir_oracle(q, k, v, h, b, dy)
    gq, gk, gv, gh, gdy = (guards.place(x) for x in (q, k, v, h, dy))
    gb = guards.place(b) if bias else None
    tol = _tol(dtype)
    for blocked, cfg in _fir_configs(q, h, backward=False):
        y = fir.fir_forward(gq, gk, gv, gh, gb, blocked=blocked, config=cfg)
        assert rel_err(y, y64) < tol, (L, cfg)
    for i, (blocked, cfg) in enumerate(_fir_configs(q, h, backward=True)):
        dh_cfg = None if blocked else fir._DIRECT_DH_CANDIDATES[i]
        grads = fir.fir_backward(gq, gk, gv, gh, gb, gdy, blocked=blocked, config=cfg, dh_config=dh_cfg)
        assert (grads.dbias is None) == (not bias)
        for name, g, g64 in zip("qkvhb", [x for x in grads if x is not None], grads64):
            assert rel_err(g, g64) < tol, (L, cfg, name, rel_err(g, g64))
    guards.check()


@pytest.mark.parametrize(
    "shape,dtype", [("se", BF16), ("se", F32), ("mr", BF16), ("depthwise", BF16)], ids=["se-bf16", "se-fp32",
                                                                                          "mr-bf16", "depthwise"])
def test_fir_every_candidate_stays_in_bounds_at_boundary_lengths(shape, dtype, monkeypatch, device):
    """Every forward and backward configuration the dispatcher or the autotuner may run, alternately
    with and without Dskip (both at the 12-token length). fp32 has its own blocked candidates (b <= 64)."""
    lengths = FIR_SHAPES[shape][3] if dtype == BF16 else (1, 12, 65)
    for i, L in enumerate(lengths):
        for bias in ((True, False) if L == 12 else (i % 2 == 0,)):
            _check_fir_all_configs(L, shape, dtype, bias, monkeypatch, device)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["se", "mr"])
def test_fir_bf16_every_length_1_to_140_matches_reference(shape, monkeypatch, device):
    """The public function with the Triton backend forced, forward and backward, every L in 1..140 in
    bf16 (the dtype of the fault once seen on the GPU), with Dskip at odd lengths; one channel group of 16.
    The default configurations (no autotuning); the test above runs every candidate."""
    D, G, K = 16, 1, FIR_SHAPES[shape][2]
    for L in range(1, 141):
        guards = GuardBands().patch(monkeypatch)
        q, k, v, h, b, dy = _fir_inputs(1, L, D, G, K, BF16, L % 2 == 1, 1000 + L, device)
        y64, grads64 = _fir_oracle(q, k, v, h, b, dy)
        args = [guards.place(x).requires_grad_(True) if x is not None else None for x in (q, k, v, h, b)]
        with use_backend("triton"), override_settings(autotune=False):
            y = gated_fir_conv_public(*args)
            grads = torch.autograd.grad(y, [x for x in args if x is not None], guards.place(dy))
        assert rel_err(y, y64) < _tol(BF16), L
        for name, g, g64 in zip("qkvhb", grads, grads64):
            assert rel_err(g, g64) < _tol(BF16), (L, name, rel_err(g, g64))
        guards.check()


def test_fft_stays_in_bounds(monkeypatch, device):
    """Slices of 4 channels (not a multiple of the 64-channel block), lengths around the 64-token tile,
    with and without Dskip and a kept filter spectrum."""
    D, G = 8, 2
    for L, dtype in ((1, F32), (2, BF16), (63, F32), (65, BF16)):
        for bias, keep in ((True, True), (False, False)):
            guards = GuardBands().patch(monkeypatch)
            q, k, v, _, b, dy = _fir_inputs(2, L, D, G, 1, dtype, bias, L, device)
            h = (torch.randn(G, L, generator=torch.Generator().manual_seed(L)) / L**0.5).to(device)
            y64, grads64 = _fir_oracle(q, k, v, h, b, dy)
            g = [guards.place(x) if x is not None else None for x in (q, k, v, h, b, dy)]
            with override_settings(fft_slice_mb=6 * 2 * 2 * L * 4 * 4 / 2**20):
                y, saved, spectrum = fft.fft_forward(*g[:5], save=True, keep_spectrum=keep)
                grads = fft.fft_backward(*g[:5], saved, spectrum, g[5])
            tol = 1e-5 if dtype == F32 else 3e-2
            assert rel_err(y, y64) < tol
            for name, gr, g64 in zip("qkvhb", [x for x in grads if x is not None], grads64):
                assert rel_err(gr, g64) < tol, (L, name)
            guards.check()


def test_short_conv_every_candidate_stays_in_bounds(monkeypatch, device):
    C = 20  # not a multiple of any channel block
    for L, K in ((1, 3), (15, 5), (16, 1), (17, 3), (70, 5)):
        guards = GuardBands().patch(monkeypatch)
        gen = torch.Generator().manual_seed(L * 10 + K)
        x, dy = (torch.randn(2, L, C, generator=gen).to(device, BF16) for _ in range(2))
        w = torch.randn(C, K, generator=gen).to(device)
        x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
        y64 = reference.causal_depthwise_conv_ref(x64, w64)
        dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
        gx, gw, gdy = (guards.place(t) for t in (x, w, dy))
        for cfg in short_conv._CANDIDATES:
            assert rel_err(short_conv.short_conv_forward(gx, gw, cfg), y64) < 1e-2, (L, K, cfg)
            dx, dw = short_conv.short_conv_backward(gx, gw, gdy, cfg)
            assert rel_err(dx, dx64) < 1e-2 and rel_err(dw, dw64) < 1e-5, (L, K, cfg)
        guards.check()


def test_modal_filter_stays_in_bounds(monkeypatch, device):
    D, N = 5, 3  # neither a multiple of the 16-channel block nor a power of two
    for L in (1, 31, 32, 33, 77):
        guards = GuardBands().patch(monkeypatch)
        gen = torch.Generator().manual_seed(L)
        lp, r = -0.1 * torch.rand(D, N, generator=gen).to(device), torch.randn(D, N, generator=gen).to(device)
        dh = torch.randn(D, L, generator=gen).to(device)
        lp64, r64 = lp.double().requires_grad_(True), r.double().requires_grad_(True)
        h64 = reference.modal_filter_ref(lp64, r64, L)
        grads64 = torch.autograd.grad(h64, (lp64, r64), dh.double())
        glp, gr, gdh = (guards.place(t) for t in (lp, r, dh))
        assert rel_err(modal.modal_forward(glp, gr, L), h64) < 1e-5
        for g, g64 in zip(modal.modal_backward(glp, gr, gdh), grads64):
            assert rel_err(g, g64) < 1e-5
        guards.check()


def _unless_out_of_resources(launcher, *args, **kwargs):
    """``launcher(*args, **kwargs)`` then a synchronisation; None where the configuration does not fit the
    GPU (the autotuner skips those too)."""
    from triton.runtime.errors import OutOfResources

    try:
        out = launcher(*args, **kwargs)
    except OutOfResources:
        return None
    torch.cuda.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("K", [7, 128])
def test_fir_gpu_bf16_short_lengths_every_candidate(K):
    """The shapes of the bf16 fault once seen on the GPU: D = 4096, G = 256, L = 1..140, batch 2.

    Every forward and backward candidate runs at every length with a synchronisation after each launch,
    so a fault names its configuration; then the autotuned public function (timing every candidate
    with repeated launches, as when the fault appeared) runs at the lengths around one chunk.
    """
    dev = torch.device("cuda")
    D, G = 4096, 256
    for L in range(1, 141):
        q, k, v, h, b, dy = _fir_inputs(2, L, D, G, K, BF16, True, L, dev)
        y64, grads64 = _fir_oracle(q, k, v, h, b, dy)
        for blocked, cfg in _fir_configs(q, h, backward=False):
            y = _unless_out_of_resources(fir.fir_forward, q, k, v, h, b, blocked=blocked, config=cfg)
            assert y is None or rel_err(y, y64) < 1e-2, (L, cfg)
        for blocked, cfg in _fir_configs(q, h, backward=True):
            for bias in (b, None):
                grads = _unless_out_of_resources(fir.fir_backward, q, k, v, h, bias, dy, blocked=blocked, config=cfg)
                if grads is not None and bias is not None:
                    for name, g, g64 in zip("qkvhb", grads, grads64):
                        assert rel_err(g, g64) < 1e-2, (L, cfg, name)
    with override_settings(autotune=True):
        for L in (1, 2, 12, 15, 16, 17, 63, 64, 65, 127, 128, 129):
            q, k, v, h, b, dy = _fir_inputs(2, L, D, G, K, BF16, True, L, dev)
            y64, grads64 = _fir_oracle(q, k, v, h, b, dy)
            args = [x.requires_grad_(True) for x in (q, k, v, h, b)]
            y = fir.gated_fir_conv_triton(*args)
            grads = torch.autograd.grad(y, args, dy)
            torch.cuda.synchronize()
            assert rel_err(y, y64) < 1e-2, L
            for name, g, g64 in zip("qkvhb", grads, grads64):
                assert rel_err(g, g64) < 1e-2, (L, name)
