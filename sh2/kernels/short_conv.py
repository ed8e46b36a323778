"""Causal depthwise convolution (the Hyena featurizer) in Triton: kernels, launchers, ``sh2::`` operators.

``y[b, t, c] = sum_s w[c, s] * x[b, t - s, c]`` for ``x [B, L, C]`` (any batch and token strides, channel
stride 1: the featurizer reads the ``[B, L, 3D]`` projection in place) and short filters ``w [C, K]``
in causal orientation. The featurizer is bandwidth-bound: one pass reads x once (the K shifted tiles of
a program hit L1/L2) and writes y in x's dtype, where the reference builds an fp32 copy and K shifted
updates of it.

Forward: each program owns a ``[BLOCK_T, BLOCK_C]`` tile and accumulates the K taps in fp32 registers.

Backward, one kernel:

    dx[b, t, c] = sum_s w[c, s] dy[b, t + s, c]        dw[c, s] = sum_{b, t} dy[b, t, c] x[b, t - s, c]

Each program walks a segment of consecutive tiles of one channel block, writes dx tile by tile and
accumulates the products of up to four filter taps in ``[BLOCK_T, BLOCK_C]`` fp32 registers, reduced over
tokens once at the segment's end (longer filters put further groups of four taps on a third grid axis); the
per-program ``[P, C, K]`` fp32 partials are summed by a second kernel (deterministic: no atomics). Both
kernels accumulate in fp32 and take fp16/bf16/fp32 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sh2.kernels import _tuning
from sh2.kernels._tuning import channel_stride_one, load_tile, pick_config, split_segments, tile_ptrs


@triton.jit(do_not_specialize=("L", "n_t"))
def _short_conv_fwd_kernel(x_ptr, w_ptr, y_ptr, L, C, K, n_t, sxb, sxl, syb, syl,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_t).to(tl.int64)
    t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    w_rows = w_ptr + offs_c * K
    xb = x_ptr + b * sxb
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for s in range(0, K):
        ws = tl.load(w_rows + s, mask=mc, other=0.0).to(tl.float32)
        acc += ws[None, :] * load_tile(xb, t - s, sxl, offs_c, L, mc)
    m = (t < L)[:, None] & mc[None, :]
    tl.store(tile_ptrs(y_ptr + b * syb, t, syl, offs_c), acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tap_product(acc, dy, xb, t, s, sxl, offs_c, L, mc):
    return acc + dy * load_tile(xb, t - s, sxl, offs_c, L, mc)


@triton.jit
def _store_tap(out, acc, s, K, offs_c, mc):
    tl.store(out + s, tl.sum(acc, axis=0), mask=mc & (tl.zeros_like(offs_c) + s < K))


@triton.jit(do_not_specialize=("L", "n_t", "tiles_per_prog", "n_seg"))
def _short_conv_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_part_ptr, L, C, K, n_t, tiles_per_prog, n_seg,
                           sxb, sxl, sdyb, sdyl, sob, sol,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, TAPS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // n_seg).to(tl.int64)
    seg = pid % n_seg
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    s0 = tl.program_id(2) * TAPS  # this program's filter taps: s0 .. s0 + TAPS - 1
    w_rows = w_ptr + offs_c * K
    xb = x_ptr + b * sxb
    dyb = dy_ptr + b * sdyb
    # One fp32 accumulator per tap, reduced over tokens once at the end: reducing every tile instead costs a
    # cross-warp reduction per tap and tile, which made this kernel 3.5x its byte floor (docs/design.md).
    a0 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    i0 = seg * tiles_per_prog
    for i in range(i0, tl.minimum(i0 + tiles_per_prog, n_t)):
        t = i * BLOCK_T + tl.arange(0, BLOCK_T)
        dy = load_tile(dyb, t, sdyl, offs_c, L, mc)
        a0 = _tap_product(a0, dy, xb, t, s0, sxl, offs_c, L, mc)
        if TAPS > 1:
            a1 = _tap_product(a1, dy, xb, t, s0 + 1, sxl, offs_c, L, mc)
        if TAPS > 2:
            a2 = _tap_product(a2, dy, xb, t, s0 + 2, sxl, offs_c, L, mc)
        if TAPS > 3:
            a3 = _tap_product(a3, dy, xb, t, s0 + 3, sxl, offs_c, L, mc)
        if s0 == 0:  # the programs of the first tap group also write dx
            dx = tl.load(w_rows, mask=mc, other=0.0).to(tl.float32)[None, :] * dy
            for s in range(1, K):
                ws = tl.load(w_rows + s, mask=mc, other=0.0).to(tl.float32)
                dx += ws[None, :] * load_tile(dyb, t + s, sdyl, offs_c, L, mc)
            m = (t < L)[:, None] & mc[None, :]
            tl.store(tile_ptrs(dx_ptr + b * sob, t, sol, offs_c), dx.to(dx_ptr.dtype.element_ty), mask=m)
    out = dw_part_ptr + pid.to(tl.int64) * C * K + offs_c * K + s0
    _store_tap(out, a0, 0, K - s0, offs_c, mc)
    if TAPS > 1:
        _store_tap(out, a1, 1, K - s0, offs_c, mc)
    if TAPS > 2:
        _store_tap(out, a2, 2, K - s0, offs_c, mc)
    if TAPS > 3:
        _store_tap(out, a3, 3, K - s0, offs_c, mc)


@dataclass(frozen=True)
class ShortConvConfig:
    """Launch parameters: tile ``block_t x block_c``; the backward cuts L into segments for about
    ``target_programs`` programs per batch row."""

    block_t: int
    block_c: int
    num_warps: int = 4
    target_programs: int = 1024


_CANDIDATES = (ShortConvConfig(64, 64), ShortConvConfig(32, 128), ShortConvConfig(16, 256))
# The backward holds up to four fp32 accumulators per tile: smaller tiles, or more warps.
_BWD_CANDIDATES = (ShortConvConfig(32, 64), ShortConvConfig(16, 128), ShortConvConfig(64, 64, num_warps=8),
                   ShortConvConfig(32, 128, num_warps=8), ShortConvConfig(16, 64))
# Filter taps per backward program (more taps are split over the grid's third axis).
_TAPS = 4


def _key(x: torch.Tensor, w: torch.Tensor, *tensors: torch.Tensor) -> tuple:
    return (*x.shape, w.shape[1], x.dtype, tuple(s for t in (x, *tensors) for s in (t.stride(0), t.stride(1))))


def _forward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: ShortConvConfig) -> None:
    B, L, C = x.shape
    n_t = triton.cdiv(L, cfg.block_t)
    _short_conv_fwd_kernel[(B * n_t, triton.cdiv(C, cfg.block_c))](
        x, w, y, L, C, w.shape[1], n_t, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


def short_conv_forward(x: torch.Tensor, w: torch.Tensor, config: ShortConvConfig | None = None) -> torch.Tensor:
    """``y [B, L, C]`` contiguous in x's dtype, for x with channel stride 1 and a contiguous ``w [C, K]``."""
    y = _tuning.new_buffer(x.shape, x.dtype, x.device)
    if config is None:
        config = pick_config("short_conv_fwd", _key(x, w, y), _CANDIDATES, lambda c: _forward(x, w, y, c), x.device)
    _forward(x, w, y, config)
    return y


def _backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, cfg: ShortConvConfig
              ) -> torch.Tensor:
    """dx into ``dx``; returns ``dw [C, K]`` fp32."""
    B, L, C = x.shape
    K = w.shape[1]
    taps = min(K, _TAPS)
    n_t = triton.cdiv(L, cfg.block_t)
    n_cb = triton.cdiv(C, cfg.block_c)
    tpp, n_seg = split_segments(n_t, n_cb, cfg.target_programs)
    dw_part = _tuning.new_buffer((B * n_seg, C, K), torch.float32, x.device)
    _short_conv_bwd_kernel[(B * n_seg, n_cb, triton.cdiv(K, taps))](
        x, w, dy, dx, dw_part, L, C, K, n_t, tpp, n_seg, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dx.stride(0), dx.stride(1), BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, TAPS=taps, num_warps=cfg.num_warps)
    return _tuning.sum_partials(dw_part)


def short_conv_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, config: ShortConvConfig | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)``: dx contiguous in x's dtype, dw ``[C, K]`` fp32 (inputs as in :func:`short_conv_forward`)."""
    dx = _tuning.new_buffer(x.shape, x.dtype, x.device)
    if config is None:
        config = pick_config("short_conv_bwd", _key(x, w, dy), _BWD_CANDIDATES,
                             lambda c: _backward(x, w, dy, dx, c), x.device)
    return dx, _backward(x, w, dy, dx, config)


# ---------------------------------------------------------------------------------------- custom operators
@torch.library.custom_op("sh2::causal_depthwise_conv", mutates_args=())
def causal_depthwise_conv_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y[b, t, c] = sum_s w[c, s] x[b, t - s, c]`` by the Triton kernel (fp16/bf16/fp32, non-empty)."""
    return short_conv_forward(channel_stride_one(x), w.contiguous())


@causal_depthwise_conv_op.register_fake
def _(x, w):
    return x.new_empty(x.shape)


@torch.library.custom_op("sh2::causal_depthwise_conv_backward", mutates_args=())
def causal_depthwise_conv_backward_op(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)`` in the dtypes of x and w."""
    dx, dw = short_conv_backward(channel_stride_one(x), w.contiguous(), channel_stride_one(dy))
    return dx, dw.to(w.dtype)


@causal_depthwise_conv_backward_op.register_fake
def _(x, w, dy):
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, dy: torch.Tensor):
    x, w = ctx.saved_tensors
    return causal_depthwise_conv_backward_op(x, w, dy)


causal_depthwise_conv_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def causal_depthwise_conv_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton causal depthwise convolution of ``x [B, L, C]`` with ``w [C, K]`` (differentiable).

    Args:
        x: ``[B, L, C]`` fp16/bf16/fp32, non-empty; any batch/token strides with channel stride 1 are
            used in place (other layouts are copied).
        w: ``[C, K]`` filters in causal orientation, any float dtype.

    Returns:
        ``[B, L, C]`` in x's dtype (fp32 accumulation).
    """
    return causal_depthwise_conv_op(channel_stride_one(x), w.contiguous())
