"""Shared helpers of the Triton kernels: shape-keyed autotuning with a cache, and a partial-sum reducer.

Autotuning: :func:`pick_config` times each candidate launch once per *key* (a tuple describing the
shape and dtype), remembers the fastest, and returns it on every later call with the same key. It is
off when ``SH2_AUTOTUNE=0``, on CPU tensors (the Triton interpreter) and under ``TRITON_INTERPRET=1``;
then the first candidate, which callers order to be a sane default, is used. Kernels tuned this way
must be idempotent (every launch overwrites its outputs), which all sh2 kernels are: partial sums are
written per program and reduced afterwards, never accumulated with atomics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

_CACHE: dict[tuple, Any] = {}


def interpreted() -> bool:
    """Whether Triton runs under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` may be autotuned (CUDA, not interpreted, ``SH2_AUTOTUNE`` != 0)."""
    if device.type != "cuda" or interpreted():
        return False
    return os.environ.get("SH2_AUTOTUNE", "1").strip() not in ("0", "false", "off")


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
    out = torch.empty(N, device=partials.device, dtype=torch.float32)
    BLOCK_N = 256
    _sum_rows_kernel[(triton.cdiv(N, BLOCK_N),)](flat, out, P, N, BLOCK_N=BLOCK_N, BLOCK_P=8)
    return out.reshape(rest)


def channel_stride_one(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` if its last (channel) stride is 1, else a contiguous copy; other strides are kept."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact ``"ieee"`` for fp32 (no tf32), irrelevant for 16-bit."""
    return "ieee" if dtype == torch.float32 else "tf32"
