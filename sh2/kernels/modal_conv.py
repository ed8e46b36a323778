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
keeps enough bytes in flight to stream at memory speed. Kernels: :mod:`sh2.kernels.modal_scan`.

forward
  1. ``chunk_state_kernel``: each chunk from a zero state; its end state (and, when gradients are needed, the
     end value of ``sigma = ds/dlambda``, the recurrence ``sigma <- lambda sigma + s``). Reads k, v.
  2. ``combine_kernel``: a scan over the chunk end states, ``S_{c+1} = lambda^T S_c + E_c`` (sigma gains
     ``T lambda^(T-1) S_c``), leaving each chunk's true start state and the final state. Powers come from
     ``exp(T log lambda)``; ``lambda^(-T)`` never appears.
  3. ``chunk_output_kernel``: each chunk again from its true start state, writing y. Reads q, k, v.
backward (``g = dy q``; the states' adjoint is ``a_n[t] = R_n r_n[t] + lambda_n^(L-1-t) dS_final_n`` with the
reverse recurrence ``r_n[t] = g[t] + lambda_n r_n[t+1]``)
  1. ``chunk_adjoint_kernel``: r of each chunk from a zero right boundary, walking backwards. Reads dy, q.
  2. ``combine_adjoint_kernel``: the right-to-left scan of those, leaving each chunk's r from the right and r at
     token 0 (the initial state's gradient is ``lambda (R r[0]) + lambda^L dS_final``).
  3. ``chunk_dq_kernel``: forward over each chunk from its start state and sigma: ``dq = dy (R.s + Dskip z)``,
     partial sums ``dlambda_n = R_n sum g sigma_n`` and ``dDskip = sum g z``. Reads dy, q, k, v; writes dq.
  4. ``chunk_dkv_kernel``: backward over each chunk from its r: ``dz = sum_n a_n + Dskip g``, ``dk = dz v``,
     ``dv = dz k``, partial sums ``dR_n = sum z r_n``. Reads dy, q, k, v; writes dk, dv.
  The decays' gradient uses the forward-running sigma (``dL/dlambda = sum_t R g sigma + dS_final . sigma_final``)
  instead of the textbook ``sum_t a[t] s[t-1]``, which needs the forward state and the reverse adjoint at the
  same token. ``d log lambda = lambda d lambda`` chains to (p, gamma) in PyTorch.

Cost per token and channel (N = 16, bf16 inputs). Forward: reads k, v twice and q once, writes y: 6 x 2 bytes
against the 4-tensor floor of 8 bytes; 3N = 48 multiply-adds (4N = 64 with sigma, when training). Backward:
dy, q twice, k, v twice, writes dq, dk, dv: 13 x 2 bytes; 7N = 112 multiply-adds. fp32 states and sums
throughout. Why this and not a chunked matrix form (as Mamba-2 uses): the 16 decays are per channel, so an
intra-chunk Toeplitz or state projection is a batched matrix-vector product with no reuse across channels (no
tensor-core GEMM to gain), and it costs more multiply-adds per token than the recurrence itself. Why not one
sequential scan per channel: B D N lanes are too few to fill the GPU at batch 1 (65K lanes against ~270K
threads), so chunks provide the parallelism and the extra passes over k, v and dy, q are its price.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from sh2.kernels._tuning import channel_stride_one, pick_config, sum_partials
from sh2.kernels.modal_scan import (
    chunk_adjoint_kernel,
    chunk_dkv_kernel,
    chunk_dq_kernel,
    chunk_output_kernel,
    chunk_state_kernel,
    combine_adjoint_kernel,
    combine_kernel,
)

# ---------------------------------------------------------------------------------------------------- launchers

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


# Defaults first (used without autotuning); the alternatives trade registers per thread (1-2 channels) and rows
# in flight (unroll) against occupancy, and wider programs read longer contiguous rows.
_STATE_CONFIGS = (ModalConfig(128, 4, 8), ModalConfig(256, 4, 8), ModalConfig(256, 8, 8), ModalConfig(512, 8, 8))
_OUTPUT_CONFIGS = (ModalConfig(128, 4, 4), ModalConfig(128, 4, 8), ModalConfig(256, 4, 4), ModalConfig(256, 8, 4),
                   ModalConfig(512, 8, 4))
_DQ_CONFIGS = (ModalConfig(128, 4, 4), ModalConfig(128, 4, 8), ModalConfig(256, 8, 4), ModalConfig(64, 2, 4))
_DKV_CONFIGS = (ModalConfig(128, 4, 4), ModalConfig(128, 4, 8), ModalConfig(256, 4, 4), ModalConfig(256, 8, 4))
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


def _check_out(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out.shape != like.shape or out.dtype != like.dtype or out.stride(-1) != 1 or out.stride(1) != like.shape[-1]:
        raise ValueError(f"an output view must be {list(like.shape)} {like.dtype} with token stride D, got "
                         f"{list(out.shape)} {out.dtype} strides {out.stride()}")
    return out


def _tuned(name: str, key: tuple, configs: tuple[ModalConfig, ...], launch, device: torch.device) -> None:
    launch(pick_config(name, key, configs, launch, device))


def chunk_ends(k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor, plan: ModalPlan, sigma: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """End state of every chunk from a zero start (and, if ``sigma``, of ``ds/dlambda``): ``[B, n_chunks, N, D]``."""
    B, L, D = k.shape
    N = log_poles.shape[1]
    ends = _state_buffer(B, plan, N, D, k.device)
    sig_ends = _state_buffer(B, plan, N, D, k.device) if sigma else None
    key = (B, L, D, N, k.dtype, plan, sigma, _s(k), _s(v))

    def launch(cfg: ModalConfig) -> None:
        chunk_state_kernel[_grid(B, D, plan, cfg)](
            k, v, log_poles, ends, sig_ends if sigma else ends, L, plan.chunk, plan.n_chunks, k.stride(0),
            v.stride(0), D=D, skl=k.stride(1), svl=v.stride(1), N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll,
            SIGMA=sigma, num_warps=cfg.num_warps)

    _tuned("modal_state", key, _STATE_CONFIGS, launch, k.device)
    return ends, sig_ends


def combine_states(ends: torch.Tensor, sig_ends: torch.Tensor | None, log_poles: torch.Tensor,
                   initial_state: torch.Tensor | None, plan: ModalPlan, length: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Turn chunk end states into chunk start states, in place, and return the final state.

    Args:
        ends, sig_ends: from :func:`chunk_ends` (overwritten).
        initial_state: ``[B, D, N]`` state before the first token, or None (zero).
        length: the sequence length L the plan was made for.

    Returns:
        ``starts`` (= ``ends``), ``sigma_starts`` (= ``sig_ends``), ``final [B, D, N]`` and ``sigma_final`` (or
        None), fp32.
    """
    B, _, N, D = ends.shape
    sigma = sig_ends is not None
    final = torch.empty(B, D, N, device=ends.device, dtype=torch.float32)
    sig_final = torch.empty_like(final) if sigma else None
    combine_kernel[(B, triton.cdiv(N * D, _COMBINE_BLOCK))](
        ends, sig_ends if sigma else ends, log_poles, initial_state if initial_state is not None else final, final,
        sig_final if sigma else final, length, D, plan.chunk, plan.n_chunks, N=N, BLOCK=_COMBINE_BLOCK,
        UNROLL=_COMBINE_UNROLL, HAS_INIT=initial_state is not None, SIGMA=sigma, num_warps=4)
    return ends, sig_ends, final, sig_final


def forward_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor, plan: ModalPlan,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = q (R.s + Dskip z)`` from the chunks' start states, ``[B, L, D]`` in q's dtype.

    ``out`` (optional) receives it: any ``[B, L, D]`` view with token stride D (e.g. half of a longer sequence).
    """
    B, L, D = q.shape
    N = log_poles.shape[1]
    y = torch.empty(B, L, D, device=q.device, dtype=q.dtype) if out is None else _check_out(out, q)
    key = (B, L, D, N, q.dtype, plan, bias is not None, _s(q), _s(k), _s(v))

    def launch(cfg: ModalConfig) -> None:
        chunk_output_kernel[_grid(B, D, plan, cfg)](
            q, k, v, y, log_poles, residues, bias if bias is not None else residues, starts, L, plan.chunk,
            plan.n_chunks, q.stride(0), k.stride(0), v.stride(0), y.stride(0), D=D, sql=q.stride(1), skl=k.stride(1),
            svl=v.stride(1), N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll,
            HAS_BIAS=bias is not None, num_warps=cfg.num_warps)

    _tuned("modal_output", key, _OUTPUT_CONFIGS, launch, q.device)
    return y


def adjoint_carries(dy: torch.Tensor, q: torch.Tensor, log_poles: torch.Tensor, plan: ModalPlan
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reverse recurrence ``r`` entering every chunk from the right, and ``r`` at token 0.

    Returns:
        ``carries [B, n_chunks, N, D]`` and ``r0 [B, D, N]`` (fp32).
    """
    B, L, D = q.shape
    N = log_poles.shape[1]
    carries = _state_buffer(B, plan, N, D, q.device)
    r0 = torch.empty(B, D, N, device=q.device, dtype=torch.float32)
    key = (B, L, D, N, q.dtype, plan, _s(dy), _s(q))

    def launch(cfg: ModalConfig) -> None:
        chunk_adjoint_kernel[_grid(B, D, plan, cfg)](
            dy, q, log_poles, carries, L, plan.chunk, plan.n_chunks, dy.stride(0), q.stride(0), D=D,
            sdl=dy.stride(1), sql=q.stride(1), N=N,
            BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll, num_warps=cfg.num_warps)

    _tuned("modal_adjoint", key, _STATE_CONFIGS, launch, q.device)
    combine_adjoint_kernel[(B, triton.cdiv(N * D, _COMBINE_BLOCK))](
        carries, log_poles, r0, L, D, plan.chunk, plan.n_chunks, N=N, BLOCK=_COMBINE_BLOCK, UNROLL=_COMBINE_UNROLL,
        num_warps=4)
    return carries, r0


def input_grads(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                residues: torch.Tensor, bias: torch.Tensor | None, starts: torch.Tensor, sigma_starts: torch.Tensor,
                carries: torch.Tensor, final_grad: torch.Tensor | None, plan: ModalPlan,
                out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``dq, dk, dv`` (contiguous, inputs' dtype) and fp32 ``dlambda [D, N]``, ``dR [D, N]``, ``dDskip [D]``.

    ``dlambda`` counts the outputs only (the caller adds the final state's share); ``dR`` lacks the initial
    state's share ``lambda S_0 r[0]`` (added by the caller). ``out`` optionally receives ``(dq, dk, dv)`` (views
    with token stride D and one common batch stride).
    """
    B, L, D = q.shape
    N = log_poles.shape[1]
    dev = q.device
    if out is None:
        dq = torch.empty(B, L, D, device=dev, dtype=q.dtype)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    else:
        dq, dk, dv = (_check_out(t, q) for t in out)
        if not dq.stride(0) == dk.stride(0) == dv.stride(0):
            raise ValueError("dq, dk, dv outputs must share one batch stride")
    parts = B * plan.n_chunks
    dr_part = torch.empty(parts, N, D, device=dev, dtype=torch.float32)
    dlam_part = torch.empty_like(dr_part)
    dskip_part = torch.empty(parts, D, device=dev, dtype=torch.float32)
    bias_arg = bias if bias is not None else residues
    strides = (*_s(dy), *_s(q), *_s(k), *_s(v))
    batch_strides = strides[0::2]
    token_strides = dict(D=D, sdl=dy.stride(1), sql=q.stride(1), skl=k.stride(1), svl=v.stride(1))
    key = (B, L, D, N, q.dtype, plan, bias is not None, final_grad is not None, strides)

    def launch_dq(cfg: ModalConfig) -> None:
        chunk_dq_kernel[_grid(B, D, plan, cfg)](
            dy, q, k, v, dq, log_poles, residues, bias_arg, starts, sigma_starts, dlam_part, dskip_part, L,
            plan.chunk, plan.n_chunks, *batch_strides, dq.stride(0), **token_strides, N=N, BLOCK_D=_block_d(cfg, D),
            UNROLL=cfg.unroll, HAS_BIAS=bias is not None, num_warps=cfg.num_warps)

    def launch_dkv(cfg: ModalConfig) -> None:
        chunk_dkv_kernel[_grid(B, D, plan, cfg)](
            dy, q, k, v, dk, dv, log_poles, residues, bias_arg, carries,
            final_grad if final_grad is not None else carries, dr_part, L, plan.chunk, plan.n_chunks,
            *batch_strides, dk.stride(0), **token_strides, N=N, BLOCK_D=_block_d(cfg, D), UNROLL=cfg.unroll,
            HAS_BIAS=bias is not None, HAS_DSF=final_grad is not None, num_warps=cfg.num_warps)

    _tuned("modal_dq", key, _DQ_CONFIGS, launch_dq, dev)
    _tuned("modal_dkv", key, _DKV_CONFIGS, launch_dkv, dev)
    dlam = sum_partials(dlam_part).t().contiguous()
    dr = sum_partials(dr_part).t().contiguous()
    dskip = sum_partials(dskip_part) if bias is not None else None
    return dq, dk, dv, dlam, dr, dskip


# ---------------------------------------------------------------------------------------------------- autograd


def _empty(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("sh2::gated_modal_conv", mutates_args=())
def gated_modal_conv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                        residues: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                        save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, final_state, starts, sigma_starts, sigma_final)``: the last three (what the backward reads) are
    empty unless ``save``."""
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    lp, res = log_poles.float().contiguous(), residues.float().contiguous()
    s0 = initial_state.float().contiguous() if initial_state is not None else None
    B, L, D = q.shape
    plan = plan_chunks(B, L, D, q.device)
    ends, sig_ends = chunk_ends(k, v, lp, plan, sigma=save)
    starts, sig_starts, final, sig_final = combine_states(ends, sig_ends, lp, s0, plan, L)
    y = forward_output(q, k, v, lp, res, bias.contiguous() if bias is not None else None, starts, plan)
    if not save:
        return y, final, _empty(q), _empty(q), _empty(q)
    return y, final, starts, sig_starts, sig_final


@gated_modal_conv_op.register_fake
def _(q, k, v, log_poles, residues, bias, initial_state, save):
    B, L, D = q.shape
    N = log_poles.shape[1]
    final = q.new_empty((B, D, N), dtype=torch.float32)
    if not save:
        return q.new_empty(q.shape), final, _empty(q), _empty(q), _empty(q)
    plan = plan_chunks(B, L, D, q.device)
    starts = q.new_empty((B, plan.n_chunks, N, D), dtype=torch.float32)
    return q.new_empty(q.shape), final, starts, torch.empty_like(starts), torch.empty_like(final)


@torch.library.custom_op("sh2::gated_modal_conv_backward", mutates_args=())
def gated_modal_conv_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                                 residues: torch.Tensor, bias: torch.Tensor | None,
                                 initial_state: torch.Tensor | None, starts: torch.Tensor,
                                 sigma_starts: torch.Tensor, sigma_final: torch.Tensor, dy: torch.Tensor | None,
                                 dfinal: torch.Tensor | None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (q's dtype), ``dlog_poles``, ``dresidues`` (their dtypes), ``dbias`` and ``dinitial_state``
    (empty when absent). ``dy`` or ``dfinal`` may be None (that output unused)."""
    if starts.numel() == 0:
        raise RuntimeError("sh2::gated_modal_conv_backward needs the forward's saved states: run "
                           "sh2::gated_modal_conv with save=True when gradients are needed")
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    lp, res = log_poles.float().contiguous(), residues.float().contiguous()
    s0 = initial_state.float().contiguous() if initial_state is not None else None
    B, L, D = q.shape
    plan = plan_chunks(B, L, D, q.device)
    dy = channel_stride_one(dy) if dy is not None else torch.zeros_like(q)
    dfinal = dfinal.float().contiguous() if dfinal is not None else None
    carries, r0 = adjoint_carries(dy, q, lp, plan)
    dq, dk, dv, dlam, dr, dskip = input_grads(dy, q, k, v, lp, res, bias.contiguous() if bias is not None else None,
                                              starts, sigma_starts, carries, dfinal, plan)
    lam = torch.exp(lp)
    ds0 = lam * res * r0  # lambda a[0] with a = R r (+ the final-state term below)
    if dfinal is not None:
        dlam = dlam + (dfinal * sigma_final).sum(0)  # the final state depends on lambda through sigma
        ds0 = ds0 + torch.exp(lp * L) * dfinal
    if s0 is not None:  # y[t] reads R lambda^(t+1) S0, whose R-gradient is lambda S0 r[0]
        dr = dr + (lam * s0 * r0).sum(0)
    dlp = dlam * lam  # d/d log lambda = lambda d/d lambda
    return (dq, dk, dv, dlp.to(log_poles.dtype), dr.to(residues.dtype),
            dskip.to(bias.dtype) if bias is not None else _empty(q),
            ds0.to(initial_state.dtype) if initial_state is not None else _empty(q))


@gated_modal_conv_backward_op.register_fake
def _(q, k, v, log_poles, residues, bias, initial_state, starts, sigma_starts, sigma_final, dy, dfinal):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), torch.empty_like(log_poles),
            torch.empty_like(residues), torch.empty_like(bias) if bias is not None else _empty(q),
            torch.empty_like(initial_state) if initial_state is not None else _empty(q))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_poles, residues, bias, initial_state, _ = inputs
    _, _, starts, sigma_starts, sigma_final = output
    ctx.save_for_backward(q, k, v, log_poles, residues, bias, initial_state, starts, sigma_starts, sigma_final)
    ctx.mark_non_differentiable(starts, sigma_starts, sigma_final)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy: torch.Tensor | None, dfinal: torch.Tensor | None, *_saved_grads):
    q, k, v, log_poles, residues, bias, initial_state, starts, sigma_starts, sigma_final = ctx.saved_tensors
    if dy is None and dfinal is None:
        return (None,) * 8
    dq, dk, dv, dlp, dr, dbias, ds0 = gated_modal_conv_backward_op(
        q, k, v, log_poles, residues, bias, initial_state, starts, sigma_starts, sigma_final, dy, dfinal)
    return (dq, dk, dv, dlp, dr, dbias if bias is not None else None, ds0 if initial_state is not None else None,
            None)


gated_modal_conv_op.register_autograd(_backward, setup_context=_setup_context)


def gated_modal_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                            residues: torch.Tensor, bias: torch.Tensor | None = None,
                            initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton modal recurrence (the ``sh2::gated_modal_conv`` operator); returns ``(y, final_state)``.

    The states the backward reads are kept only when a gradient can flow (grad mode on and an input that
    requires it).
    """
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, log_poles, residues, bias, initial_state))
    y, final, *_ = gated_modal_conv_op(q, k, v, log_poles, residues, bias, initial_state, save)
    return y, final


__all__ = ["gated_modal_conv_triton", "plan_chunks", "ModalPlan", "chunk_ends", "combine_states", "forward_output",
           "adjoint_carries", "input_grads"]
