"""Hyena-LI modal filter in Triton: ``h[c, t] = sum_n R[c, n] * exp(p[c, n] * t)``, built tiled.

Each program owns ``BLOCK_D`` channels x ``BLOCK_T`` taps and evaluates the ``[BLOCK_D, N, BLOCK_T]``
exponentials in registers, reducing over the N poles before the store: the ``[D, N, L]`` tensor never
exists in memory. The backward needs the same exponentials:

    dR[c, n] = sum_t dh[c, t] * exp(p t)        dp[c, n] = R[c, n] * sum_t dh[c, t] * t * exp(p t)

Programs walk a segment of the taps for a channel block, accumulate both sums in fp32 registers and
write ``[n_seg, D, N]`` partials that a second kernel reduces. Everything is fp32.

PyTorch sees the kernels as the custom operators ``sh2::modal_filter`` and ``sh2::modal_filter_backward``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sh2.kernels import _tuning
from sh2.kernels._tuning import split_segments


@triton.jit
def _poles(lp_ptr, r_ptr, offs_d, offs_n, D, N):
    m = (offs_d < D)[:, None] & (offs_n < N)[None, :]
    idx = offs_d[:, None] * N + offs_n[None, :]
    lp = tl.load(lp_ptr + idx, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + idx, mask=m, other=0.0).to(tl.float32)
    return lp, r


@triton.jit
def _modal_fwd_kernel(lp_ptr, r_ptr, h_ptr, D, N, L,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    lp, r = _poles(lp_ptr, r_ptr, offs_d, tl.arange(0, BLOCK_N), D, N)
    e = tl.exp(lp[:, :, None] * t.to(tl.float32)[None, None, :])
    h = tl.sum(r[:, :, None] * e, axis=1)
    m = (offs_d < D)[:, None] & (t < L)[None, :]
    tl.store(h_ptr + offs_d.to(tl.int64)[:, None] * L + t[None, :], h, mask=m)


@triton.jit
def _modal_bwd_kernel(lp_ptr, r_ptr, dh_ptr, dlp_part_ptr, dr_part_ptr, D, N, L, tiles_per_prog,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    seg = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    lp, r = _poles(lp_ptr, r_ptr, offs_d, offs_n, D, N)
    acc_r = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    md = (offs_d < D)[:, None]
    for i in range(seg * tiles_per_prog, (seg + 1) * tiles_per_prog):
        t = i * BLOCK_T + tl.arange(0, BLOCK_T)
        tf = t.to(tl.float32)
        dh = tl.load(dh_ptr + offs_d.to(tl.int64)[:, None] * L + t[None, :], mask=md & (t < L)[None, :], other=0.0)
        w = dh[:, None, :] * tl.exp(lp[:, :, None] * tf[None, None, :])
        acc_r += tl.sum(w, axis=2)
        acc_t += tl.sum(w * tf[None, None, :], axis=2)
    m = md & (offs_n < N)[None, :]
    out = seg.to(tl.int64) * D * N + offs_d[:, None] * N + offs_n[None, :]
    tl.store(dr_part_ptr + out, acc_r, mask=m)
    tl.store(dlp_part_ptr + out, acc_t * r, mask=m)


_BLOCK_D, _BLOCK_T = 16, 32


def modal_forward(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> torch.Tensor:
    """Launch the forward kernel on contiguous ``[D, N]`` parameters; returns ``[D, length]`` fp32."""
    D, N = log_poles.shape
    h = _tuning.new_buffer((D, length), torch.float32, log_poles.device)
    if length == 0 or D == 0:
        return h
    grid = (triton.cdiv(D, _BLOCK_D), triton.cdiv(length, _BLOCK_T))
    _modal_fwd_kernel[grid](log_poles, residues, h, D, N, length, BLOCK_D=_BLOCK_D,
                            BLOCK_N=triton.next_power_of_2(N), BLOCK_T=_BLOCK_T, num_warps=4)
    return h


def modal_backward(log_poles: torch.Tensor, residues: torch.Tensor, dh: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d log_poles, d residues)`` in fp32 for a contiguous fp32 ``dh [D, L]``."""
    D, N = log_poles.shape
    L = dh.shape[1]
    if L == 0 or D == 0:
        return torch.zeros(D, N, device=dh.device), torch.zeros(D, N, device=dh.device)
    n_tiles = triton.cdiv(L, _BLOCK_T)
    n_db = triton.cdiv(D, _BLOCK_D)
    # about 1024 programs; each walks a contiguous run of tiles
    tpp, n_seg = split_segments(n_tiles, n_db, 1024)
    dlp_part = _tuning.new_buffer((n_seg, D, N), torch.float32, dh.device)
    dr_part = _tuning.new_buffer((n_seg, D, N), torch.float32, dh.device)
    _modal_bwd_kernel[(n_db, n_seg)](log_poles, residues, dh, dlp_part, dr_part, D, N, L, tpp,
                                     BLOCK_D=_BLOCK_D, BLOCK_N=triton.next_power_of_2(N), BLOCK_T=_BLOCK_T,
                                     num_warps=4)
    return _tuning.sum_partials(dlp_part), _tuning.sum_partials(dr_part)


@torch.library.custom_op("sh2::modal_filter", mutates_args=())
def modal_filter_op(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> torch.Tensor:
    """``h[c, t] = sum_n residues[c, n] exp(log_poles[c, n] t)``, ``[D, length]`` fp32."""
    return modal_forward(log_poles.contiguous(), residues.contiguous(), length)


@modal_filter_op.register_fake
def _(log_poles, residues, length):
    return log_poles.new_empty((log_poles.shape[0], length), dtype=torch.float32)


@torch.library.custom_op("sh2::modal_filter_backward", mutates_args=())
def modal_filter_backward_op(log_poles: torch.Tensor, residues: torch.Tensor, dh: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d log_poles, d residues)`` in the parameters' dtypes."""
    dlp, dr = modal_backward(log_poles.contiguous(), residues.contiguous(), dh.contiguous().float())
    return dlp.to(log_poles.dtype), dr.to(residues.dtype)


@modal_filter_backward_op.register_fake
def _(log_poles, residues, dh):
    return log_poles.new_empty(log_poles.shape), residues.new_empty(residues.shape)


def _setup_context(ctx, inputs, output) -> None:
    log_poles, residues, _ = inputs
    ctx.save_for_backward(log_poles, residues)


def _backward(ctx, dh: torch.Tensor):
    log_poles, residues = ctx.saved_tensors
    dlp, dr = modal_filter_backward_op(log_poles, residues, dh)
    return dlp, dr, None


modal_filter_op.register_autograd(_backward, setup_context=_setup_context)


def modal_filter_triton(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> torch.Tensor:
    """Triton Hyena-LI filter ``h[c, t] = sum_n residues[c, n] * exp(log_poles[c, n] * t)``.

    Args:
        log_poles: ``[D, N]`` fp16/bf16/fp32 (negative values: per-token decay ``exp(log_poles)`` in (0, 1)).
        residues: ``[D, N]``.
        length: number of taps L >= 0.

    Returns:
        ``[D, length]`` float32; differentiable with respect to both parameters.
    """
    return modal_filter_op(log_poles, residues, length)
