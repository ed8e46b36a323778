"""Shared helpers of the Triton launchers: autotuning, buffers, segments and a partial-sum reducer.

Autotuning: :func:`pick_config` times each candidate launch once per *key* (a tuple describing the
shape and dtype), remembers the fastest, and returns it on every later call with the same key. It is
off when the ``autotune`` setting is (``SH2_AUTOTUNE=0``), on CPU tensors and under the Triton
interpreter; then the first candidate, which callers order to be a sane default, is used. Kernels tuned
this way must be idempotent (every launch overwrites its outputs), which all sh2 kernels are: partial
sums are written per program and reduced afterwards, never accumulated with atomics. Autotuning runs
inside the eager bodies of the ``sh2::`` custom operators, so ``torch.compile`` never traces it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from sh2.kernels.settings import current_settings

_CACHE: dict[tuple, Any] = {}


def interpreted() -> bool:
    """Whether Triton runs under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return current_settings().interpret


def autotune_enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` may be autotuned (CUDA, not interpreted, the ``autotune`` setting on)."""
    return device.type == "cuda" and not interpreted() and current_settings().autotune


def new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor: every output and scratch buffer of the launchers is allocated here.

    One allocation point lets the address tests place every buffer between guard bands.
    """
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def split_segments(n_items: int, n_cols: int, target: int) -> tuple[int, int]:
    """Cut ``n_items`` tiles of a sequence into segments walked by one program each.

    Args:
        n_items: tiles (chunks) along the sequence.
        n_cols: programs along the other grid axis (channel blocks).
        target: about how many programs ``n_seg * n_cols`` to aim for (per batch row).

    Returns:
        ``(items_per_segment, n_seg)``; every segment holds at least one tile.
    """
    n_seg = max(1, min(n_items, target // max(1, n_cols)))
    per = triton.cdiv(n_items, n_seg)
    return per, triton.cdiv(n_items, per)


def pick_config(name: str, key: tuple, candidates: Sequence[Any], launch: Callable[[Any], None],
                device: torch.device) -> Any:
    """Return the fastest of ``candidates`` for ``key``, timing them on the first call.

    Args:
        name: kernel family name (part of the cache key).
        key: hashable description of the problem (shapes, dtypes, strides that matter).
        candidates: configurations, the default first.
        launch: runs the kernel(s) with one configuration; must be idempotent.
        device: where the tensors live; autotuning happens only where :func:`autotune_enabled`.

    Returns:
        The chosen configuration (the first candidate when autotuning is off).
    """
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{name}: kernels are autotuned in an operator's eager body, never in traced code")
    if len(candidates) == 1 or not autotune_enabled(device):
        return candidates[0]
    full_key = (name, *key)
    if full_key in _CACHE:
        return _CACHE[full_key]
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config that does not compile or runs out of resources is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _CACHE[full_key] = best
    return best


@triton.jit
def tile_ptrs(base, t, stride_t, offs_c):
    """Pointers of a ``[len(t), len(offs_c)]`` tile of a ``[L, C]`` slice with channel stride 1."""
    return base + t.to(tl.int64)[:, None] * stride_t + offs_c[None, :]


@triton.jit
def load_tile(base, t, stride_t, offs_c, L, mc):
    """Load a tile as fp32; rows outside ``[0, L)`` and channels where ``mc`` is false read as zero."""
    m = ((t >= 0) & (t < L))[:, None] & mc[None, :]
    return tl.load(tile_ptrs(base, t, stride_t, offs_c), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, P, N, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[n] = sum_p x[p, n] for a contiguous fp32 [P, N] array."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ptrs = x_ptr + offs_p.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc += tl.load(ptrs, mask=(offs_p < P)[:, None] & mask_n[None, :], other=0.0)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0), mask=mask_n)


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """Reduce contiguous fp32 per-program partial sums ``[P, *rest]`` over the first axis in Triton.

    Returns:
        fp32 tensor of shape ``rest``.
    """
    P = partials.shape[0]
    rest = partials.shape[1:]
    flat = partials.reshape(P, -1)
    N = flat.shape[1]
    out = new_buffer((N,), torch.float32, partials.device)
    BLOCK_N = 256
    _sum_rows_kernel[(triton.cdiv(N, BLOCK_N),)](flat, out, P, N, BLOCK_N=BLOCK_N, BLOCK_P=8)
    return out.reshape(rest)


def channel_stride_one(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` if its last (channel) stride is 1, else a contiguous copy; other strides are kept."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact ``"ieee"`` for fp32 (no tf32), irrelevant for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"
