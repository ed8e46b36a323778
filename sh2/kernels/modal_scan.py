"""Triton kernels of the Hyena-LI modal recurrence (see :mod:`sh2.kernels.modal_conv` for the algorithm).

Layout conventions shared by every kernel:

- activations ``[B, L, D]`` with channel stride 1 (batch and token strides are arguments; outputs have
  token stride D, any batch stride, so they can be views of a longer sequence);
- parameters ``log_poles``, ``residues`` in ``[D, N]``;
- per-chunk state buffers ``[B, n_chunks, N, D]`` fp32 (one contiguous ``[N, D]`` slab per chunk, so a program
  stores each pole's vector of channels in one coalesced row);
- public states (initial, final, their gradients) ``[B, D, N]`` fp32.

A program owns ``BLOCK_D`` channels of one chunk. The N states of a channel live in registers as N separate
vectors (tuples), so every per-token update is element-wise inside a thread. Rows are addressed by pointers
that advance by the token stride (one 64-bit add per row), and ``UNROLL`` rows are loaded before they are
consumed.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------- helpers


@triton.jit
def _load_poles(ptr, offs_d, mask_d, N: tl.constexpr, EXP: tl.constexpr):
    """N vectors ``ptr[d, n]`` (``exp`` of them if EXP) of the program's channels. Masked channels read 0 (a
    decay of 1 and a residue of 0: finite and never stored)."""
    out = ()
    for n in tl.static_range(N):
        x = tl.load(ptr + offs_d * N + n, mask=mask_d, other=0.0).to(tl.float32)
        out = out + ((tl.exp(x) if EXP else x),)
    return out


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
def _load_slab(ptr, D, offs_d, mask_d, N: tl.constexpr):
    """The N vectors of an ``[N, D]`` slab."""
    out = ()
    for n in tl.static_range(N):
        out = out + (tl.load(ptr + n * D + offs_d, mask=mask_d, other=0.0),)
    return out


@triton.jit
def _store_slab(ptr, D, offs_d, mask_d, x, N: tl.constexpr):
    for n in tl.static_range(N):
        tl.store(ptr + n * D + offs_d, x[n], mask=mask_d)


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
    """``sum_n w_n x_n`` as two interleaved chains (half the dependent-latency of one chain)."""
    even = w[0] * x[0]
    odd = tl.zeros_like(even)
    for n in tl.static_range(1, N):
        if n % 2 == 0:
            even += w[n] * x[n]
        else:
            odd += w[n] * x[n]
    return even + odd


@triton.jit
def _sum(x, N: tl.constexpr):
    acc = x[0]
    for n in tl.static_range(1, N):
        acc += x[n]
    return acc


@triton.jit
def _row(ptr, b, stride_b, stride_l, t, offs_d):
    """Pointers of row ``t`` of batch ``b`` of a ``[B, L, D]`` tensor with channel stride 1."""
    return ptr + b * stride_b + t.to(tl.int64) * stride_l + offs_d


@triton.jit
def _ld(p, mask_d):
    return tl.load(p, mask=mask_d, other=0.0).to(tl.float32)


@triton.jit
def _rows(p, step, mask, UNROLL: tl.constexpr):
    """``UNROLL`` rows ``p + u * step`` as fp32 (step is a signed token stride)."""
    out = ()
    for u in tl.static_range(UNROLL):
        out = out + (tl.load(p + u * step, mask=mask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _mul(a, b, UNROLL: tl.constexpr):
    out = ()
    for u in tl.static_range(UNROLL):
        out = out + (a[u] * b[u],)
    return out


@triton.jit
def _chunk_of(pid, n_chunks, L, T, UNROLL: tl.constexpr):
    """(batch, chunk, first token, tokens, tokens in whole unrolled steps) of a program."""
    b = (pid // n_chunks).to(tl.int64)
    c = pid % n_chunks
    t0 = c * T
    n = tl.minimum(T, L - t0)
    return b, c, t0, n, n - n % UNROLL


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def chunk_state_kernel(k_ptr, v_ptr, lp_ptr, e_ptr, es_ptr, L, T, n_chunks, skb, svb, D: tl.constexpr,
                       skl: tl.constexpr, svl: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr,
                       UNROLL: tl.constexpr, SIGMA: tl.constexpr):
    """End state of each chunk from a zero start (and, if SIGMA, of ``sigma = ds/dlambda``) into ``e``/``es``."""
    b, c, t0, n, n_full = _chunk_of(tl.program_id(0), n_chunks, L, T, UNROLL)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_poles(lp_ptr, offs_d, mask_d, N, True)
    s = _zeros(BLOCK_D, N)
    sig = _zeros(BLOCK_D, N)
    pk = _row(k_ptr, b, skb, skl, t0, offs_d)
    pv = _row(v_ptr, b, svb, svl, t0, offs_d)
    # rows of the next unrolled step are loaded before this step's updates (software pipelining)
    nk = _rows(pk, skl, mask_d & (offs_d * 0 < n_full), UNROLL)
    nv = _rows(pv, svl, mask_d & (offs_d * 0 < n_full), UNROLL)
    for i in range(0, n_full, UNROLL):
        zs = _mul(nk, nv, UNROLL)
        pk += UNROLL * skl
        pv += UNROLL * svl
        more = mask_d & (offs_d * 0 + i + UNROLL < n_full)  # (vector: the interpreter rejects scalar masks)
        nk = _rows(pk, skl, more, UNROLL)
        nv = _rows(pv, svl, more, UNROLL)
        for u in tl.static_range(UNROLL):
            if SIGMA:
                sig = _decay_add_each(sig, lam, s, N)
            s = _decay_add(s, lam, zs[u], N)
    for _i in range(n_full, n):
        z = _ld(pk, mask_d) * _ld(pv, mask_d)
        pk += skl
        pv += svl
        if SIGMA:
            sig = _decay_add_each(sig, lam, s, N)
        s = _decay_add(s, lam, z, N)
    slab = (b * n_chunks + c) * N * D
    _store_slab(e_ptr + slab, D, offs_d, mask_d, s, N)
    if SIGMA:
        _store_slab(es_ptr + slab, D, offs_d, mask_d, sig, N)


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def combine_kernel(e_ptr, es_ptr, lp_ptr, s0_ptr, sf_ptr, sigf_ptr, L, D, T, n_chunks,
                   N: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, HAS_INIT: tl.constexpr,
                   SIGMA: tl.constexpr):
    """Scan the chunk end states left to right, leaving each chunk's start state (and sigma) in their place.

    ``S_{c+1} = lambda^T S_c + E_c`` and ``Sigma_{c+1} = lambda^T Sigma_c + T lambda^(T-1) S_c + E^sigma_c``. Lanes
    are (pole, channel) pairs ``j = n * D + d`` of batch ``program_id(0)``. ``UNROLL`` chunks are loaded before
    they are scanned: the scan waits on memory once per ``UNROLL`` chunks.
    """
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N * D
    n = j // D
    d = j % D
    lp = tl.load(lp_ptr + d * N + n, mask=mask, other=0.0).to(tl.float32)
    last = L - (n_chunks - 1) * T
    pw_full = tl.exp(lp * T)
    dpw_full = T * tl.exp(lp * (T - 1))  # d(lambda^T) / d lambda, from exp: no negative powers
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
            m = mask & (j * 0 + c0 + u < n_chunks)  # (vector masks: the interpreter rejects scalar ones)
            es = es + (tl.load(e_ptr + base + (c0 + u) * N * D, mask=m, other=0.0),)
            if SIGMA:
                ss = ss + (tl.load(es_ptr + base + (c0 + u) * N * D, mask=m, other=0.0),)
        for u in tl.static_range(UNROLL):
            c = j * 0 + c0 + u
            live = c < n_chunks  # the unrolled tail past the last chunk leaves the scan unchanged
            tl.store(e_ptr + base + c * N * D, s, mask=mask & live)
            is_last = c == n_chunks - 1
            pw = tl.where(is_last, pw_last, pw_full)
            if SIGMA:
                tl.store(es_ptr + base + c * N * D, sig, mask=mask & live)
                sig = tl.where(live, pw * sig + tl.where(is_last, dpw_last, dpw_full) * s + ss[u], sig)
            s = tl.where(live, pw * s + es[u], s)
    tl.store(sf_ptr + state_idx, s, mask=mask)
    if SIGMA:
        tl.store(sigf_ptr + state_idx, sig, mask=mask)


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def chunk_output_kernel(q_ptr, k_ptr, v_ptr, y_ptr, lp_ptr, r_ptr, bias_ptr, s_ptr, L, T, n_chunks, sqb, skb, svb, syb,
                        D: tl.constexpr, sql: tl.constexpr, skl: tl.constexpr, svl: tl.constexpr,
                        N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y = q (R.s + Dskip z)`` over each chunk from its true start state; y has token stride D."""
    b, c, t0, n, n_full = _chunk_of(tl.program_id(0), n_chunks, L, T, UNROLL)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_poles(lp_ptr, offs_d, mask_d, N, True)
    res = _load_poles(r_ptr, offs_d, mask_d, N, False)
    skip = _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    s = _load_slab(s_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, N)
    pq = _row(q_ptr, b, sqb, sql, t0, offs_d)
    pk = _row(k_ptr, b, skb, skl, t0, offs_d)
    pv = _row(v_ptr, b, svb, svl, t0, offs_d)
    py = _row(y_ptr, b, syb, D, t0, offs_d)
    nq = _rows(pq, sql, mask_d & (offs_d * 0 < n_full), UNROLL)
    nk = _rows(pk, skl, mask_d & (offs_d * 0 < n_full), UNROLL)
    nv = _rows(pv, svl, mask_d & (offs_d * 0 < n_full), UNROLL)
    for i in range(0, n_full, UNROLL):
        qs = nq
        zs = _mul(nk, nv, UNROLL)
        pq += UNROLL * sql
        pk += UNROLL * skl
        pv += UNROLL * svl
        more = mask_d & (offs_d * 0 + i + UNROLL < n_full)  # (vector: the interpreter rejects scalar masks)
        nq = _rows(pq, sql, more, UNROLL)
        nk = _rows(pk, skl, more, UNROLL)
        nv = _rows(pv, svl, more, UNROLL)
        for u in tl.static_range(UNROLL):
            s = _decay_add(s, lam, zs[u], N)
            y = qs[u] * (_weighted_sum(res, s, N) + skip * zs[u])
            tl.store(py + u * D, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        py += UNROLL * D
    for _i in range(n_full, n):
        z = _ld(pk, mask_d) * _ld(pv, mask_d)
        s = _decay_add(s, lam, z, N)
        y = _ld(pq, mask_d) * (_weighted_sum(res, s, N) + skip * z)
        tl.store(py, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        pq += sql
        pk += skl
        pv += svl
        py += D


# --------------------------------------------------------------------------------------------------- backward
# With g = dy q, the adjoint of the states is a_n[t] = R_n r_n[t] + lambda_n^(L-1-t) dS_final_n, where
# r_n[t] = g[t] + lambda_n r_n[t+1] runs backwards from r_n[L] = 0. The kernels scan r (one multiply-add per
# pole); the final-state term is added where it is used.


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def chunk_adjoint_kernel(dy_ptr, q_ptr, lp_ptr, f_ptr, L, T, n_chunks, sdb, sqb, D: tl.constexpr,
                         sdl: tl.constexpr, sql: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UNROLL: tl.constexpr):
    """r at each chunk's first token, walking the chunk backwards from a zero right boundary, into ``f``."""
    b, c, t0, n, n_full = _chunk_of(tl.program_id(0), n_chunks, L, T, UNROLL)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_poles(lp_ptr, offs_d, mask_d, N, True)
    r = _zeros(BLOCK_D, N)
    pd = _row(dy_ptr, b, sdb, sdl, t0 + n - 1, offs_d)
    pq = _row(q_ptr, b, sqb, sql, t0 + n - 1, offs_d)
    for _i in range(n_full, n):  # the ragged end of the last chunk first, one token at a time
        r = _decay_add(r, lam, _ld(pd, mask_d) * _ld(pq, mask_d), N)
        pd -= sdl
        pq -= sql
    nd = _rows(pd, -sdl, mask_d & (offs_d * 0 < n_full), UNROLL)
    nq = _rows(pq, -sql, mask_d & (offs_d * 0 < n_full), UNROLL)
    for i in range(0, n_full, UNROLL):
        gs = _mul(nd, nq, UNROLL)
        pd -= UNROLL * sdl
        pq -= UNROLL * sql
        more = mask_d & (offs_d * 0 + i + UNROLL < n_full)  # (vector: the interpreter rejects scalar masks)
        nd = _rows(pd, -sdl, more, UNROLL)
        nq = _rows(pq, -sql, more, UNROLL)
        for u in tl.static_range(UNROLL):
            r = _decay_add(r, lam, gs[u], N)
    _store_slab(f_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, r, N)


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def combine_adjoint_kernel(f_ptr, lp_ptr, r0_ptr, L, D, T, n_chunks,
                           N: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """Scan the chunks' r right to left: leave in each chunk's place r just past its last token (its carry),
    and write r at token 0 (``[B, D, N]``), from which the initial state's gradient follows."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < N * D
    n = j // D
    d = j % D
    lp = tl.load(lp_ptr + d * N + n, mask=mask, other=0.0).to(tl.float32)
    last = L - (n_chunks - 1) * T
    pw_full = tl.exp(lp * T)
    pw_last = tl.exp(lp * last)
    r = tl.zeros((BLOCK,), dtype=tl.float32)
    base = b * n_chunks * N * D + j
    for c0 in range(0, n_chunks, UNROLL):
        fs = ()
        for u in tl.static_range(UNROLL):
            c = j * 0 + n_chunks - 1 - (c0 + u)
            fs = fs + (tl.load(f_ptr + base + c * N * D, mask=mask & (c >= 0), other=0.0),)
        for u in tl.static_range(UNROLL):
            c = j * 0 + n_chunks - 1 - (c0 + u)
            tl.store(f_ptr + base + c * N * D, r, mask=mask & (c >= 0))
            r = tl.where(c >= 0, tl.where(c == n_chunks - 1, pw_last, pw_full) * r + fs[u], r)
    tl.store(r0_ptr + (b * D + d) * N + n, r, mask=mask)


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def chunk_dq_kernel(dy_ptr, q_ptr, k_ptr, v_ptr, dq_ptr, lp_ptr, r_ptr, bias_ptr, s_ptr, sig_ptr,
                    dlam_part_ptr, dskip_part_ptr, L, T, n_chunks, sdb, sqb, skb, svb, sob, D: tl.constexpr,
                    sdl: tl.constexpr, sql: tl.constexpr, skl: tl.constexpr, svl: tl.constexpr, N: tl.constexpr,
                    BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Forward over each chunk from its start state and sigma: ``dq = dy (R.s + Dskip z)`` and per-program
    partials ``d lambda_n = R_n sum g sigma_n`` and ``dDskip = sum g z``."""
    b, c, t0, n, n_full = _chunk_of(tl.program_id(0), n_chunks, L, T, UNROLL)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_poles(lp_ptr, offs_d, mask_d, N, True)
    res = _load_poles(r_ptr, offs_d, mask_d, N, False)
    skip = _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    slab = (b * n_chunks + c) * N * D
    s = _load_slab(s_ptr + slab, D, offs_d, mask_d, N)
    sig = _load_slab(sig_ptr + slab, D, offs_d, mask_d, N)
    acc_l = _zeros(BLOCK_D, N)
    acc_skip = tl.zeros((BLOCK_D,), dtype=tl.float32)
    pd = _row(dy_ptr, b, sdb, sdl, t0, offs_d)
    pq = _row(q_ptr, b, sqb, sql, t0, offs_d)
    pk = _row(k_ptr, b, skb, skl, t0, offs_d)
    pv = _row(v_ptr, b, svb, svl, t0, offs_d)
    pdq = _row(dq_ptr, b, sob, D, t0, offs_d)
    first = mask_d & (offs_d * 0 < n_full)
    nd = _rows(pd, sdl, first, UNROLL)
    nq = _rows(pq, sql, first, UNROLL)
    nk = _rows(pk, skl, first, UNROLL)
    nv = _rows(pv, svl, first, UNROLL)
    for i in range(0, n_full, UNROLL):
        dys = nd
        gs = _mul(nd, nq, UNROLL)
        zs = _mul(nk, nv, UNROLL)
        pd += UNROLL * sdl
        pq += UNROLL * sql
        pk += UNROLL * skl
        pv += UNROLL * svl
        more = mask_d & (offs_d * 0 + i + UNROLL < n_full)  # (vector: the interpreter rejects scalar masks)
        nd = _rows(pd, sdl, more, UNROLL)
        nq = _rows(pq, sql, more, UNROLL)
        nk = _rows(pk, skl, more, UNROLL)
        nv = _rows(pv, svl, more, UNROLL)
        for u in tl.static_range(UNROLL):
            sig = _decay_add_each(sig, lam, s, N)
            s = _decay_add(s, lam, zs[u], N)
            acc_l = _accumulate(acc_l, gs[u], sig, N)
            acc_skip += gs[u] * zs[u]
            dq = dys[u] * (_weighted_sum(res, s, N) + skip * zs[u])
            tl.store(pdq + u * D, dq.to(dq_ptr.dtype.element_ty), mask=mask_d)
        pdq += UNROLL * D
    for _i in range(n_full, n):
        dy = _ld(pd, mask_d)
        g = dy * _ld(pq, mask_d)
        z = _ld(pk, mask_d) * _ld(pv, mask_d)
        sig = _decay_add_each(sig, lam, s, N)
        s = _decay_add(s, lam, z, N)
        acc_l = _accumulate(acc_l, g, sig, N)
        acc_skip += g * z
        dq = dy * (_weighted_sum(res, s, N) + skip * z)
        tl.store(pdq, dq.to(dq_ptr.dtype.element_ty), mask=mask_d)
        pd += sdl
        pq += sql
        pk += skl
        pv += svl
        pdq += D
    part = b * n_chunks + c
    _store_slab(dlam_part_ptr + part * N * D, D, offs_d, mask_d, _scale(acc_l, res, N), N)
    tl.store(dskip_part_ptr + part * D + offs_d, acc_skip, mask=mask_d)


@triton.jit(do_not_specialize=["L", "T", "n_chunks"])
def chunk_dkv_kernel(dy_ptr, q_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, lp_ptr, r_ptr, bias_ptr, c_ptr, dsf_ptr,
                     dr_part_ptr, L, T, n_chunks, sdb, sqb, skb, svb, sob, D: tl.constexpr, sdl: tl.constexpr,
                     sql: tl.constexpr, skl: tl.constexpr, svl: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DSF: tl.constexpr):
    """Backward over each chunk from its carry: ``dz = sum_n a_n + Dskip g``, ``dk = dz v``, ``dv = dz k``, and
    per-program partials ``dR_n = sum z r_n``."""
    b, c, t0, n, n_full = _chunk_of(tl.program_id(0), n_chunks, L, T, UNROLL)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lam = _load_poles(lp_ptr, offs_d, mask_d, N, True)
    res = _load_poles(r_ptr, offs_d, mask_d, N, False)
    skip = _load_skip(bias_ptr, offs_d, mask_d, BLOCK_D, HAS_BIAS)
    r = _load_slab(c_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, N)
    if HAS_DSF:  # u_n = lambda_n^(L-1-t) dS_final_n, starting at the chunk's last token
        logs = _load_poles(lp_ptr, offs_d, mask_d, N, False)
        uf = ()
        for m in tl.static_range(N):
            dsf = tl.load(dsf_ptr + (b * D + offs_d) * N + m, mask=mask_d, other=0.0)
            uf = uf + (tl.exp(logs[m] * (L - t0 - n)) * dsf,)
    else:
        uf = _zeros(BLOCK_D, N)
    acc_r = _zeros(BLOCK_D, N)
    t_end = t0 + n - 1
    pd = _row(dy_ptr, b, sdb, sdl, t_end, offs_d)
    pq = _row(q_ptr, b, sqb, sql, t_end, offs_d)
    pk = _row(k_ptr, b, skb, skl, t_end, offs_d)
    pv = _row(v_ptr, b, svb, svl, t_end, offs_d)
    pdk = _row(dk_ptr, b, sob, D, t_end, offs_d)
    pdv = _row(dv_ptr, b, sob, D, t_end, offs_d)
    for _i in range(n_full, n):
        g = _ld(pd, mask_d) * _ld(pq, mask_d)
        k = _ld(pk, mask_d)
        v = _ld(pv, mask_d)
        r = _decay_add(r, lam, g, N)
        dz = _weighted_sum(res, r, N) + skip * g
        if HAS_DSF:
            dz += _sum(uf, N)
            uf = _scale(uf, lam, N)
        acc_r = _accumulate(acc_r, k * v, r, N)
        tl.store(pdk, (dz * v).to(dk_ptr.dtype.element_ty), mask=mask_d)
        tl.store(pdv, (dz * k).to(dv_ptr.dtype.element_ty), mask=mask_d)
        pd -= sdl
        pq -= sql
        pk -= skl
        pv -= svl
        pdk -= D
        pdv -= D
    first = mask_d & (offs_d * 0 < n_full)
    nd = _rows(pd, -sdl, first, UNROLL)
    nq = _rows(pq, -sql, first, UNROLL)
    nk = _rows(pk, -skl, first, UNROLL)
    nv = _rows(pv, -svl, first, UNROLL)
    for i in range(0, n_full, UNROLL):
        gs = _mul(nd, nq, UNROLL)
        ks = nk
        vs = nv
        pd -= UNROLL * sdl
        pq -= UNROLL * sql
        pk -= UNROLL * skl
        pv -= UNROLL * svl
        more = mask_d & (offs_d * 0 + i + UNROLL < n_full)  # (vector: the interpreter rejects scalar masks)
        nd = _rows(pd, -sdl, more, UNROLL)
        nq = _rows(pq, -sql, more, UNROLL)
        nk = _rows(pk, -skl, more, UNROLL)
        nv = _rows(pv, -svl, more, UNROLL)
        for u in tl.static_range(UNROLL):
            r = _decay_add(r, lam, gs[u], N)
            dz = _weighted_sum(res, r, N) + skip * gs[u]
            if HAS_DSF:
                dz += _sum(uf, N)
                uf = _scale(uf, lam, N)
            acc_r = _accumulate(acc_r, ks[u] * vs[u], r, N)
            tl.store(pdk - u * D, (dz * vs[u]).to(dk_ptr.dtype.element_ty), mask=mask_d)
            tl.store(pdv - u * D, (dz * ks[u]).to(dv_ptr.dtype.element_ty), mask=mask_d)
        pdk -= UNROLL * D
        pdv -= UNROLL * D
    _store_slab(dr_part_ptr + (b * n_chunks + c) * N * D, D, offs_d, mask_d, acc_r, N)
