"""Direct register-tiled FIR kernels: any group size (dg = 1, odd dg), any K.

Each program owns a ``[BLOCK_T, BLOCK_C]`` tile of ``[L, D]`` and loops over the K taps, reloading
the shifted inputs (they hit L1/L2) and accumulating in fp32 registers. For short filters this is
memory-bound like the blocked kernels; for long ones it is the correct fallback where the GEMM form
does not apply (``dg`` not a multiple of 16, or ``K > 128``).

Backward:
- :func:`_fir_direct_bwd_kernel`: ``conv = sum_s h[s] z[t-s]`` (recomputed), ``dz = sum_s h[s] g[t+s]``
  with ``g = dy * q``; dq, dk, dv and per-program Dskip partials.
- :func:`_fir_direct_dh_kernel`: per program and channel, ``sum_t g[t] z[t-s]`` for every tap over a
  segment of tiles; the ``[P, D, K]`` fp32 partials are reduced by a second kernel.

As in :mod:`sh2.kernels.fir_blocked`, length-derived integers are not specialised, so that every
sequence length runs the same compiled kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sh2.kernels._tuning import load_tile as _load
from sh2.kernels._tuning import tile_ptrs as _ptrs


@triton.jit(do_not_specialize=("L", "n_t"))
def _fir_direct_fwd_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, bias_ptr, y_ptr,
    L, D, DG, K, n_t,
    sqb, sql, skb, skl, svb, svl, syb, syl,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < D
    h_rows = h_ptr + (offs_c // DG) * K
    kb = k_ptr + b * skb
    vb = v_ptr + b * svb
    z0 = _load(kb, t, skl, offs_c, L, mc) * _load(vb, t, svl, offs_c, L, mc)
    acc = tl.load(h_rows, mask=mc, other=0.0).to(tl.float32)[None, :] * z0
    for s in range(1, K):
        hs = tl.load(h_rows + s, mask=mc, other=0.0).to(tl.float32)
        z = _load(kb, t - s, skl, offs_c, L, mc) * _load(vb, t - s, svl, offs_c, L, mc)
        acc += hs[None, :] * z
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)[None, :] * z0
    y = _load(q_ptr + b * sqb, t, sql, offs_c, L, mc) * acc
    m = (t < L)[:, None] & mc[None, :]
    tl.store(_ptrs(y_ptr + b * syb, t, syl, offs_c), y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=("L", "n_t"))
def _fir_direct_bwd_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, h_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr, db_part_ptr,
    L, D, DG, K, n_t,
    sqb, sql, skb, skl, svb, svl, sdyb, sdyl, sob, sol,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < D
    h_rows = h_ptr + (offs_c // DG) * K
    qb = q_ptr + b * sqb
    kb = k_ptr + b * skb
    vb = v_ptr + b * svb
    dyb = dy_ptr + b * sdyb
    kk = _load(kb, t, skl, offs_c, L, mc)
    vv = _load(vb, t, svl, offs_c, L, mc)
    dy = _load(dyb, t, sdyl, offs_c, L, mc)
    z0 = kk * vv
    g0 = dy * _load(qb, t, sql, offs_c, L, mc)
    h0 = tl.load(h_rows, mask=mc, other=0.0).to(tl.float32)[None, :]
    conv = h0 * z0
    dz = h0 * g0
    for s in range(1, K):
        hs = tl.load(h_rows + s, mask=mc, other=0.0).to(tl.float32)[None, :]
        conv += hs * (_load(kb, t - s, skl, offs_c, L, mc) * _load(vb, t - s, svl, offs_c, L, mc))
        dz += hs * (_load(dyb, t + s, sdyl, offs_c, L, mc) * _load(qb, t + s, sql, offs_c, L, mc))
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)[None, :]
        conv += bias * z0
        dz += bias * g0
        tl.store(db_part_ptr + pid.to(tl.int64) * D + offs_c, tl.sum(g0 * z0, axis=0), mask=mc)
    m = (t < L)[:, None] & mc[None, :]
    odt = dq_ptr.dtype.element_ty
    ob = b * sob
    tl.store(_ptrs(dq_ptr + ob, t, sol, offs_c), (dy * conv).to(odt), mask=m)
    tl.store(_ptrs(dk_ptr + ob, t, sol, offs_c), (dz * vv).to(odt), mask=m)
    tl.store(_ptrs(dv_ptr + ob, t, sol, offs_c), (dz * kk).to(odt), mask=m)


@triton.jit(do_not_specialize=("L", "n_t", "tiles_per_prog", "n_seg"))
def _fir_direct_dh_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dh_part_ptr,
    L, D, K, n_t, tiles_per_prog, n_seg,
    sqb, sql, skb, skl, svb, svl, sdyb, sdyl,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid // n_seg).to(tl.int64)
    seg = pid % n_seg
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < D
    qb = q_ptr + b * sqb
    kb = k_ptr + b * skb
    vb = v_ptr + b * svb
    dyb = dy_ptr + b * sdyb
    i0 = seg * tiles_per_prog
    i1 = tl.minimum(i0 + tiles_per_prog, n_t)
    out = dh_part_ptr + (pid.to(tl.int64) * D + offs_c) * K
    for s in range(0, K):
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for i in range(i0, i1):
            t = i * BLOCK_T + tl.arange(0, BLOCK_T)
            g = _load(dyb, t, sdyl, offs_c, L, mc) * _load(qb, t, sql, offs_c, L, mc)
            acc += g * (_load(kb, t - s, skl, offs_c, L, mc) * _load(vb, t - s, svl, offs_c, L, mc))
        tl.store(out + s, tl.sum(acc, axis=0), mask=mc)
