"""Gated causal long convolution (Hyena-LI) by fp32 cuFFT with the pointwise work fused in Triton.

``y = q * (irfft(rfft(z, 2L) * rfft(h, 2L))[:L] + bias * z)``, ``z = k * v``, computed in channel
slices so that the fp32 working set stays bounded (setting ``fft_slice_mb``, ``SH2_FFT_SLICE_MB``,
default 6144 MiB, counts six ``[B, C, 2L]`` fp32 buffers). Per slice:

forward
  1. ``_pack_product_kernel``: ``z = k * v`` read from ``[B, L, D]`` (any token stride) and written
     transposed into a zero-tailed ``[B, C, 2L]`` fp32 buffer (the zero tail is written once per call);
  2. cuFFT ``rfft(z)``, ``rfft(h)``, one in-place complex product, cuFFT ``irfft``;
  3. ``_unpack_fwd_kernel``: ``y = q * (conv + bias z)`` cast to the output dtype; when gradients are
     needed it also stores ``conv + bias z`` in q's dtype for ``dq`` (cheaper than another FFT).
backward (``g = dy * q``)
  1. ``_pack_backward_kernel``: ``g`` and ``z`` into zero-tailed buffers, plus ``dq = dy * saved`` and,
     with a bias, per-program Dskip partials ``sum g z``;
  2. ``rfft(g)``, ``rfft(z)``; ``rfft(h)`` is reused from the forward when the whole spectrum fits in
     ``fft_save_spectrum_mb`` (``SH2_FFT_SAVE_SPECTRUM_MB``, default 1024), else recomputed;
  3. ``_spectra_bwd_kernel``: ``P = sum_b G conj(Z)`` (filter gradient) and ``G <- G conj(H)`` in one
     pass, in place;
  4. ``irfft(G)`` gives the correlation ``dz``, ``irfft(P)[:K]`` gives ``dh``;
  5. ``_unpack_bwd_kernel``: ``dk = (dz + bias g) v``, ``dv = (dz + bias g) k``.

PyTorch sees this as the custom operators ``sh2::gated_fft_conv`` (which also returns what the backward
needs: ``conv + bias z`` and the filter spectrum, as non-differentiable outputs) and
``sh2::gated_fft_conv_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sh2.kernels import _tuning
from sh2.kernels._tuning import channel_stride_one
from sh2.kernels.settings import current_settings

_BT, _BC, _BF = 64, 64, 256


@triton.jit
def _slice_tile(L, c0, C, n_t, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a channel slice: batch row b, token column tt, slice channels cl (ch in the
    full width), and the mask of the tile's valid entries."""
    pid = tl.program_id(0)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    cl = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (t < L)[:, None] & (cl < C)[None, :]
    return b, t.to(tl.int64)[:, None], cl, c0 + cl, m


@triton.jit
def _load_f32(ptr, b, sb, tt, sl, ch, m):
    """fp32 tile of a ``[B, L, D]`` tensor with batch stride sb, token stride sl and channel stride 1."""
    return tl.load(ptr + b * sb + tt * sl + ch[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _buf_offsets(b, s_buf_b, cl, tt, L):
    """Offsets of the tile in a transposed ``[B, C, 2L]`` FFT buffer (batch stride s_buf_b)."""
    return b * s_buf_b + cl.to(tl.int64)[None, :] * (2 * L) + tt


@triton.jit
def _pack_product_kernel(a_ptr, b_ptr, buf_ptr, L, c0, C, n_t, sab, sal, sbb, sbl, s_buf_b,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``buf[b, c, t] = a[b, t, c0 + c] * b[b, t, c0 + c]`` in fp32, transposed into a ``[B, C, 2L]`` buffer."""
    b, tt, cl, ch, m = _slice_tile(L, c0, C, n_t, BLOCK_T, BLOCK_C)
    x = _load_f32(a_ptr, b, sab, tt, sal, ch, m)
    x *= _load_f32(b_ptr, b, sbb, tt, sbl, ch, m)
    tl.store(buf_ptr + _buf_offsets(b, s_buf_b, cl, tt, L), x, mask=m)


@triton.jit
def _pack_backward_kernel(dy_ptr, q_ptr, saved_ptr, k_ptr, v_ptr, gbuf_ptr, zbuf_ptr, dq_ptr, db_part_ptr,
                          L, D, c0, C, n_t, sdyb, sdyl, sqb, sql, ssb, ssl, skb, skl, svb, svl, s_buf_b,
                          HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over a slice for the backward: ``g = dy * q`` and ``z = k * v`` into the transposed fp32
    buffers, ``dq = dy * saved`` (``saved = conv + bias z`` from the forward) and, with a bias, the
    per-program Dskip partials ``sum_t g z``."""
    b, tt, cl, ch, m = _slice_tile(L, c0, C, n_t, BLOCK_T, BLOCK_C)
    dy = _load_f32(dy_ptr, b, sdyb, tt, sdyl, ch, m)
    g = dy * _load_f32(q_ptr, b, sqb, tt, sql, ch, m)
    z = _load_f32(k_ptr, b, skb, tt, skl, ch, m)
    z *= _load_f32(v_ptr, b, svb, tt, svl, ch, m)
    buf_off = _buf_offsets(b, s_buf_b, cl, tt, L)
    tl.store(gbuf_ptr + buf_off, g, mask=m)
    tl.store(zbuf_ptr + buf_off, z, mask=m)
    saved = _load_f32(saved_ptr, b, ssb, tt, ssl, ch, m)
    tl.store(dq_ptr + b * L * D + tt * D + ch[None, :], (dy * saved).to(dq_ptr.dtype.element_ty), mask=m)
    if HAS_BIAS:
        tl.store(db_part_ptr + tl.program_id(0).to(tl.int64) * D + ch, tl.sum(g * z, axis=0), mask=cl < C)


@triton.jit
def _unpack_fwd_kernel(y_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, save_ptr,
                       L, D, c0, C, n_t, sqb, sql, skb, skl, svb, svl, s_buf_b,
                       HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = q * (conv + bias * k * v)`` from the irfft buffer ``[B, C, 2L]`` (first L taps)."""
    b, tt, cl, ch, m = _slice_tile(L, c0, C, n_t, BLOCK_T, BLOCK_C)
    y = tl.load(y_ptr + _buf_offsets(b, s_buf_b, cl, tt, L), mask=m, other=0.0)
    if HAS_BIAS:
        z = _load_f32(k_ptr, b, skb, tt, skl, ch, m)
        z *= _load_f32(v_ptr, b, svb, tt, svl, ch, m)
        y += tl.load(bias_ptr + ch, mask=cl < C, other=0.0).to(tl.float32)[None, :] * z
    q = _load_f32(q_ptr, b, sqb, tt, sql, ch, m)
    o = b * L * D + tt * D + ch[None, :]
    tl.store(out_ptr + o, (q * y).to(out_ptr.dtype.element_ty), mask=m)
    if SAVE:
        tl.store(save_ptr + o, y.to(save_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpack_bwd_kernel(dz_ptr, q_ptr, k_ptr, v_ptr, dy_ptr, bias_ptr, dk_ptr, dv_ptr,
                       L, D, c0, C, n_t, sqb, sql, skb, skl, svb, svl, sdb, sdl, s_buf_b,
                       HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dk = (dz + bias g) v``, ``dv = (dz + bias g) k`` with ``g = dy * q``."""
    b, tt, cl, ch, m = _slice_tile(L, c0, C, n_t, BLOCK_T, BLOCK_C)
    dz = tl.load(dz_ptr + _buf_offsets(b, s_buf_b, cl, tt, L), mask=m, other=0.0)
    if HAS_BIAS:
        g = _load_f32(dy_ptr, b, sdb, tt, sdl, ch, m)
        g *= _load_f32(q_ptr, b, sqb, tt, sql, ch, m)
        dz += tl.load(bias_ptr + ch, mask=cl < C, other=0.0).to(tl.float32)[None, :] * g
    k = _load_f32(k_ptr, b, skb, tt, skl, ch, m)
    v = _load_f32(v_ptr, b, svb, tt, svl, ch, m)
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
    """Channels per slice: a multiple of the group size whose six fp32 ``[B, C, 2L]`` buffers fit the budget."""
    budget = int(current_settings().fft_slice_mb * (1 << 20))
    per_channel = 6 * B * 2 * L * 4
    cs = max(dg, (budget // per_channel) // dg * dg)
    return min(D, cs)


def keeps_spectrum(G: int, L: int) -> bool:
    """Whether the forward keeps the filter spectrum ``[G, L + 1]`` complex64 for the backward."""
    return G * (L + 1) * 8 <= current_settings().fft_save_spectrum_mb * (1 << 20)


def _grid(B: int, L: int, C: int) -> tuple[tuple[int, int], int]:
    n_t = triton.cdiv(L, _BT)
    return (B * n_t, triton.cdiv(C, _BC)), n_t


def _s(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _zeroed(B: int, C: int, n: int, device: torch.device) -> torch.Tensor:
    """A ``[B, C, n]`` fp32 FFT buffer, zero so that the tail beyond the L packed tokens pads the FFT."""
    return _tuning.new_buffer((B, C, n), torch.float32, device).zero_()


def fft_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
                save: bool, keep_spectrum: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward over channel slices.

    Args:
        q, k, v: ``[B, L, D]`` with channel stride 1; h ``[G, K]``, K <= L; bias ``[D]`` or None.
        save: also return ``conv + bias z`` in q's dtype (what the backward needs for dq).
        keep_spectrum: also return the filter spectrum ``rfft(h, 2L)`` ``[G, L + 1]`` complex64.

    Returns:
        ``(y, saved or None, spectrum or None)``; y and saved contiguous in q's dtype.
    """
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    n = 2 * L
    cs = _slice_channels(B, L, D, dg)
    y = _tuning.new_buffer((B, L, D), q.dtype, q.device)
    ysave = _tuning.new_buffer((B, L, D), q.dtype, q.device) if save else None
    spectrum = torch.fft.rfft(h.float(), n=n) if keep_spectrum else None
    zbuf = _zeroed(B, cs, n, q.device)
    for c0 in range(0, D, cs):
        C = min(cs, D - c0)
        zb = zbuf[:, :C]
        grid, n_t = _grid(B, L, C)
        _pack_product_kernel[grid](k, v, zb, L, c0, C, n_t, *_s(k), *_s(v), zb.stride(0), BLOCK_T=_BT, BLOCK_C=_BC)
        zf = torch.fft.rfft(zb, dim=-1)
        g0, g1 = c0 // dg, (c0 + C) // dg
        hf = spectrum[g0:g1] if spectrum is not None else torch.fft.rfft(h[g0:g1].float(), n=n)
        zf.view(B, C // dg, dg, L + 1).mul_(hf[None, :, None, :])
        conv = torch.fft.irfft(zf, n=n, dim=-1)
        del zf
        _unpack_fwd_kernel[grid](conv, q, k, v, bias, y, ysave, L, D, c0, C, n_t, *_s(q), *_s(k), *_s(v),
                                 conv.stride(0), HAS_BIAS=bias is not None, SAVE=save, BLOCK_T=_BT, BLOCK_C=_BC)
        del conv
    return y, ysave, spectrum


def fft_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
                 ysave: torch.Tensor, spectrum: torch.Tensor | None, dy: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward over channel slices; returns ``dq, dk, dv`` (contiguous), ``dh [G, K]`` and ``dbias`` (fp32).

    ``ysave`` is the forward's saved ``conv + bias z``; ``spectrum`` its filter spectrum, or None to
    recompute it per slice.
    """
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    n = 2 * L
    F = L + 1
    cs = _slice_channels(B, L, D, dg)
    dev = q.device
    dq, dk, dv = (_tuning.new_buffer((B, L, D), q.dtype, dev) for _ in range(3))
    dh = _tuning.new_buffer((G, K), torch.float32, dev)
    gbuf, zbuf = _zeroed(B, cs, n, dev), _zeroed(B, cs, n, dev)
    n_t = triton.cdiv(L, _BT)
    db_part = _tuning.new_buffer((B * n_t, D), torch.float32, dev) if bias is not None else None
    for c0 in range(0, D, cs):
        C = min(cs, D - c0)
        gb, zb = gbuf[:, :C], zbuf[:, :C]
        grid, _ = _grid(B, L, C)
        _pack_backward_kernel[grid](dy, q, ysave, k, v, gb, zb, dq, db_part, L, D, c0, C, n_t, *_s(dy), *_s(q),
                                    *_s(ysave), *_s(k), *_s(v), gb.stride(0), HAS_BIAS=bias is not None,
                                    BLOCK_T=_BT, BLOCK_C=_BC)
        gf = torch.fft.rfft(gb, dim=-1)
        zf = torch.fft.rfft(zb, dim=-1)
        g0, g1 = c0 // dg, (c0 + C) // dg
        hf = spectrum[g0:g1] if spectrum is not None else torch.fft.rfft(h[g0:g1].float(), n=n)
        p = _tuning.new_buffer((C, F), torch.complex64, dev)
        _spectra_bwd_kernel[(C, triton.cdiv(F, _BF))](
            torch.view_as_real(gf), torch.view_as_real(zf), torch.view_as_real(hf), torch.view_as_real(p),
            B, F, dg, gf.stride(0) * 2, zf.stride(0) * 2, BLOCK_F=_BF)
        del zf
        if dg > 1:
            p = p.view(C // dg, dg, F).sum(1)
        dh[g0:g1] = torch.fft.irfft(p, n=n, dim=-1)[:, :K]
        del p
        dz = torch.fft.irfft(gf, n=n, dim=-1)
        del gf
        _unpack_bwd_kernel[grid](dz, q, k, v, dy, bias, dk, dv, L, D, c0, C, n_t, *_s(q), *_s(k), *_s(v),
                                 *_s(dy), dz.stride(0), HAS_BIAS=bias is not None, BLOCK_T=_BT, BLOCK_C=_BC)
        del dz
    dbias = _tuning.sum_partials(db_part) if db_part is not None else None
    return dq, dk, dv, dh, dbias


# ---------------------------------------------------------------------------------------- custom operators
@torch.library.custom_op("sh2::gated_fft_conv", mutates_args=())
def gated_fft_conv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
                      save: bool, keep_spectrum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, saved, spectrum)``; ``saved`` (``conv + bias z``, q's dtype) is empty unless ``save``, the
    filter spectrum (``[G, L + 1]`` complex64) empty unless ``keep_spectrum``. Both feed the backward."""
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    bias = bias.contiguous() if bias is not None else None
    y, ysave, spectrum = fft_forward(q, k, v, h, bias, save, keep_spectrum)
    return (y, ysave if ysave is not None else q.new_empty(0),
            spectrum if spectrum is not None else q.new_empty(0, dtype=torch.complex64))


@gated_fft_conv_op.register_fake
def _(q, k, v, h, bias, save, keep_spectrum):
    saved = q.new_empty(q.shape if save else (0,))
    spectrum = q.new_empty((h.shape[0], q.shape[1] + 1) if keep_spectrum else (0,), dtype=torch.complex64)
    return q.new_empty(q.shape), saved, spectrum


@torch.library.custom_op("sh2::gated_fft_conv_backward", mutates_args=())
def gated_fft_conv_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                               bias: torch.Tensor | None, saved: torch.Tensor, spectrum: torch.Tensor,
                               dy: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (q's dtype), ``dh`` (h's dtype), ``dbias`` (bias's dtype; empty without bias)."""
    if saved.shape != q.shape:
        raise RuntimeError("sh2::gated_fft_conv_backward needs the forward's saved tensor: run "
                           "sh2::gated_fft_conv with save=True when gradients are needed")
    q, k, v, dy = (channel_stride_one(x) for x in (q, k, v, dy))
    bias = bias.contiguous() if bias is not None else None
    dq, dk, dv, dh, dbias = fft_backward(q, k, v, h, bias, saved, spectrum if spectrum.numel() else None, dy)
    return dq, dk, dv, dh.to(h.dtype), dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)


@gated_fft_conv_backward_op.register_fake
def _(q, k, v, h, bias, saved, spectrum, dy):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), h.new_empty(h.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, h, bias, _, _ = inputs
    _, saved, spectrum = output
    ctx.save_for_backward(q, k, v, h, bias, saved, spectrum)
    ctx.mark_non_differentiable(saved, spectrum)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy: torch.Tensor | None, _dsaved, _dspectrum):
    q, k, v, h, bias, saved, spectrum = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None, None
    dq, dk, dv, dh, dbias = gated_fft_conv_backward_op(q, k, v, h, bias, saved, spectrum, dy)
    return dq, dk, dv, dh, (dbias if bias is not None else None), None, None


gated_fft_conv_op.register_autograd(_backward, setup_context=_setup_context)


def gated_fft_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gated causal long convolution ``q * (conv(k * v, h) + bias * k * v)`` by fp32 FFT, memory-bounded.

    Args:
        q, k, v: ``[B, L, D]`` fp16/bf16/fp32, non-empty; views with channel stride 1 are used in place.
        h: ``[G, K]`` causal filters with ``K <= L`` (LI: ``G = D``, ``K = L``).
        bias: Dskip ``[D]`` or None.

    Returns:
        ``[B, L, D]`` in q's dtype (differentiable).
    """
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, h, bias))
    keep = save and keeps_spectrum(h.shape[0], q.shape[1])
    return gated_fft_conv_op(q, k, v, h, bias, save, keep)[0]
