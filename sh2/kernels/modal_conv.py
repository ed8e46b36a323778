"""Hyena-LI as its exact modal recurrence, in Triton: forward, backward and state passing.

The LI filter of channel c is a sum of N real decaying exponentials, ``h[t] = sum_n R_n lambda_n^t`` with
``lambda_n = exp(log_pole_n)`` in (0, 1). The gated long convolution ``y = q * (conv(z, h) + Dskip z)``,
``z = k * v``, is therefore exactly a diagonal linear recurrence with N fp32 states per channel::

    s_n[t] = lambda_n s_n[t-1] + z[t]            (s_n[-1] = the initial state, zero by default)
    y[t]   = q[t] * (sum_n R_n s_n[t] + Dskip z[t])

No FFT, no filter of length L, O(L D N) work and O(D N) state. See docs/design.md, "Hyena-LI as a recurrence".

Algorithm (chosen for Hopper; why below). The sequence is cut into chunks of T tokens. Every program owns
``BLOCK_D`` channels (one or two per thread) of one chunk and keeps the N states of each channel in registers
as N separate vectors, so every per-token update is element-wise in a thread: no shuffles, no shared memory,
no layout conversions. Loads of ``UNROLL`` tokens are issued together before their sequential updates, which
keeps enough bytes in flight to stream at memory speed.

forward
  1. ``_chunk_state_kernel``: each chunk from a zero state; its end state (and, when gradients are needed,
     the end value of ``sigma = d s / d lambda``, the recurrence ``sigma <- lambda sigma + s``). Reads k, v.
  2. ``_combine_kernel``: a scan over the chunk end states, ``S_{c+1} = lambda^T S_c + E_c`` (and the same
     for sigma, which gains ``T lambda^(T-1) S_c``); it leaves each chunk's true start state and the final
     state. Powers ``lambda^T`` come from ``exp(T log lambda)``, never ``lambda^(-T)``.
  3. ``_chunk_output_kernel``: each chunk again from its true start state, writing y. Reads q, k, v.
backward (``g = dy * q``; the adjoint ``a_n[t] = R_n g[t] + lambda_n a_n[t+1]``)
  1. ``_chunk_adjoint_kernel``: the adjoint of each chunk from a zero right boundary, walking backwards; keeps
     ``lambda a`` at the chunk's first token (what flows to the previous chunk). Reads dy, q.
  2. ``_combine_adjoint_kernel``: the right-to-left scan of those carries (seeded with the gradient of the
     final state); leaves each chunk's carry from the right and the gradient of the initial state.
  3. ``_chunk_dq_kernel``: forward over each chunk from its start state and sigma: ``dq = dy (R.s + Dskip z)``
     and per-program partial sums ``dR_n = sum g s_n``, ``dlambda_n = R_n sum g sigma_n``, ``dDskip = sum g z``.
     Reads dy, q, k, v; writes dq.
  4. ``_chunk_dkv_kernel``: backward over each chunk from its carry: ``dz = sum_n a_n + Dskip g``,
     ``dk = dz v``, ``dv = dz k``. Reads dy, q, k, v; writes dk, dv.
  The gradient of the decays uses ``sigma`` instead of the textbook ``sum_t a[t] s[t-1]``, which would need
  the forward states and the reverse adjoint at the same token: the forward-running sigma makes it a plain
  sum in pass 3. ``d log lambda = lambda d lambda`` chains to (p, gamma) in PyTorch.

Cost per token and channel (N = 16, bf16 inputs): forward reads k, v twice and q once and writes y: 6 x 2
bytes against the 4-tensor floor of 8 bytes, and 3 N = 48 fused multiply-adds; the backward moves 13 x 2
bytes (dy, q twice; k, v, dy, q in passes 3 and 4; dq, dk, dv) and about 8 N = 128 multiply-adds. fp32
states and accumulation throughout. Why this and not a chunked matrix form (as for Mamba-2): the 16 decays
are per channel, so an intra-chunk Toeplitz or state projection is a batched matrix-vector product with no
reuse across channels (no tensor-core GEMM to gain), and it costs more multiply-adds per token than the
recurrence itself. Why not one sequential scan per channel: B D N lanes are too few to fill the GPU at
batch 1 (65K lanes against ~270K threads), so chunks provide the parallelism and the two extra passes over
k, v and dy, q are the price.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sh2.kernels._tuning import channel_stride_one, pick_config, sum_partials

# ----------------------------------------------------------------------------------------------- Triton helpers


@triton.jit
def _load_decays(lp_ptr, offs_d, mask_d, N: tl.constexpr):
    """``lambda_n = exp(log_pole_n)`` of the program's channels as N vectors (parameters in ``[D, N]`` layout).

    Masked channels read ``log_pole = 0`` (lambda = 1) and, below, ``R = 0``: finite and never stored.
    """
    lam = ()
    for n in tl.static_range(N):
        lam = lam + (tl.exp(tl.load(lp_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32)),)
    return lam


@triton.jit
def _load_residues(r_ptr, offs_d, mask_d, N: tl.constexpr):
    """``R_n`` of the program's channels as N vectors."""
    res = ()
    for n in tl.static_range(N):
        res = res + (tl.load(r_ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32),)
    return res


@triton.jit
def _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        skip = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    return skip


@triton.jit
def _zeros(BLOCK_D: tl.constexpr, N: tl.constexpr):
    out = ()
    for _n in tl.static_range(N):
        out = out + (tl.zeros((BLOCK_D,), dtype=tl.float32),)
    return out


@triton.jit
def _load_state(ptr, stride_n, offs_d, mask_d, N: tl.constexpr):
    """N vectors ``ptr[n * stride_n + d]`` (a ``[N, D]`` slab of a state buffer)."""
    out = ()
    for n in tl.static_range(N):
        out = out + (tl.load(ptr + n * stride_n + offs_d, mask=mask_d, other=0.0),)
    return out


@triton.jit
def _store_state(ptr, stride_n, offs_d, mask_d, s, N: tl.constexpr):
    for n in tl.static_range(N):
        tl.store(ptr + n * stride_n + offs_d, s[n], mask=mask_d)


@triton.jit
def _decay_add(s, lam, x, N: tl.constexpr):
    """``s_n <- lambda_n s_n + x`` for every pole."""
    out = ()
    for n in tl.static_range(N):
        out = out + (lam[n] * s[n] + x,)
    return out


@triton.jit
def _decay_add_each(s, lam, x, N: tl.constexpr):
    """``s_n <- lambda_n s_n + x_n`` for every pole."""
    out = ()
    for n in tl.static_range(N):
        out = out + (lam[n] * s[n] + x[n],)
    return out


@triton.jit
def _scale(x, lam, N: tl.constexpr):
    """``x_n <- lambda_n x_n``."""
    out = ()
    for n in tl.static_range(N):
        out = out + (lam[n] * x[n],)
    return out


@triton.jit
def _accumulate(acc, w, x, N: tl.constexpr):
    """``acc_n <- acc_n + w * x_n``."""
    out = ()
    for n in tl.static_range(N):
        out = out + (acc[n] + w * x[n],)
    return out


@triton.jit
def _weighted_sum(w, x, N: tl.constexpr):
    """``sum_n w_n x_n``."""
    acc = w[0] * x[0]
    for n in tl.static_range(1, N):
        acc += w[n] * x[n]
    return acc


@triton.jit
def _tile(ptr, b, stride_b, stride_l, t, offs_d, mask_d):
    """Load row ``t`` of batch ``b`` of a ``[B, L, D]`` tensor (channel stride 1) as fp32."""
    p = ptr + b * stride_b + t.to(tl.int64) * stride_l + offs_d
    return tl.load(p, mask=mask_d, other=0.0).to(tl.float32)


@triton.jit
def _out_ptrs(ptr, b, L, D, t, offs_d):
    """Row ``t`` of batch ``b`` of a contiguous ``[B, L, D]`` output."""
    return ptr + (b * L + t.to(tl.int64)) * D + offs_d


# --------------------------------------------------------------------------------------------------- forward


@triton.jit
def _chunk_state_kernel(k_ptr, v_ptr, lp_ptr, e_ptr, es_ptr, L, D, T, n_chunks, skb, skl, svb, svl,
                        N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, SIGMA: tl.constexpr):
    """End state (and end sigma) of each chunk from a zero start: ``e[b, c, n, d]``."""
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_decays(lp_ptr, offs_d, mask_d, N)
    s = _zeros(BLOCK_D, N)
    sig = _zeros(BLOCK_D, N)
    t0 = c * T
    n = tl.minimum(T, L - t0)
    n_full = n - n % UNROLL
    for i in range(0, n_full, UNROLL):
        zs = ()
        for u in tl.static_range(UNROLL):
            t = t0 + i + u
            zs = zs + (_tile(k_ptr, b, skb, skl, t, offs_d, mask_d) * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d),)
        for u in tl.static_range(UNROLL):
            if SIGMA:
                sig = _decay_add_each(sig, lam, s, N)
            s = _decay_add(s, lam, zs[u], N)
    for i in range(n_full, n):
        t = t0 + i
        z = _tile(k_ptr, b, skb, skl, t, offs_d, mask_d) * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d)
        if SIGMA:
            sig = _decay_add_each(sig, lam, s, N)
        s = _decay_add(s, lam, z, N)
    slab = (b * n_chunks + c) * N * D
    _store_state(e_ptr + slab, D, offs_d, mask_d, s, N)
    if SIGMA:
        _store_state(es_ptr + slab, D, offs_d, mask_d, sig, N)


@triton.jit
def _combine_kernel(e_ptr, es_ptr, lp_ptr, s0_ptr, sf_ptr, sigf_ptr, L, D, T, n_chunks,
                    N: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, HAS_INIT: tl.constexpr,
                    SIGMA: tl.constexpr):
    """Scan the chunk end states left to right, leaving each chunk's start state (and sigma) in their place.

    Lanes are (pole, channel) pairs ``j = n * D + d`` of batch ``program_id(0)``; the initial and final states
    use the public ``[B, D, N]`` layout. ``UNROLL`` chunks are loaded before they are scanned, so the scan
    waits on memory once per ``UNROLL`` chunks rather than once per chunk.
    """
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N * D
    n = j // D
    d = j % D
    lp = tl.load(lp_ptr + d * N + n, mask=mask, other=0.0).to(tl.float32)
    last = L - (n_chunks - 1) * T
    pw_full = tl.exp(lp * T)  # lambda^T of a full chunk
    dpw_full = T * tl.exp(lp * (T - 1))  # d(lambda^T) / d lambda
    pw_last = tl.exp(lp * last)
    dpw_last = last * tl.exp(lp * (last - 1))
    state_idx = (b * D + d) * N + n
    if HAS_INIT:
        s = tl.load(s0_ptr + state_idx, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    sig = tl.zeros((BLOCK,), dtype=tl.float32)
    base = b * n_chunks * N * D + j
    for c0 in range(0, n_chunks, UNROLL):
        es = ()
        ss = ()
        for u in tl.static_range(UNROLL):
            m = mask & (j * 0 + c0 + u < n_chunks)  # (a vector mask: the interpreter rejects scalar ones)
            es = es + (tl.load(e_ptr + base + (c0 + u) * N * D, mask=m, other=0.0),)
            if SIGMA:
                ss = ss + (tl.load(es_ptr + base + (c0 + u) * N * D, mask=m, other=0.0),)
        for u in tl.static_range(UNROLL):
            c = j * 0 + c0 + u
            m = mask & (c < n_chunks)
            tl.store(e_ptr + base + c * N * D, s, mask=m)
            is_last = c == n_chunks - 1
            pw = tl.where(is_last, pw_last, pw_full)
            live = c < n_chunks  # the unrolled tail past the last chunk leaves the scan unchanged
            if SIGMA:
                tl.store(es_ptr + base + c * N * D, sig, mask=m)
                sig = tl.where(live, pw * sig + tl.where(is_last, dpw_last, dpw_full) * s + ss[u], sig)
            s = tl.where(live, pw * s + es[u], s)
    tl.store(sf_ptr + state_idx, s, mask=mask)
    if SIGMA:
        tl.store(sigf_ptr + state_idx, sig, mask=mask)


@triton.jit
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, y_ptr, lp_ptr, r_ptr, bias_ptr, s_ptr, L, D, T, n_chunks,
                         sqb, sql, skb, skl, svb, svl,
                         N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y = q (R.s + Dskip z)`` of each chunk, from the chunk's true start state."""
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_decays(lp_ptr, offs_d, mask_d, N)
    res = _load_residues(r_ptr, offs_d, mask_d, N)
    skip = _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    s = _load_state(s_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, N)
    t0 = c * T
    n = tl.minimum(T, L - t0)
    n_full = n - n % UNROLL
    for i in range(0, n_full, UNROLL):
        qs = ()
        zs = ()
        for u in tl.static_range(UNROLL):
            t = t0 + i + u
            qs = qs + (_tile(q_ptr, b, sqb, sql, t, offs_d, mask_d),)
            zs = zs + (_tile(k_ptr, b, skb, skl, t, offs_d, mask_d) * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d),)
        for u in tl.static_range(UNROLL):
            s = _decay_add(s, lam, zs[u], N)
            y = qs[u] * (_weighted_sum(res, s, N) + skip * zs[u])
            tl.store(_out_ptrs(y_ptr, b, L, D, t0 + i + u, offs_d), y.to(y_ptr.dtype.element_ty), mask=mask_d)
    for i in range(n_full, n):
        t = t0 + i
        z = _tile(k_ptr, b, skb, skl, t, offs_d, mask_d) * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d)
        s = _decay_add(s, lam, z, N)
        y = _tile(q_ptr, b, sqb, sql, t, offs_d, mask_d) * (_weighted_sum(res, s, N) + skip * z)
        tl.store(_out_ptrs(y_ptr, b, L, D, t, offs_d), y.to(y_ptr.dtype.element_ty), mask=mask_d)


# -------------------------------------------------------------------------------------------------- backward


@triton.jit
def _chunk_adjoint_kernel(dy_ptr, q_ptr, lp_ptr, r_ptr, f_ptr, L, D, T, n_chunks, sdb, sdl, sqb, sql,
                          N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    """``lambda a`` at each chunk's first token, walking the chunk backwards from a zero right boundary."""
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_decays(lp_ptr, offs_d, mask_d, N)
    res = _load_residues(r_ptr, offs_d, mask_d, N)
    carry = _zeros(BLOCK_D, N)
    t0 = c * T
    n = tl.minimum(T, L - t0)
    n_full = n - n % UNROLL
    for i in range(n - 1, n_full - 1, -1):  # the ragged top of the last chunk, one token at a time
        t = t0 + i
        g = _tile(dy_ptr, b, sdb, sdl, t, offs_d, mask_d) * _tile(q_ptr, b, sqb, sql, t, offs_d, mask_d)
        carry = _scale(_accumulate(carry, g, res, N), lam, N)
    for i in range(n_full - UNROLL, -1, -UNROLL):
        gs = ()
        for u in tl.static_range(UNROLL):
            t = t0 + i + UNROLL - 1 - u
            gs = gs + (_tile(dy_ptr, b, sdb, sdl, t, offs_d, mask_d) * _tile(q_ptr, b, sqb, sql, t, offs_d, mask_d),)
        for u in tl.static_range(UNROLL):
            carry = _scale(_accumulate(carry, gs[u], res, N), lam, N)
    _store_state(f_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, carry, N)


@triton.jit
def _combine_adjoint_kernel(f_ptr, lp_ptr, dsf_ptr, ds0_ptr, L, D, T, n_chunks,
                            N: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, HAS_DSF: tl.constexpr):
    """Scan the chunk carries right to left, leaving each chunk's carry from the right in its place; write the
    gradient of the initial state (``[B, D, N]``). ``dsf`` seeds the scan with the gradient of the final state."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N * D
    n = j // D
    d = j % D
    lp = tl.load(lp_ptr + d * N + n, mask=mask, other=0.0).to(tl.float32)
    last = L - (n_chunks - 1) * T
    pw_full = tl.exp(lp * T)
    pw_last = tl.exp(lp * last)
    state_idx = (b * D + d) * N + n
    if HAS_DSF:
        p = tl.load(dsf_ptr + state_idx, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.zeros((BLOCK,), dtype=tl.float32)
    base = b * n_chunks * N * D + j
    for c0 in range(0, n_chunks, UNROLL):
        fs = ()
        for u in tl.static_range(UNROLL):
            c = j * 0 + n_chunks - 1 - (c0 + u)
            fs = fs + (tl.load(f_ptr + base + c * N * D, mask=mask & (c >= 0), other=0.0),)
        for u in tl.static_range(UNROLL):
            c = j * 0 + n_chunks - 1 - (c0 + u)
            tl.store(f_ptr + base + c * N * D, p, mask=mask & (c >= 0))
            p = tl.where(c >= 0, tl.where(c == n_chunks - 1, pw_last, pw_full) * p + fs[u], p)
    tl.store(ds0_ptr + state_idx, p, mask=mask)


@triton.jit
def _chunk_dq_kernel(dy_ptr, q_ptr, k_ptr, v_ptr, dq_ptr, lp_ptr, r_ptr, bias_ptr, s_ptr, sig_ptr,
                     dr_part_ptr, dlam_part_ptr, dskip_part_ptr, L, D, T, n_chunks,
                     sdb, sdl, sqb, sql, skb, skl, svb, svl,
                     N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dq and the per-program partial sums of dR, d lambda and dDskip, forward over each chunk."""
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_decays(lp_ptr, offs_d, mask_d, N)
    res = _load_residues(r_ptr, offs_d, mask_d, N)
    skip = _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    slab = (b * n_chunks + c) * N * D
    s = _load_state(s_ptr + slab, D, offs_d, mask_d, N)
    sig = _load_state(sig_ptr + slab, D, offs_d, mask_d, N)
    acc_r = _zeros(BLOCK_D, N)
    acc_l = _zeros(BLOCK_D, N)
    acc_skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t0 = c * T
    n = tl.minimum(T, L - t0)
    n_full = n - n % UNROLL
    for i in range(0, n_full, UNROLL):
        dys = ()
        qs = ()
        zs = ()
        for u in tl.static_range(UNROLL):
            t = t0 + i + u
            dys = dys + (_tile(dy_ptr, b, sdb, sdl, t, offs_d, mask_d),)
            qs = qs + (_tile(q_ptr, b, sqb, sql, t, offs_d, mask_d),)
            zs = zs + (_tile(k_ptr, b, skb, skl, t, offs_d, mask_d) * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d),)
        for u in tl.static_range(UNROLL):
            g = dys[u] * qs[u]
            sig = _decay_add_each(sig, lam, s, N)
            s = _decay_add(s, lam, zs[u], N)
            acc_r = _accumulate(acc_r, g, s, N)
            acc_l = _accumulate(acc_l, g, sig, N)
            acc_skip += g * zs[u]
            dq = dys[u] * (_weighted_sum(res, s, N) + skip * zs[u])
            tl.store(_out_ptrs(dq_ptr, b, L, D, t0 + i + u, offs_d), dq.to(dq_ptr.dtype.element_ty), mask=mask_d)
    for i in range(n_full, n):
        t = t0 + i
        dy = _tile(dy_ptr, b, sdb, sdl, t, offs_d, mask_d)
        g = dy * _tile(q_ptr, b, sqb, sql, t, offs_d, mask_d)
        z = _tile(k_ptr, b, skb, skl, t, offs_d, mask_d) * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d)
        sig = _decay_add_each(sig, lam, s, N)
        s = _decay_add(s, lam, z, N)
        acc_r = _accumulate(acc_r, g, s, N)
        acc_l = _accumulate(acc_l, g, sig, N)
        acc_skip += g * z
        dq = dy * (_weighted_sum(res, s, N) + skip * z)
        tl.store(_out_ptrs(dq_ptr, b, L, D, t, offs_d), dq.to(dq_ptr.dtype.element_ty), mask=mask_d)
    part = b * n_chunks + c
    _store_state(dr_part_ptr + part * N * D, D, offs_d, mask_d, acc_r, N)
    for m in tl.static_range(N):  # d lambda_n = R_n sum_t g sigma_n
        tl.store(dlam_part_ptr + part * N * D + m * D + offs_d, res[m] * acc_l[m], mask=mask_d)
    tl.store(dskip_part_ptr + part * D + offs_d, acc_skip, mask=mask_d)


@triton.jit
def _chunk_dkv_kernel(dy_ptr, q_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, lp_ptr, r_ptr, bias_ptr, p_ptr,
                      L, D, T, n_chunks, sdb, sdl, sqb, sql, skb, skl, svb, svl,
                      N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``dz = sum_n a_n + Dskip g``, ``dk = dz v``, ``dv = dz k``, backward over each chunk from its carry."""
    pid = tl.program_id(0)
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_decays(lp_ptr, offs_d, mask_d, N)
    res = _load_residues(r_ptr, offs_d, mask_d, N)
    skip = _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    carry = _load_state(p_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, N)
    t0 = c * T
    n = tl.minimum(T, L - t0)
    n_full = n - n % UNROLL
    for i in range(n - 1, n_full - 1, -1):
        t = t0 + i
        g = _tile(dy_ptr, b, sdb, sdl, t, offs_d, mask_d) * _tile(q_ptr, b, sqb, sql, t, offs_d, mask_d)
        a = _accumulate(carry, g, res, N)
        dz = a[0]
        for m in tl.static_range(1, N):
            dz += a[m]
        dz += skip * g
        carry = _scale(a, lam, N)
        tl.store(_out_ptrs(dk_ptr, b, L, D, t, offs_d),
                 (dz * _tile(v_ptr, b, svb, svl, t, offs_d, mask_d)).to(dk_ptr.dtype.element_ty), mask=mask_d)
        tl.store(_out_ptrs(dv_ptr, b, L, D, t, offs_d),
                 (dz * _tile(k_ptr, b, skb, skl, t, offs_d, mask_d)).to(dv_ptr.dtype.element_ty), mask=mask_d)
    for i in range(n_full - UNROLL, -1, -UNROLL):
        gs = ()
        ks = ()
        vs = ()
        for u in tl.static_range(UNROLL):
            t = t0 + i + UNROLL - 1 - u
            gs = gs + (_tile(dy_ptr, b, sdb, sdl, t, offs_d, mask_d) * _tile(q_ptr, b, sqb, sql, t, offs_d, mask_d),)
            ks = ks + (_tile(k_ptr, b, skb, skl, t, offs_d, mask_d),)
            vs = vs + (_tile(v_ptr, b, svb, svl, t, offs_d, mask_d),)
        for u in tl.static_range(UNROLL):
            t = t0 + i + UNROLL - 1 - u
            a = _accumulate(carry, gs[u], res, N)
            dz = a[0]
            for m in tl.static_range(1, N):
                dz += a[m]
            dz += skip * gs[u]
            carry = _scale(a, lam, N)
            tl.store(_out_ptrs(dk_ptr, b, L, D, t, offs_d), (dz * vs[u]).to(dk_ptr.dtype.element_ty), mask=mask_d)
            tl.store(_out_ptrs(dv_ptr, b, L, D, t, offs_d), (dz * ks[u]).to(dv_ptr.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------------------------------------------- launchers

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COMBINE_BLOCK, _COMBINE_UNROLL = 256, 8


@dataclass(frozen=True)
class ModalConfig:
    """Launch parameters of one chunk kernel.

    Attributes:
        block_d: channels per program (1 or 2 per thread is the intended range).
        num_warps: warps per program.
        unroll: tokens whose loads are issued before their sequential updates (divides the chunk length).
    """

    block_d: int
    num_warps: int
    unroll: int


# Defaults first (used without autotuning); the alternatives trade registers for bytes in flight.
_STATE_CONFIGS = (ModalConfig(128, 4, 8), ModalConfig(256, 4, 8), ModalConfig(128, 4, 4))
_OUTPUT_CONFIGS = (ModalConfig(128, 4, 4), ModalConfig(128, 4, 8), ModalConfig(256, 4, 4))
_DQ_CONFIGS = (ModalConfig(128, 4, 4), ModalConfig(64, 2, 4), ModalConfig(128, 4, 2))
_DKV_CONFIGS = (ModalConfig(128, 4, 4), ModalConfig(128, 4, 8), ModalConfig(256, 4, 4))
_MAX_UNROLL = 8


@dataclass(frozen=True)
class ModalPlan:
    """How one call is cut into chunks: every kernel of the forward and backward uses the same chunks.

    Attributes:
        chunk: tokens per chunk T (a power of two, at least ``_MAX_UNROLL``).
        n_chunks: ``ceil(L / T)``.
    """

    chunk: int
    n_chunks: int


def plan_chunks(B: int, L: int, D: int, device: torch.device) -> ModalPlan:
    """Chunks for about 16 programs of 128 channels per multiprocessor (enough waves to balance the load),
    at least 128 tokens each (the per-program set-up, 3N vectors, is then a small share)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        min_chunk = 128
    else:  # the interpreter: few, short programs
        sms, min_chunk = 1, _MAX_UNROLL
    want = max(1, (16 * sms) // (B * triton.cdiv(D, 128)))
    chunk = max(min_chunk, triton.next_power_of_2(triton.cdiv(max(L, 1), want)))
    return ModalPlan(chunk, triton.cdiv(L, chunk))


def _block_d(cfg: ModalConfig, D: int) -> int:
    return min(cfg.block_d, max(16, triton.next_power_of_2(D)))


def _grid(B: int, D: int, plan: ModalPlan, cfg: ModalConfig) -> tuple[int, int]:
    return B * plan.n_chunks, triton.cdiv(D, _block_d(cfg, D))


def _s(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _state_buffer(B: int, plan: ModalPlan, N: int, D: int, device: torch.device) -> torch.Tensor:
    return torch.empty(B, plan.n_chunks, N, D, device=device, dtype=torch.float32)


def _tuned(name: str, key: tuple, configs: tuple[ModalConfig, ...], launch, device: torch.device) -> None:
    launch(pick_config(name, key, configs, launch, device))


def forward_states(k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor, initial_state: torch.Tensor | None,
                   plan: ModalPlan, sigma: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Start state of every chunk and the final state (and, if ``sigma``, the same for ``d s / d lambda``).

    Returns:
        ``starts [B, n_chunks, N, D]``, ``sigma_starts`` or None, ``final [B, D, N]``, ``sigma_final`` or None
        (all fp32).
    """
    B, L, D = k.shape
    N = log_poles.shape[1]
    dev = k.device
    ends = _state_buffer(B, plan, N, D, dev)
    sig_ends = _state_buffer(B, plan, N, D, dev) if sigma else None
    final = torch.empty(B, D, N, device=dev, dtype=torch.float32)
    sig_final = torch.empty_like(final) if sigma else None
    key = (B, L, D, N, k.dtype, plan, sigma, _s(k), _s(v))

    def launch(cfg: ModalConfig) -> None:
        _chunk_state_kernel[_grid(B, D, plan, cfg)](
            k, v, log_poles, ends, sig_ends if sigma else ends, L, D, plan.chunk, plan.n_chunks, *_s(k), *_s(v),
            N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll, SIGMA=sigma, num_warps=cfg.num_warps)

    _tuned("modal_state", key, _STATE_CONFIGS, launch, dev)
    s0 = initial_state if initial_state is not None else final
    _combine_kernel[(B, triton.cdiv(N * D, _COMBINE_BLOCK))](
        ends, sig_ends if sigma else ends, log_poles, s0, final, sig_final if sigma else final, L, D, plan.chunk,
        plan.n_chunks, N=N, BLOCK=_COMBINE_BLOCK, UNROLL=_COMBINE_UNROLL, HAS_INIT=initial_state is not None,
        SIGMA=sigma, num_warps=4)
    return ends, sig_ends, final, sig_final


def forward_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor, plan: ModalPlan
                   ) -> torch.Tensor:
    """``y = q (R.s + Dskip z)`` from the chunks' start states; ``[B, L, D]`` in q's dtype (contiguous)."""
    B, L, D = q.shape
    N = log_poles.shape[1]
    y = torch.empty(B, L, D, device=q.device, dtype=q.dtype)
    key = (B, L, D, N, q.dtype, plan, bias is not None, _s(q), _s(k), _s(v))

    def launch(cfg: ModalConfig) -> None:
        _chunk_output_kernel[_grid(B, D, plan, cfg)](
            q, k, v, y, log_poles, residues, bias if bias is not None else residues, starts, L, D, plan.chunk,
            plan.n_chunks, *_s(q), *_s(k), *_s(v), N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll,
            HAS_BIAS=bias is not None, num_warps=cfg.num_warps)

    _tuned("modal_output", key, _OUTPUT_CONFIGS, launch, q.device)
    return y


def adjoint_carries(dy: torch.Tensor, q: torch.Tensor, log_poles: torch.Tensor, residues: torch.Tensor,
                    final_grad: torch.Tensor | None, plan: ModalPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The adjoint carry entering every chunk from the right, and the gradient of the initial state.

    Args:
        final_grad: gradient of the final state ``[B, D, N]`` (None: zero).

    Returns:
        ``carries [B, n_chunks, N, D]`` and ``initial_grad [B, D, N]`` (fp32).
    """
    B, L, D = q.shape
    N = log_poles.shape[1]
    carries = _state_buffer(B, plan, N, D, q.device)
    initial_grad = torch.empty(B, D, N, device=q.device, dtype=torch.float32)
    key = (B, L, D, N, q.dtype, plan, _s(dy), _s(q))

    def launch(cfg: ModalConfig) -> None:
        _chunk_adjoint_kernel[_grid(B, D, plan, cfg)](
            dy, q, log_poles, residues, carries, L, D, plan.chunk, plan.n_chunks, *_s(dy), *_s(q), N=N,
            BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll, num_warps=cfg.num_warps)

    _tuned("modal_adjoint", key, _STATE_CONFIGS, launch, q.device)
    _combine_adjoint_kernel[(B, triton.cdiv(N * D, _COMBINE_BLOCK))](
        carries, log_poles, final_grad if final_grad is not None else initial_grad, initial_grad, L, D, plan.chunk,
        plan.n_chunks, N=N, BLOCK=_COMBINE_BLOCK, UNROLL=_COMBINE_UNROLL, HAS_DSF=final_grad is not None,
        num_warps=4)
    return carries, initial_grad


def input_grads(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                residues: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor, sigma_starts: torch.Tensor,
                carries: torch.Tensor, plan: ModalPlan
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``dq, dk, dv`` (contiguous, inputs' dtype) and fp32 ``d lambda [D, N]``, ``dR [D, N]``, ``dDskip [D]``.

    ``d lambda`` here counts the outputs only; the caller adds the final state's share.
    """
    B, L, D = q.shape
    N = log_poles.shape[1]
    dev = q.device
    dq = torch.empty(B, L, D, device=dev, dtype=q.dtype)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    parts = B * plan.n_chunks
    dr_part = torch.empty(parts, N, D, device=dev, dtype=torch.float32)
    dlam_part = torch.empty_like(dr_part)
    dskip_part = torch.empty(parts, D, device=dev, dtype=torch.float32)
    bias_arg = bias if bias is not None else residues
    strides = (*_s(dy), *_s(q), *_s(k), *_s(v))
    key = (B, L, D, N, q.dtype, plan, bias is not None, strides)

    def launch_dq(cfg: ModalConfig) -> None:
        _chunk_dq_kernel[_grid(B, D, plan, cfg)](
            dy, q, k, v, dq, log_poles, residues, bias_arg, starts, sigma_starts, dr_part, dlam_part, dskip_part, L,
            D, plan.chunk, plan.n_chunks, *strides, N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll,
            HAS_BIAS=bias is not None, num_warps=cfg.num_warps)

    def launch_dkv(cfg: ModalConfig) -> None:
        _chunk_dkv_kernel[_grid(B, D, plan, cfg)](
            dy, q, k, v, dk, dv, log_poles, residues, bias_arg, carries, L, D, plan.chunk, plan.n_chunks, *strides,
            N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll, HAS_BIAS=bias is not None, num_warps=cfg.num_warps)

    _tuned("modal_dq", key, _DQ_CONFIGS, launch_dq, dev)
    _tuned("modal_dkv", key, _DKV_CONFIGS, launch_dkv, dev)
    dlam = sum_partials(dlam_part).t().contiguous()
    dr = sum_partials(dr_part).t().contiguous()
    dskip = sum_partials(dskip_part) if bias is not None else None
    return dq, dk, dv, dlam, dr, dskip


# ---------------------------------------------------------------------------------------------------- autograd


class GatedModalConv(torch.autograd.Function):
    """Autograd of the modal recurrence: gradients to q, k, v, log_poles, residues, bias, initial state."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                residues: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (channel_stride_one(x) for x in (q, k, v))
        lp = log_poles.float().contiguous()
        res = residues.float().contiguous()
        b = bias.contiguous() if bias is not None else None
        s0 = initial_state.float().contiguous() if initial_state is not None else None
        B, L, D = q.shape
        plan = plan_chunks(B, L, D, q.device)
        need_grad = any(ctx.needs_input_grad)
        starts, sig_starts, final, sig_final = forward_states(k, v, lp, s0, plan, sigma=need_grad)
        y = forward_output(q, k, v, lp, res, b, starts, plan)
        if need_grad:
            ctx.save_for_backward(q, k, v, lp, res, b, starts, sig_starts, sig_final)
            ctx.plan = plan
            ctx.dtypes = (log_poles.dtype, residues.dtype, bias.dtype if bias is not None else None)
        return y, final

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dfinal: torch.Tensor | None):
        q, k, v, lp, res, b, starts, sig_starts, sig_final = ctx.saved_tensors
        plan = ctx.plan
        dy = channel_stride_one(dy) if dy is not None else torch.zeros_like(q)
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        carries, ds0 = adjoint_carries(dy, q, lp, res, dfinal, plan)
        dq, dk, dv, dlam, dr, dskip = input_grads(dy, q, k, v, lp, res, b, starts, sig_starts, carries, plan)
        if dfinal is not None:  # the final state depends on lambda through sigma_final
            dlam = dlam + (dfinal * sig_final).sum(0)
        dlp = dlam * torch.exp(lp)  # d/d log lambda = lambda d/d lambda
        lp_dtype, r_dtype, b_dtype = ctx.dtypes
        return (dq, dk, dv, dlp.to(lp_dtype), dr.to(r_dtype), dskip.to(b_dtype) if dskip is not None else None,
                ds0 if ctx.needs_input_grad[6] else None)


def gated_modal_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                            residues: torch.Tensor, bias: torch.Tensor | None = None,
                            initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton modal recurrence; returns ``(y, final_state)``. float64 and empty inputs use the reference."""
    if q.dtype not in _TRITON_DTYPES or q.shape[0] == 0 or q.shape[1] == 0:
        from sh2.kernels.reference import gated_modal_conv_ref

        return gated_modal_conv_ref(q, k, v, log_poles, residues, bias, initial_state, return_state=True)
    return GatedModalConv.apply(q, k, v, log_poles, residues, bias, initial_state)


__all__ = ["gated_modal_conv_triton", "plan_chunks", "ModalPlan", "forward_states", "forward_output",
           "adjoint_carries", "input_grads"]
