"""Gated causal FIR convolution in Triton (Hyena-SE and Hyena-MR): launchers, autograd, dispatch.

``y = q * (conv(k * v, h) + bias * (k * v))`` with grouped causal filters ``h [G, K]``. Two kernel
families (see their modules):

- :mod:`sh2.kernels.fir_blocked`: the two-stage blocked algorithm on tensor cores (SPEC 2.1), used
  when the channels per group ``dg`` are a multiple of 16 and ``2 <= K <= 128``;
- :mod:`sh2.kernels.fir_direct`: a direct register-tiled kernel for every other shape (``dg = 1``,
  odd ``dg``, ``K = 1`` or ``K > 128``).

Layouts: q, k, v may be any ``[B, L, D]`` views whose channel stride is 1 (for example slices of one
``[B, L, 3D]`` projection); batch and token strides are passed to the kernels, so no copy is made.
Other layouts are copied to contiguous first. Gradients are returned contiguous, in the dtype of
their input (dh in h's dtype, dbias in bias's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton

from sh2.kernels import reference
from sh2.kernels._tuning import channel_stride_one, dot_precision, interpreted, pick_config, sum_partials
from sh2.kernels.fir_blocked import (
    _fir_blocked_bwd_kernel,
    _fir_blocked_dh_kernel,
    _fir_blocked_fwd_kernel,
    block_t_candidates,
    blocked_supported,
)
from sh2.kernels.fir_direct import _fir_direct_bwd_kernel, _fir_direct_dh_kernel, _fir_direct_fwd_kernel

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BlockedConfig:
    """Launch parameters of the blocked kernels.

    Attributes:
        block_t: chunk length b (``K <= b <= 128``).
        block_c: channels per program (divides dg).
        target_programs: the L axis is cut into segments so that about this many programs run.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the chunk loop.
        fuse_dh: backward only: accumulate the filter gradient in the dq/dk/dv kernel instead of a
            second pass over the inputs (saves four tensor reads, costs registers).
    """

    block_t: int
    block_c: int
    target_programs: int
    num_warps: int
    num_stages: int = 3
    fuse_dh: bool = False


@dataclass(frozen=True)
class DirectConfig:
    """Launch parameters of the direct kernels (tile ``block_t x block_c``)."""

    block_t: int
    block_c: int
    num_warps: int


def _segments(n_chunks: int, n_cols: int, target: int) -> tuple[int, int]:
    """Chunks per program and number of segments along L, for about ``target`` programs."""
    n_seg = max(1, min(n_chunks, target // max(1, n_cols)))
    cpp = triton.cdiv(n_chunks, n_seg)
    return cpp, triton.cdiv(n_chunks, cpp)


@cache
def _blocked_candidates(K: int, fp32: bool, backward: bool) -> tuple[BlockedConfig, ...]:
    """Default first, then a few alternatives (each distinct block shape costs one compilation)."""
    bts = block_t_candidates(K, fp32)
    default_bt = bts[-1] if K > 32 else bts[min(len(bts) - 1, 2 if K > 16 else 1)]
    if backward:
        default_bt = bts[min(len(bts) - 1, 2)] if K <= 64 else bts[-1]
    nw = 8 if default_bt >= 128 else 4
    cands = [BlockedConfig(default_bt, 16, 1024 if backward else 4096, nw, 3, backward and default_bt <= 64)]
    for bt in bts[-2:]:
        for tp in ((1024,) if backward else (1024, 4096)):
            for nw in ((8,) if backward and bt >= 128 else (4, 8) if bt >= 128 else (4,)):
                for fuse in ((False, True) if backward else (False,)):
                    cfg = BlockedConfig(bt, 16, tp, nw, 3, fuse)
                    if cfg not in cands:
                        cands.append(cfg)
    return tuple(cands)


def _direct_candidates() -> list[DirectConfig]:
    return [DirectConfig(64, 64, 4), DirectConfig(32, 128, 4), DirectConfig(128, 32, 4)]


def _strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def use_blocked(q: torch.Tensor, h: torch.Tensor) -> bool:
    """Dispatch rule: the blocked tensor-core kernels where they apply, the direct kernel elsewhere.

    Where both apply and K <= 16, the forward autotuner also times the direct kernel and keeps the faster.
    """
    G, K = h.shape
    return blocked_supported(q.shape[-1] // G, K, q.dtype == torch.float32)


def fir_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                bias: torch.Tensor | None, blocked: bool | None = None,
                config: BlockedConfig | DirectConfig | None = None) -> torch.Tensor:
    """Launch the forward kernel; inputs must have channel stride 1 and h must be contiguous.

    ``blocked`` forces the kernel family and ``config`` a launch configuration (tests); by default
    both are chosen per shape (rule of :func:`use_blocked`, then the autotuner).
    """
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    y = torch.empty(B, L, D, device=q.device, dtype=q.dtype)
    auto = blocked is None
    blocked = use_blocked(q, h) if auto else blocked
    bias_arg = bias if bias is not None else h
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(y))
    key = (B, L, D, G, K, q.dtype, bias is not None, common)

    def launch(cfg: BlockedConfig | DirectConfig) -> None:
        if isinstance(cfg, BlockedConfig):
            n_chunks = triton.cdiv(L, cfg.block_t)
            cpp, n_seg = _segments(n_chunks, D // cfg.block_c, cfg.target_programs)
            grid = (B * n_seg, D // cfg.block_c)
            kernel = _fir_blocked_fwd_kernel
            kernel[grid](
                q, k, v, h, bias_arg, y, L, dg, K, n_chunks, cpp, n_seg, *common,
                HAS_BIAS=bias is not None, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c,
                PREC=dot_precision(q.dtype), DOT_F32=interpreted(), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
        else:
            n_t = triton.cdiv(L, cfg.block_t)
            grid = (B * n_t, triton.cdiv(D, cfg.block_c))
            _fir_direct_fwd_kernel[grid](
                q, k, v, h, bias_arg, y, L, D, dg, K, n_t, *common,
                HAS_BIAS=bias is not None, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)

    if blocked:
        cands: list = list(_blocked_candidates(K, q.dtype == torch.float32, False))
        if auto and K <= 16:
            cands += _direct_candidates()
    else:
        cands = _direct_candidates()
    launch(config if config is not None else pick_config("fir_fwd", key, cands, launch, q.device))
    return y


def fir_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
                 dy: torch.Tensor, blocked: bool | None = None, config: BlockedConfig | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels; returns ``dq, dk, dv`` (contiguous), ``dh [G, K]`` fp32 and ``dbias`` fp32."""
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    dev = q.device
    dq = torch.empty(B, L, D, device=dev, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    has_bias = bias is not None
    bias_arg = bias if has_bias else h
    ins = (*_strides(q), *_strides(k), *_strides(v), *_strides(dy))
    key = (B, L, D, G, K, q.dtype, has_bias, ins)
    blocked = use_blocked(q, h) if blocked is None else blocked
    state: dict[str, torch.Tensor] = {}
    if blocked:
        prec = dot_precision(q.dtype)

        def launch(cfg: BlockedConfig) -> None:
            n_chunks = triton.cdiv(L, cfg.block_t)
            n_cb = D // cfg.block_c
            cpp, n_seg = _segments(n_chunks, n_cb, cfg.target_programs)
            grid = (B * n_seg, n_cb)
            db_part = torch.empty(B * n_seg if has_bias else 1, D, device=dev, dtype=torch.float32)
            dh_part = torch.empty(B * n_seg if cfg.fuse_dh else 1, n_cb, K, device=dev, dtype=torch.float32)
            kernel = _fir_blocked_bwd_kernel
            kernel[grid](
                q, k, v, dy, h, bias_arg, dq, dk, dv, db_part, dh_part, L, D, dg, K, n_chunks, cpp, n_seg, n_cb,
                *ins, *_strides(dq), HAS_BIAS=has_bias, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PREC=prec,
                DOT_F32=interpreted(), FUSE_DH=cfg.fuse_dh, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            state["db_part"] = db_part
            if cfg.fuse_dh:
                state["dh"] = sum_partials(dh_part).view(G, dg // cfg.block_c, K).sum(1)

        def launch_dh(cfg: BlockedConfig) -> None:
            n_chunks = triton.cdiv(L, cfg.block_t)
            n_cb = D // cfg.block_c
            cpp, n_seg = _segments(n_chunks, n_cb, cfg.target_programs)
            dh_part = torch.empty(B * n_seg, n_cb, K, device=dev, dtype=torch.float32)
            _fir_blocked_dh_kernel[(B * n_seg, n_cb)](
                q, k, v, dy, dh_part, L, K, n_chunks, cpp, n_seg, n_cb, *ins,
                BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PREC=prec, DOT_F32=interpreted(), num_warps=cfg.num_warps)
            state["dh"] = sum_partials(dh_part).view(G, dg // cfg.block_c, K).sum(1)

        def launch_all(cfg: BlockedConfig) -> None:
            launch(cfg)
            if not cfg.fuse_dh:
                launch_dh(cfg)

        cands = _blocked_candidates(K, q.dtype == torch.float32, True)
        launch_all(config if config is not None else pick_config("fir_blocked_bwd", key, cands, launch_all, dev))
    else:
        def launch(cfg: DirectConfig) -> None:
            n_t = triton.cdiv(L, cfg.block_t)
            grid = (B * n_t, triton.cdiv(D, cfg.block_c))
            db_part = torch.empty(B * n_t if has_bias else 1, D, device=dev, dtype=torch.float32)
            _fir_direct_bwd_kernel[grid](
                q, k, v, dy, h, bias_arg, dq, dk, dv, db_part, L, D, dg, K, n_t, *ins, *_strides(dq),
                HAS_BIAS=has_bias, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
            state["db_part"] = db_part

        launch(pick_config("fir_direct_bwd", key, _direct_candidates(), launch, dev))
        bt, bc = 64, 64
        n_t = triton.cdiv(L, bt)
        # bound the [P, D, K] partials to ~16M floats
        n_seg = max(1, min(n_t, (1 << 24) // max(1, B * D * K)))
        tpp = triton.cdiv(n_t, n_seg)
        n_seg = triton.cdiv(n_t, tpp)
        dh_part = torch.empty(B * n_seg, D, K, device=dev, dtype=torch.float32)
        _fir_direct_dh_kernel[(B * n_seg, triton.cdiv(D, bc))](
            q, k, v, dy, dh_part, L, D, K, n_t, tpp, n_seg, *ins, BLOCK_T=bt, BLOCK_C=bc, num_warps=4)
        state["dh"] = sum_partials(dh_part).view(G, dg, K).sum(1)
    dbias = sum_partials(state["db_part"]) if has_bias else None
    return dq, dk, dv, state["dh"], dbias


class GatedFIRConv(torch.autograd.Function):
    """Autograd wrapper of the Triton gated FIR kernels (gradients to q, k, v, h and bias)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (channel_stride_one(x) for x in (q, k, v))
        hc = h.contiguous()
        bc = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(q, k, v, hc, bc)
        ctx.h_dtype = h.dtype
        return fir_forward(q, k, v, hc, bc)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, k, v, h, bias = ctx.saved_tensors
        dy = channel_stride_one(dy)
        dq, dk, dv, dh, db = fir_backward(q, k, v, h, bias, dy)
        return dq, dk, dv, dh.to(ctx.h_dtype), (db.to(bias.dtype) if db is not None else None)


def gated_fir_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton gated causal FIR convolution ``q * (conv(k * v, h) + bias * (k * v))``.

    Args:
        q, k, v: ``[B, L, D]`` (any batch/token strides with channel stride 1 are used in place).
        h: ``[G, K]`` causal filters, channel c uses ``h[c // (D // G)]``; any float dtype.
        bias: Dskip ``[D]`` or None.

    Returns:
        ``[B, L, D]`` in q's dtype (fp32 accumulation). float64 inputs use the reference.
    """
    if q.dtype not in _TRITON_DTYPES:
        return reference.gated_fir_conv_ref(q, k, v, h, bias)
    if q.shape[1] == 0 or q.shape[0] == 0:
        return torch.empty_like(q)
    return GatedFIRConv.apply(q, k, v, h, bias)
