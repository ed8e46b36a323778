"""Gated causal long convolution (Hyena-LI) by fp32 cuFFT with the pointwise work fused in Triton.

``y = q * (irfft(rfft(z, 2L) * rfft(h, 2L))[:L] + bias * z)``, ``z = k * v``, computed in channel
slices so that the fp32 working set stays bounded (``SH2_FFT_SLICE_MB``, default 6144 MiB, counts six
``[B, C, 2L]`` fp32 buffers). Per slice:

forward
  1. ``_pack_kernel``: ``z = k * v`` read from ``[B, L, D]`` (any token stride) and written transposed
     into a zero-tailed ``[B, C, 2L]`` fp32 buffer (the zero tail is written once per call);
  2. cuFFT ``rfft(z)``, ``rfft(h)``, one in-place complex product, cuFFT ``irfft``;
  3. ``_unpack_fwd_kernel``: ``y = q * (conv + bias z)`` cast to the output dtype; when gradients are
     needed it also stores ``conv + bias z`` in q's dtype for ``dq`` (cheaper than another FFT).
backward (``g = dy * q``)
  1. ``_pack_kernel`` (both pairs): ``g`` and ``z`` into zero-tailed buffers, plus ``dq = dy * saved``
     and per-program Dskip partials ``sum g z``;
  2. ``rfft(g)``, ``rfft(z)``; ``rfft(h)`` is reused from the forward when all spectra fit in
     ``SH2_FFT_SAVE_SPECTRUM_MB`` (default 1024), else recomputed;
  3. ``_spectra_bwd_kernel``: ``P = sum_b G conj(Z)`` (filter gradient) and ``G <- G conj(H)`` in one
     pass, in place;
  4. ``irfft(G)`` gives the correlation ``dz``, ``irfft(P)[:K]`` gives ``dh``;
  5. ``_unpack_bwd_kernel``: ``dk = (dz + bias g) v``, ``dv = (dz + bias g) k``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sh2.kernels import reference
from sh2.kernels._tuning import channel_stride_one, sum_partials

_BT, _BC, _BF = 64, 64, 256


@triton.jit
def _pack_kernel(a_ptr, b_ptr, buf_ptr, c_ptr, d_ptr, dq_ptr, db_part_ptr,
                 a2_ptr, b2_ptr, buf2_ptr,
                 L, D, c0, C, n_t, sab, sal, sbb, sbl, scb, scl, sdb, sdl, sa2b, sa2l, sb2b, sb2l, s_buf_b,
                 TWO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``buf[b, c, t] = a * b`` (and ``buf2 = a2 * b2``, ``dq = c * d``, ``db_part += sum a*b*a2*b2``)."""
    pid = tl.program_id(0)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    cl = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch = c0 + cl
    m = (t < L)[:, None] & (cl < C)[None, :]
    tt = t.to(tl.int64)[:, None]
    x = tl.load(a_ptr + b * sab + tt * sal + ch[None, :], mask=m, other=0.0).to(tl.float32)
    x *= tl.load(b_ptr + b * sbb + tt * sbl + ch[None, :], mask=m, other=0.0).to(tl.float32)
    buf_off = b * s_buf_b + cl.to(tl.int64)[None, :] * (2 * L) + tt
    tl.store(buf_ptr + buf_off, x, mask=m)
    if TWO:
        x2 = tl.load(a2_ptr + b * sa2b + tt * sa2l + ch[None, :], mask=m, other=0.0).to(tl.float32)
        x2 *= tl.load(b2_ptr + b * sb2b + tt * sb2l + ch[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(buf2_ptr + buf_off, x2, mask=m)
        tl.store(db_part_ptr + pid.to(tl.int64) * D + ch, tl.sum(x * x2, axis=0), mask=cl < C)
        cc = tl.load(c_ptr + b * scb + tt * scl + ch[None, :], mask=m, other=0.0).to(tl.float32)
        dd = tl.load(d_ptr + b * sdb + tt * sdl + ch[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(dq_ptr + b * L * D + tt * D + ch[None, :], (cc * dd).to(dq_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpack_fwd_kernel(y_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, save_ptr,
                       L, D, c0, C, n_t, sqb, sql, skb, skl, svb, svl, s_buf_b,
                       HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = q * (conv + bias * k * v)`` from the irfft buffer ``[B, C, 2L]`` (first L taps)."""
    pid = tl.program_id(0)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    cl = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch = c0 + cl
    m = (t < L)[:, None] & (cl < C)[None, :]
    tt = t.to(tl.int64)[:, None]
    y = tl.load(y_ptr + b * s_buf_b + cl.to(tl.int64)[None, :] * (2 * L) + tt, mask=m, other=0.0)
    if HAS_BIAS:
        z = tl.load(k_ptr + b * skb + tt * skl + ch[None, :], mask=m, other=0.0).to(tl.float32)
        z *= tl.load(v_ptr + b * svb + tt * svl + ch[None, :], mask=m, other=0.0).to(tl.float32)
        y += tl.load(bias_ptr + ch, mask=cl < C, other=0.0).to(tl.float32)[None, :] * z
    q = tl.load(q_ptr + b * sqb + tt * sql + ch[None, :], mask=m, other=0.0).to(tl.float32)
    o = b * L * D + tt * D + ch[None, :]
    tl.store(out_ptr + o, (q * y).to(out_ptr.dtype.element_ty), mask=m)
    if SAVE:
        tl.store(save_ptr + o, y.to(save_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpack_bwd_kernel(dz_ptr, q_ptr, k_ptr, v_ptr, dy_ptr, bias_ptr, dk_ptr, dv_ptr,
                       L, D, c0, C, n_t, sqb, sql, skb, skl, svb, svl, sdb, sdl, s_buf_b,
                       HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dk = (dz + bias g) v``, ``dv = (dz + bias g) k`` with ``g = dy * q``."""
    pid = tl.program_id(0)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    cl = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch = c0 + cl
    m = (t < L)[:, None] & (cl < C)[None, :]
    tt = t.to(tl.int64)[:, None]
    dz = tl.load(dz_ptr + b * s_buf_b + cl.to(tl.int64)[None, :] * (2 * L) + tt, mask=m, other=0.0)
    if HAS_BIAS:
        g = tl.load(dy_ptr + b * sdb + tt * sdl + ch[None, :], mask=m, other=0.0).to(tl.float32)
        g *= tl.load(q_ptr + b * sqb + tt * sql + ch[None, :], mask=m, other=0.0).to(tl.float32)
        dz += tl.load(bias_ptr + ch, mask=cl < C, other=0.0).to(tl.float32)[None, :] * g
    k = tl.load(k_ptr + b * skb + tt * skl + ch[None, :], mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * svb + tt * svl + ch[None, :], mask=m, other=0.0).to(tl.float32)
    o = b * L * D + tt * D + ch[None, :]
    tl.store(dk_ptr + o, (dz * v).to(dk_ptr.dtype.element_ty), mask=m)
    tl.store(dv_ptr + o, (dz * k).to(dv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _spectra_bwd_kernel(g_ptr, z_ptr, h_ptr, p_ptr, B, F, DG, s_g_b, s_z_b, BLOCK_F: tl.constexpr):
    """``P[c] = sum_b G[b, c] conj(Z[b, c])`` and ``G[b, c] <- G[b, c] conj(H[c // DG])``, interleaved complex."""
    c = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    m = (f < F)[:, None]
    ri = tl.arange(0, 2)[None, :]
    off = f.to(tl.int64)[:, None] * 2 + ri
    hr, hi = tl.split(tl.load(h_ptr + (c // DG) * 2 * F + off, mask=m, other=0.0))
    pr = tl.zeros((BLOCK_F,), dtype=tl.float32)
    pi = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for b in range(B):
        g_off = b * s_g_b + c * 2 * F + off
        gr, gi = tl.split(tl.load(g_ptr + g_off, mask=m, other=0.0))
        zr, zi = tl.split(tl.load(z_ptr + b * s_z_b + c * 2 * F + off, mask=m, other=0.0))
        pr += gr * zr + gi * zi
        pi += gi * zr - gr * zi
        tl.store(g_ptr + g_off, tl.join(gr * hr + gi * hi, gi * hr - gr * hi), mask=m)
    tl.store(p_ptr + c * 2 * F + off, tl.join(pr, pi), mask=m)


def _slice_channels(B: int, L: int, D: int, dg: int) -> int:
    budget = int(float(os.environ.get("SH2_FFT_SLICE_MB", "6144")) * (1 << 20))
    per_channel = 6 * B * 2 * L * 4
    cs = max(dg, (budget // per_channel) // dg * dg)
    return min(D, cs)


def _save_spectrum_limit() -> int:
    return int(float(os.environ.get("SH2_FFT_SAVE_SPECTRUM_MB", "1024")) * (1 << 20))


def _grid(B: int, L: int, C: int) -> tuple[tuple[int, int], int]:
    n_t = triton.cdiv(L, _BT)
    return (B * n_t, triton.cdiv(C, _BC)), n_t


def _s(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _filter_spectrum(h: torch.Tensor, g0: int, g1: int, n: int) -> torch.Tensor:
    return torch.fft.rfft(h[g0:g1].float(), n=n)


def fft_forward(q, k, v, h, bias, save: bool):
    """Forward over channel slices; returns ``(y, saved conv + bias z or None, list of filter spectra or None)``."""
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    n = 2 * L
    cs = _slice_channels(B, L, D, dg)
    y = torch.empty(B, L, D, device=q.device, dtype=q.dtype)
    ysave = torch.empty_like(y) if save else None
    keep = save and G * (L + 1) * 8 <= _save_spectrum_limit()
    spectra = [] if keep else None
    zbuf = torch.zeros(B, cs, n, device=q.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else y
    for c0 in range(0, D, cs):
        C = min(cs, D - c0)
        zb = zbuf[:, :C]
        grid, n_t = _grid(B, L, C)
        _pack_kernel[grid](k, v, zb, k, k, k, k, k, k, k, L, D, c0, C, n_t, *_s(k), *_s(v), 0, 0, 0, 0, 0, 0, 0, 0,
                           zb.stride(0), TWO=False, BLOCK_T=_BT, BLOCK_C=_BC)
        zf = torch.fft.rfft(zb, dim=-1)
        hf = _filter_spectrum(h, c0 // dg, (c0 + C) // dg, n)
        if keep:
            spectra.append(hf)
        zf.view(B, C // dg, dg, L + 1).mul_(hf[None, :, None, :])
        conv = torch.fft.irfft(zf, n=n, dim=-1)
        del zf
        _unpack_fwd_kernel[grid](conv, q, k, v, bias_arg, y, ysave if save else y, L, D, c0, C, n_t,
                                 *_s(q), *_s(k), *_s(v), conv.stride(0), HAS_BIAS=bias is not None, SAVE=save,
                                 BLOCK_T=_BT, BLOCK_C=_BC)
        del conv
    return y, ysave, spectra


def fft_backward(q, k, v, h, bias, ysave, spectra, dy):
    """Backward over channel slices; returns ``dq, dk, dv`` (contiguous), ``dh [G, K]`` and ``dbias`` (fp32)."""
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    n = 2 * L
    F = L + 1
    cs = _slice_channels(B, L, D, dg)
    dev = q.device
    dq = torch.empty(B, L, D, device=dev, dtype=q.dtype)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    dh = torch.empty(G, K, device=dev, dtype=torch.float32)
    gbuf = torch.zeros(B, cs, n, device=dev, dtype=torch.float32)
    zbuf = torch.zeros_like(gbuf)
    n_t = triton.cdiv(L, _BT)
    db_part = torch.empty(B * n_t, D, device=dev, dtype=torch.float32)
    bias_arg = bias if bias is not None else dq
    for i, c0 in enumerate(range(0, D, cs)):
        C = min(cs, D - c0)
        gb, zb = gbuf[:, :C], zbuf[:, :C]
        grid, _ = _grid(B, L, C)
        _pack_kernel[grid](dy, q, gb, dy, ysave, dq, db_part, k, v, zb, L, D, c0, C, n_t, *_s(dy), *_s(q),
                           *_s(dy), *_s(ysave), *_s(k), *_s(v), gb.stride(0), TWO=True, BLOCK_T=_BT, BLOCK_C=_BC)
        gf = torch.fft.rfft(gb, dim=-1)
        zf = torch.fft.rfft(zb, dim=-1)
        hf = spectra[i] if spectra is not None else _filter_spectrum(h, c0 // dg, (c0 + C) // dg, n)
        p = torch.empty(C, F, device=dev, dtype=torch.complex64)
        _spectra_bwd_kernel[(C, triton.cdiv(F, _BF))](
            torch.view_as_real(gf), torch.view_as_real(zf), torch.view_as_real(hf), torch.view_as_real(p),
            B, F, dg, gf.stride(0) * 2, zf.stride(0) * 2, BLOCK_F=_BF)
        del zf
        if dg > 1:
            p = p.view(C // dg, dg, F).sum(1)
        dh[c0 // dg:(c0 + C) // dg] = torch.fft.irfft(p, n=n, dim=-1)[:, :K]
        del p
        dz = torch.fft.irfft(gf, n=n, dim=-1)
        del gf
        _unpack_bwd_kernel[grid](dz, q, k, v, dy, bias_arg, dk, dv, L, D, c0, C, n_t, *_s(q), *_s(k), *_s(v),
                                 *_s(dy), dz.stride(0), HAS_BIAS=bias is not None, BLOCK_T=_BT, BLOCK_C=_BC)
        del dz
    dbias = sum_partials(db_part) if bias is not None else None
    return dq, dk, dv, dh, dbias


class GatedFFTConv(torch.autograd.Function):
    """Autograd wrapper of the sliced FFT convolution (gradients to q, k, v, h and bias)."""

    @staticmethod
    def forward(ctx, q, k, v, h, bias):
        q, k, v = (channel_stride_one(x) for x in (q, k, v))
        save = any(ctx.needs_input_grad)
        y, ysave, spectra = fft_forward(q, k, v, h, bias, save)
        if save:
            ctx.save_for_backward(q, k, v, h, bias, ysave)
            ctx.spectra = spectra
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, h, bias, ysave = ctx.saved_tensors
        dq, dk, dv, dh, db = fft_backward(q, k, v, h, bias, ysave, ctx.spectra, channel_stride_one(dy))
        ctx.spectra = None
        return dq, dk, dv, dh.to(h.dtype), (db.to(bias.dtype) if db is not None else None)


def gated_fft_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gated causal long convolution ``q * (conv(k * v, h) + bias * k * v)`` by fp32 FFT, memory-bounded.

    Args:
        q, k, v: ``[B, L, D]``; views with channel stride 1 are used in place.
        h: ``[G, K]`` causal filters with ``K <= L`` (LI: ``G = D``, ``K = L``).
        bias: Dskip ``[D]`` or None.

    Returns:
        ``[B, L, D]`` in q's dtype. float64 inputs use the reference.
    """
    if q.dtype == torch.float64 or q.numel() == 0:
        return reference.gated_fft_conv_ref(q, k, v, h, bias)
    return GatedFFTConv.apply(q, k, v, h, bias)
