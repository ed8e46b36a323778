"""Two-stage blocked FIR kernels for grouped filters, on tensor cores (docs/design.md, "Two-stage blocked
convolution").

The causal convolution of one group of ``dg`` channels is a product with a banded lower-triangular
Toeplitz matrix. Cut the sequence into chunks of ``BLOCK_T = b >= K`` tokens; only two kinds of
``b x b`` blocks are non-zero, built on chip from the taps and reused for every chunk:

    H0[i, j] = h[i - j]      (0 <= i - j < K, the taps inside the chunk)
    H1[i, j] = h[i - j + b]  (i - j + b < K, the taps that spill over from the previous chunk)
    Y_n = H0 @ X_n + H1 @ X_{n-1}

Each product is a ``[b x b] @ [b x BLOCK_C]`` ``tl.dot``. X is ``z = k * v`` computed on the fly, the
Dskip term and the post-gate ``q`` are applied before the single store. Every program walks a segment
of consecutive chunks of one channel tile and carries ``X_{n-1}`` in registers.

Backward (same blocks, transposed):

    dZ_n = H0^T G_n + H1^T G_{n+1},  G = dy * q
    dh[s] = sum_n sum_i (G_n X_n^T)[i, i - s] + (G_n X_{n-1}^T)[i, i - s + b]

:func:`_fir_blocked_bwd_kernel` produces dq, dk, dv and per-program Dskip partials;
:func:`_fir_blocked_dh_kernel` accumulates ``G_n X_n^T`` and ``G_n X_{n-1}^T`` over its segment in two
fp32 ``b x b`` accumulators, merges them (lower triangle from the first, strict upper from the second,
which is exact because ``K <= b``) and reduces the diagonals once with a ``tl.gather``; the per-program
``[K]`` partials are summed by a second kernel. 16-bit inputs feed the tensor cores in their own dtype
with fp32 accumulation; fp32 inputs use exact fp32 dots (``input_precision="ieee"``, no tf32).

Integers derived from the sequence length are not specialised (``do_not_specialize``): Triton would
otherwise compile a separate variant whenever one of them equals 1 (a call of one chunk makes
``n_chunks = chunks_per_prog = n_seg = 1`` constants and the chunk loop disappears, with a different
shared-memory plan), a variant only short calls run and the long-sequence GPU tests never exercise. So
every length runs the same machine code, and lengths share their compilations.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ptrs(base, t, stride_t, offs_c):
    """Pointers of a ``[len(t), len(offs_c)]`` tile of a ``[L, D]`` slice with channel stride 1."""
    return base + t.to(tl.int64)[:, None] * stride_t + offs_c[None, :]


@triton.jit
def _load_tile(base, t, stride_t, offs_c, L):
    """Load a tile as fp32; rows outside ``[0, L)`` read as zero."""
    m = ((t >= 0) & (t < L))[:, None]
    return tl.load(_tile_ptrs(base, t, stride_t, offs_c), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _to_dot(x, dt: tl.constexpr, DOT_F32: tl.constexpr):
    """Round to the input dtype ``dt`` (what the tensor cores consume); keep fp32 storage if DOT_F32.

    DOT_F32 is set under the CPU interpreter, whose 16-bit ``tl.dot`` is unreliable: the operands are
    rounded exactly as on the GPU and then multiplied in fp32.
    """
    y = x.to(dt)
    if DOT_F32:
        y = y.to(tl.float32)
    return y


@triton.jit
def _toeplitz_blocks(h_row, K, BLOCK_T: tl.constexpr, TRANSPOSE: tl.constexpr, dt: tl.constexpr,
                     DOT_F32: tl.constexpr):
    """The on-chip blocks H0, H1 (or their transposes) of one filter, built from its K taps."""
    offs = tl.arange(0, BLOCK_T)
    d = offs[:, None] - offs[None, :]
    if TRANSPOSE:
        d = -d
    h0 = _to_dot(tl.load(h_row + d, mask=(d >= 0) & (d < K), other=0.0), dt, DOT_F32)
    h1 = _to_dot(tl.load(h_row + d + BLOCK_T, mask=(d + BLOCK_T) < K, other=0.0), dt, DOT_F32)
    return h0, h1


@triton.jit
def _store_dh(m0, m1, out, K, BLOCK_T: tl.constexpr):
    """Reduce the diagonals of the merged chunk products into ``dh[s]``, s < K, and store them."""
    offs_t = tl.arange(0, BLOCK_T)
    i = offs_t[:, None]
    j = offs_t[None, :]
    merged = tl.where(j <= i, m0, m1)
    # diagonal s of the chunk product sits at column (i - s) mod b of row i
    diag = tl.gather(merged, (i - j + BLOCK_T) % BLOCK_T, axis=1)
    tl.store(out + offs_t, tl.sum(diag, axis=0), mask=offs_t < K)


@triton.jit
def _program_ids(CH_FAST: tl.constexpr):
    """``(row segment, channel block)`` of this program; CH_FAST puts the channel blocks on grid axis 0.

    Programs are started in grid order, so with the channel blocks on the fast axis the programs that run
    together read neighbouring groups of the same tokens: the 32-byte rows of one group share DRAM pages and
    L2 lines with their neighbours' (docs/design.md, "Two-stage blocked convolution").
    """
    if CH_FAST:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


_SEQ_INTS = ("L", "n_chunks", "chunks_per_prog", "n_seg")


@triton.jit(do_not_specialize=_SEQ_INTS)
def _fir_blocked_fwd_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, bias_ptr, y_ptr,
    L, DG, K, n_chunks, chunks_per_prog, n_seg,
    sqb, sql, skb, skl, svb, svl, syb, syl,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
    DOT_F32: tl.constexpr, CH_FAST: tl.constexpr,
):
    pid, pid_c = _program_ids(CH_FAST)
    b = (pid // n_seg).to(tl.int64)
    seg = pid % n_seg
    c0 = pid_c * BLOCK_C
    dt = q_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    H0, H1 = _toeplitz_blocks(h_ptr + (c0 // DG) * K, K, BLOCK_T, False, dt, DOT_F32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c).to(tl.float32)
    qb = q_ptr + b * sqb
    kb = k_ptr + b * skb
    vb = v_ptr + b * svb
    yb = y_ptr + b * syb
    n0 = seg * chunks_per_prog
    n1 = tl.minimum(n0 + chunks_per_prog, n_chunks)
    t = (n0 - 1) * BLOCK_T + offs_t
    x_prev = _to_dot(_load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L), dt, DOT_F32)
    for n in range(n0, n1):
        t = n * BLOCK_T + offs_t
        z = _load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L)
        x = _to_dot(z, dt, DOT_F32)
        acc = tl.dot(H0, x, input_precision=PREC)
        acc = tl.dot(H1, x_prev, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += bias[None, :] * z
        y = _load_tile(qb, t, sql, offs_c, L) * acc
        tl.store(_tile_ptrs(yb, t, syl, offs_c), y.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None])
        x_prev = x


@triton.jit(do_not_specialize=(*_SEQ_INTS, "n_cb"))
def _fir_blocked_bwd_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, h_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr, db_part_ptr, dh_part_ptr,
    L, D, DG, K, n_chunks, chunks_per_prog, n_seg, n_cb,
    sqb, sql, skb, skl, svb, svl, sdyb, sdyl, sob, sol,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
    DOT_F32: tl.constexpr, FUSE_DH: tl.constexpr, CH_FAST: tl.constexpr,
):
    pid, pid_c = _program_ids(CH_FAST)
    b = (pid // n_seg).to(tl.int64)
    seg = pid % n_seg
    c0 = pid_c * BLOCK_C
    dt = q_ptr.dtype.element_ty
    odt = dq_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    h_row = h_ptr + (c0 // DG) * K
    H0, H1 = _toeplitz_blocks(h_row, K, BLOCK_T, False, dt, DOT_F32)
    H0T, H1T = _toeplitz_blocks(h_row, K, BLOCK_T, True, dt, DOT_F32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c).to(tl.float32)
    qb = q_ptr + b * sqb
    kb = k_ptr + b * skb
    vb = v_ptr + b * svb
    dyb = dy_ptr + b * sdyb
    n0 = seg * chunks_per_prog
    n1 = tl.minimum(n0 + chunks_per_prog, n_chunks)
    t = (n0 - 1) * BLOCK_T + offs_t
    x_prev = _to_dot(_load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L), dt, DOT_F32)
    t = n0 * BLOCK_T + offs_t
    dy_cur = _load_tile(dyb, t, sdyl, offs_c, L)
    g_cur = dy_cur * _load_tile(qb, t, sql, offs_c, L)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if FUSE_DH:
        m0 = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        m1 = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for n in range(n0, n1):
        t = n * BLOCK_T + offs_t
        kk = _load_tile(kb, t, skl, offs_c, L)
        vv = _load_tile(vb, t, svl, offs_c, L)
        z = kk * vv
        x = _to_dot(z, dt, DOT_F32)
        conv = tl.dot(H0, x, input_precision=PREC)
        conv = tl.dot(H1, x_prev, conv, input_precision=PREC)
        t_next = t + BLOCK_T
        dy_next = _load_tile(dyb, t_next, sdyl, offs_c, L)
        g_next = dy_next * _load_tile(qb, t_next, sql, offs_c, L)
        g_dot = _to_dot(g_cur, dt, DOT_F32)
        if FUSE_DH:
            m0 = tl.dot(g_dot, tl.trans(x), m0, input_precision=PREC)
            m1 = tl.dot(g_dot, tl.trans(x_prev), m1, input_precision=PREC)
        dz = tl.dot(H0T, g_dot, input_precision=PREC)
        dz = tl.dot(H1T, _to_dot(g_next, dt, DOT_F32), dz, input_precision=PREC)
        if HAS_BIAS:
            conv += bias[None, :] * z
            dz += bias[None, :] * g_cur
            db_acc += tl.sum(g_cur * z, axis=0)
        m = (t < L)[:, None]
        ob = b * sob
        tl.store(_tile_ptrs(dq_ptr + ob, t, sol, offs_c), (dy_cur * conv).to(odt), mask=m)
        tl.store(_tile_ptrs(dk_ptr + ob, t, sol, offs_c), (dz * vv).to(odt), mask=m)
        tl.store(_tile_ptrs(dv_ptr + ob, t, sol, offs_c), (dz * kk).to(odt), mask=m)
        x_prev = x
        g_cur = g_next
        dy_cur = dy_next
    if HAS_BIAS:
        tl.store(db_part_ptr + pid.to(tl.int64) * D + offs_c, db_acc)
    if FUSE_DH:
        _store_dh(m0, m1, dh_part_ptr + (pid.to(tl.int64) * n_cb + pid_c) * K, K, BLOCK_T)


@triton.jit(do_not_specialize=(*_SEQ_INTS, "n_cb"))
def _fir_blocked_dh_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dh_part_ptr,
    L, K, n_chunks, chunks_per_prog, n_seg, n_cb,
    sqb, sql, skb, skl, svb, svl, sdyb, sdyl,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
    DOT_F32: tl.constexpr, CH_FAST: tl.constexpr,
):
    pid, pid_c = _program_ids(CH_FAST)
    b = (pid // n_seg).to(tl.int64)
    seg = pid % n_seg
    c0 = pid_c * BLOCK_C
    dt = q_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    qb = q_ptr + b * sqb
    kb = k_ptr + b * skb
    vb = v_ptr + b * svb
    dyb = dy_ptr + b * sdyb
    n0 = seg * chunks_per_prog
    n1 = tl.minimum(n0 + chunks_per_prog, n_chunks)
    t = (n0 - 1) * BLOCK_T + offs_t
    x_prev = _to_dot(_load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L), dt, DOT_F32)
    m0 = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    m1 = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for n in range(n0, n1):
        t = n * BLOCK_T + offs_t
        x = _to_dot(_load_tile(kb, t, skl, offs_c, L) * _load_tile(vb, t, svl, offs_c, L), dt, DOT_F32)
        g = _to_dot(_load_tile(dyb, t, sdyl, offs_c, L) * _load_tile(qb, t, sql, offs_c, L), dt, DOT_F32)
        m0 = tl.dot(g, tl.trans(x), m0, input_precision=PREC)
        m1 = tl.dot(g, tl.trans(x_prev), m1, input_precision=PREC)
        x_prev = x
    _store_dh(m0, m1, dh_part_ptr + (pid.to(tl.int64) * n_cb + pid_c) * K, K, BLOCK_T)


def max_block_t(fp32: bool) -> int:
    """Largest chunk: 128, or 64 for fp32 (four fp32 128 x 128 blocks exceed the shared memory)."""
    return 64 if fp32 else 128


def blocked_supported(dg: int, K: int, fp32: bool = False) -> bool:
    """Whether the blocked kernels apply: channel groups in multiples of 16, ``2 <= K <= b_max``."""
    return dg % 16 == 0 and 2 <= K <= max_block_t(fp32)


def block_t_candidates(K: int, fp32: bool = False) -> list[int]:
    """Chunk lengths b with K <= b <= b_max (b >= 16 for the tensor cores)."""
    b = max(16, triton.next_power_of_2(K))
    out = []
    while b <= max_block_t(fp32):
        out.append(b)
        b *= 2
    return out
