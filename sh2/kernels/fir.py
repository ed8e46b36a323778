"""Gated causal FIR convolution in Triton (Hyena-SE and Hyena-MR): launchers and the ``sh2::`` operators.

``y = q * (conv(k * v, h) + bias * (k * v))`` with grouped causal filters ``h [G, K]``. Two kernel
families (see their modules):

- :mod:`sh2.kernels.fir_blocked`: the two-stage blocked algorithm on tensor cores (see docs/design.md,
  "Two-stage blocked convolution"), used when the channels per group ``dg`` are a multiple of 16 and
  ``2 <= K <= 128``;
- :mod:`sh2.kernels.fir_direct`: a direct register-tiled kernel for every other shape (``dg = 1``,
  odd ``dg``, ``K = 1`` or ``K > 128``).

Layouts: q, k, v may be any ``[B, L, D]`` views whose channel stride is 1 (for example slices of one
``[B, L, 3D]`` projection); batch and token strides are passed to the kernels, so no copy is made.
Other layouts are copied first. Outputs and gradients are contiguous, in the dtype of their input.

PyTorch sees the kernels as two custom operators, ``sh2::gated_fir_conv`` and
``sh2::gated_fir_conv_backward``, with fake implementations (shapes only) and the autograd formula
registered, so ``torch.compile`` traces them without a graph break and autotuning stays in their eager
bodies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import triton

from sh2.kernels import _tuning
from sh2.kernels._tuning import channel_stride_one, dot_precision, interpreted, pick_config, split_segments
from sh2.kernels.fir_blocked import (
    _fir_blocked_bwd_kernel,
    _fir_blocked_dh_kernel,
    _fir_blocked_fwd_kernel,
    block_t_candidates,
    blocked_supported,
)
from sh2.kernels.fir_direct import _fir_direct_bwd_kernel, _fir_direct_dh_kernel, _fir_direct_fwd_kernel

_MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (axis 0 takes 2^31 - 1)


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
        channel_fast: put the channel blocks on the fast grid axis, so that programs running together read
            neighbouring groups of the same tokens (1-3% faster on the H200 at dg = 16, docs/benchmarks.md).
    """

    block_t: int
    block_c: int
    target_programs: int
    num_warps: int
    num_stages: int = 3
    fuse_dh: bool = False
    channel_fast: bool = True

    def channels_first(self, rows: int) -> bool:
        """Whether a launch of ``rows`` (batch x segments) puts the channel blocks on grid axis 0: as configured,
        unless the rows would exceed CUDA's limit on axis 1 (65,535; a small width with a large batch)."""
        return self.channel_fast and rows <= _MAX_GRID_Y

    def grid(self, rows: int, n_cb: int) -> tuple[int, int]:
        """Launch grid for ``rows`` by ``n_cb`` channel blocks, in the order of :meth:`channels_first`."""
        return (n_cb, rows) if self.channels_first(rows) else (rows, n_cb)


@dataclass(frozen=True)
class DirectConfig:
    """Launch parameters of the direct kernels (tile ``block_t x block_c``)."""

    block_t: int
    block_c: int
    num_warps: int


@dataclass(frozen=True)
class DirectDhConfig:
    """Launch parameters of the direct filter-gradient kernel.

    Attributes:
        block_t, block_c: tile of ``[L, D]`` a program reduces at a time.
        num_warps: warps per program.
        max_partial_floats: cap on the ``[P, D, K]`` fp32 partials (P = programs along B x L). 2^24 floats
            (64 MiB) keeps long filters (K > 128) at long L from allocating GBs of scratch while leaving
            hundreds of programs for typical shapes.
    """

    block_t: int
    block_c: int
    num_warps: int = 4
    max_partial_floats: int = 1 << 24


class FIRGrads(NamedTuple):
    """Gradients of one backward call: ``dq, dk, dv`` in q's dtype, ``dh [G, K]`` and ``dbias [D]`` in fp32."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dh: torch.Tensor
    dbias: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class FIRProblem:
    """The tensors of one call in kernel layout (channel stride 1, contiguous h and bias), and its sizes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(B, L, D, G, K, dg)``."""
        B, L, D = self.q.shape
        G, K = self.h.shape
        return B, L, D, G, K, D // G

    def strides(self, *tensors: torch.Tensor) -> tuple[int, ...]:
        """Batch and token strides of q, k, v and then of ``tensors``, in kernel argument order."""
        return tuple(s for x in (self.q, self.k, self.v, *tensors) for s in (x.stride(0), x.stride(1)))

    def key(self, *tensors: torch.Tensor) -> tuple:
        """Autotuning key: sizes, dtype, bias or not, and the strides the kernels see."""
        return (*self.shape[:5], self.q.dtype, self.bias is not None, self.strides(*tensors))

    def new(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An output or scratch buffer on q's device (q's dtype unless given)."""
        return _tuning.new_buffer(shape, dtype or self.q.dtype, self.q.device)


def kernel_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                  bias: torch.Tensor | None) -> FIRProblem:
    """Copy what the kernels cannot read in place (channel stride != 1, non-contiguous h or bias)."""
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    return FIRProblem(q, k, v, h.contiguous(), bias.contiguous() if bias is not None else None)


def use_blocked(q: torch.Tensor, h: torch.Tensor) -> bool:
    """Dispatch rule: the blocked tensor-core kernels where they apply, the direct kernel elsewhere.

    Where both apply and K <= 16, the forward autotuner also times the direct kernel and keeps the faster.
    """
    G, K = h.shape
    return blocked_supported(q.shape[-1] // G, K, q.dtype == torch.float32)


@cache
def _blocked_candidates(K: int, fp32: bool, backward: bool) -> tuple[BlockedConfig, ...]:
    """Default first, then a few alternatives (each distinct block shape costs one compilation)."""
    bts = block_t_candidates(K, fp32)
    default_bt = bts[-1] if K > 32 else bts[min(len(bts) - 1, 2 if K > 16 else 1)]
    if backward:
        default_bt = bts[min(len(bts) - 1, 2)] if K <= 64 else bts[-1]
    # H200 (docs/benchmarks.md): the forward is fastest with 4 warps and about 1K programs at every chunk
    # length (MR at b = 128: 0.16 ms at 8K against 0.30 with 8 warps and 4K programs); the backward with
    # 8 warps at b = 128
    nw = 8 if backward and default_bt >= 128 else 4
    cands = [BlockedConfig(default_bt, 16, 1024, nw, 3, backward and default_bt <= 64)]
    for bt in bts[-2:]:
        for tp in ((1024,) if backward else (1024, 4096)):
            for nw in ((8,) if backward and bt >= 128 else (4, 8) if bt >= 128 else (4,)):
                for fuse in ((False, True) if backward else (False,)):
                    cfg = BlockedConfig(bt, 16, tp, nw, 3, fuse)
                    if cfg not in cands:
                        cands.append(cfg)
    return tuple(cands)


_DIRECT_CANDIDATES = (DirectConfig(64, 64, 4), DirectConfig(32, 128, 4), DirectConfig(128, 32, 4))
_DIRECT_DH_CANDIDATES = (DirectDhConfig(64, 64), DirectDhConfig(32, 128), DirectDhConfig(128, 32))


# ---------------------------------------------------------------------------------------------- forward
def _blocked_forward(p: FIRProblem, y: torch.Tensor, cfg: BlockedConfig) -> None:
    B, L, D, G, K, dg = p.shape
    n_chunks = triton.cdiv(L, cfg.block_t)
    n_cb = D // cfg.block_c
    cpp, n_seg = split_segments(n_chunks, n_cb, cfg.target_programs)
    _fir_blocked_fwd_kernel[cfg.grid(B * n_seg, n_cb)](
        p.q, p.k, p.v, p.h, p.bias, y, L, dg, K, n_chunks, cpp, n_seg, *p.strides(y),
        HAS_BIAS=p.bias is not None, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PREC=dot_precision(p.q.dtype),
        DOT_F32=interpreted(), CH_FAST=cfg.channels_first(B * n_seg), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def _direct_forward(p: FIRProblem, y: torch.Tensor, cfg: DirectConfig) -> None:
    B, L, D, G, K, dg = p.shape
    n_t = triton.cdiv(L, cfg.block_t)
    _fir_direct_fwd_kernel[(B * n_t, triton.cdiv(D, cfg.block_c))](
        p.q, p.k, p.v, p.h, p.bias, y, L, D, dg, K, n_t, *p.strides(y),
        HAS_BIAS=p.bias is not None, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


def _forward(p: FIRProblem, y: torch.Tensor, cfg: BlockedConfig | DirectConfig) -> None:
    if isinstance(cfg, BlockedConfig):
        _blocked_forward(p, y, cfg)
    else:
        _direct_forward(p, y, cfg)


def fir_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                bias: torch.Tensor | None, blocked: bool | None = None,
                config: BlockedConfig | DirectConfig | None = None) -> torch.Tensor:
    """Run the forward kernel; returns ``y [B, L, D]`` contiguous in q's dtype.

    ``blocked`` forces the kernel family and ``config`` a launch configuration (tests); by default
    both are chosen per shape (rule of :func:`use_blocked`, then the autotuner).
    """
    p = kernel_layout(q, k, v, h, bias)
    B, L, D, G, K, dg = p.shape
    y = p.new(B, L, D)
    if config is None:
        cands: tuple = _DIRECT_CANDIDATES
        if use_blocked(p.q, p.h) if blocked is None else blocked:
            cands = _blocked_candidates(K, p.q.dtype == torch.float32, False)
            if blocked is None and K <= 16:
                cands += _DIRECT_CANDIDATES
        config = pick_config("fir_fwd", p.key(y), cands, lambda cfg: _forward(p, y, cfg), p.q.device)
    _forward(p, y, config)
    return y


# --------------------------------------------------------------------------------------------- backward
def _blocked_backward(p: FIRProblem, dy: torch.Tensor, dqkv: tuple[torch.Tensor, ...], cfg: BlockedConfig
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dq, dk, dv into ``dqkv``; returns ``dh [G, K]`` and ``dbias [D]`` (fp32, or None without bias)."""
    B, L, D, G, K, dg = p.shape
    n_chunks = triton.cdiv(L, cfg.block_t)
    n_cb = D // cfg.block_c
    cpp, n_seg = split_segments(n_chunks, n_cb, cfg.target_programs)
    db_part = p.new(B * n_seg, D, dtype=torch.float32) if p.bias is not None else None
    dh_part = p.new(B * n_seg, n_cb, K, dtype=torch.float32)
    fused = dh_part if cfg.fuse_dh else None
    common = dict(BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, PREC=dot_precision(p.q.dtype), DOT_F32=interpreted(),
                  CH_FAST=cfg.channels_first(B * n_seg), num_warps=cfg.num_warps)
    grid = cfg.grid(B * n_seg, n_cb)
    _fir_blocked_bwd_kernel[grid](
        p.q, p.k, p.v, dy, p.h, p.bias, *dqkv, db_part, fused, L, D, dg, K, n_chunks, cpp, n_seg, n_cb,
        *p.strides(dy, dqkv[0]), HAS_BIAS=p.bias is not None, FUSE_DH=cfg.fuse_dh, num_stages=cfg.num_stages,
        **common)
    if not cfg.fuse_dh:
        _fir_blocked_dh_kernel[grid](
            p.q, p.k, p.v, dy, dh_part, L, K, n_chunks, cpp, n_seg, n_cb, *p.strides(dy), **common)
    dh = _tuning.sum_partials(dh_part).view(G, dg // cfg.block_c, K).sum(1)
    return dh, (_tuning.sum_partials(db_part) if db_part is not None else None)


def _direct_backward(p: FIRProblem, dy: torch.Tensor, dqkv: tuple[torch.Tensor, ...], cfg: DirectConfig
                     ) -> torch.Tensor | None:
    """dq, dk, dv into ``dqkv``; returns ``dbias [D]`` fp32 (None without bias)."""
    B, L, D, G, K, dg = p.shape
    n_t = triton.cdiv(L, cfg.block_t)
    db_part = p.new(B * n_t, D, dtype=torch.float32) if p.bias is not None else None
    _fir_direct_bwd_kernel[(B * n_t, triton.cdiv(D, cfg.block_c))](
        p.q, p.k, p.v, dy, p.h, p.bias, *dqkv, db_part, L, D, dg, K, n_t, *p.strides(dy, dqkv[0]),
        HAS_BIAS=p.bias is not None, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return _tuning.sum_partials(db_part) if db_part is not None else None


def _direct_dh(p: FIRProblem, dy: torch.Tensor, cfg: DirectDhConfig) -> torch.Tensor:
    """``dh [G, K]`` fp32 by the direct filter-gradient kernel."""
    B, L, D, G, K, dg = p.shape
    n_t = triton.cdiv(L, cfg.block_t)
    n_seg = max(1, min(n_t, cfg.max_partial_floats // max(1, B * D * K)))
    tpp = triton.cdiv(n_t, n_seg)
    n_seg = triton.cdiv(n_t, tpp)
    dh_part = p.new(B * n_seg, D, K, dtype=torch.float32)
    _fir_direct_dh_kernel[(B * n_seg, triton.cdiv(D, cfg.block_c))](
        p.q, p.k, p.v, dy, dh_part, L, D, K, n_t, tpp, n_seg, *p.strides(dy),
        BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return _tuning.sum_partials(dh_part).view(G, dg, K).sum(1)


def fir_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None,
                 dy: torch.Tensor, blocked: bool | None = None, config: BlockedConfig | DirectConfig | None = None,
                 dh_config: DirectDhConfig | None = None) -> FIRGrads:
    """Run the backward kernels for the output gradient ``dy``.

    ``blocked`` and ``config`` (the dq/dk/dv kernel's) are as in :func:`fir_forward`; ``dh_config`` forces
    the direct filter-gradient kernel's configuration. Tests use them; by default everything is chosen
    per shape.
    """
    p = kernel_layout(q, k, v, h, bias)
    dy = channel_stride_one(dy)
    B, L, D, G, K, dg = p.shape
    dqkv = (p.new(B, L, D), p.new(B, L, D), p.new(B, L, D))
    dev = p.q.device
    if use_blocked(p.q, p.h) if blocked is None else blocked:
        if config is None:
            cands = _blocked_candidates(K, p.q.dtype == torch.float32, True)
            config = pick_config("fir_blocked_bwd", p.key(dy), cands, lambda c: _blocked_backward(p, dy, dqkv, c),
                                 dev)
        dh, dbias = _blocked_backward(p, dy, dqkv, config)
    else:
        if config is None:
            config = pick_config("fir_direct_bwd", p.key(dy), _DIRECT_CANDIDATES,
                                 lambda c: _direct_backward(p, dy, dqkv, c), dev)
        dbias = _direct_backward(p, dy, dqkv, config)
        if dh_config is None:
            dh_config = pick_config("fir_direct_dh", p.key(dy), _DIRECT_DH_CANDIDATES,
                                    lambda c: _direct_dh(p, dy, c), dev)
        dh = _direct_dh(p, dy, dh_config)
    return FIRGrads(*dqkv, dh, dbias)


# ---------------------------------------------------------------------------------------- custom operators
@torch.library.custom_op("sh2::gated_fir_conv", mutates_args=())
def gated_fir_conv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``q * (conv(k * v, h) + bias * k * v)`` by the Triton kernels (fp16/bf16/fp32, non-empty)."""
    return fir_forward(q, k, v, h, bias)


@gated_fir_conv_op.register_fake
def _(q, k, v, h, bias):
    return q.new_empty(q.shape)


@torch.library.custom_op("sh2::gated_fir_conv_backward", mutates_args=())
def gated_fir_conv_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                               bias: torch.Tensor | None, dy: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (q's dtype), ``dh`` (h's dtype), ``dbias`` (bias's dtype; empty without bias)."""
    g = fir_backward(q, k, v, h, bias, dy)
    dbias = g.dbias.to(bias.dtype) if bias is not None else q.new_empty(0)
    return g.dq, g.dk, g.dv, g.dh.to(h.dtype), dbias


@gated_fir_conv_backward_op.register_fake
def _(q, k, v, h, bias, dy):
    dbias = bias.new_empty(bias.shape) if bias is not None else q.new_empty(0)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), h.new_empty(h.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):
    q, k, v, h, bias = ctx.saved_tensors
    dq, dk, dv, dh, dbias = gated_fir_conv_backward_op(q, k, v, h, bias, dy)
    return dq, dk, dv, dh, (dbias if bias is not None else None)


gated_fir_conv_op.register_autograd(_backward, setup_context=_setup_context)


def gated_fir_conv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton gated causal FIR convolution ``q * (conv(k * v, h) + bias * (k * v))`` (differentiable).

    Args:
        q, k, v: ``[B, L, D]`` fp16/bf16/fp32, non-empty (any batch/token strides with channel stride 1
            are used in place).
        h: ``[G, K]`` causal filters, channel c uses ``h[c // (D // G)]``; any float dtype.
        bias: Dskip ``[D]`` or None.

    Returns:
        ``[B, L, D]`` in q's dtype (fp32 accumulation).
    """
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    return gated_fir_conv_op(q, k, v, h.contiguous(), bias.contiguous() if bias is not None else None)
