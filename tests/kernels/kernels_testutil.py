"""Independent float64 oracles and error metrics shared by the kernel tests."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN anywhere gives inf)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def toeplitz_gated_conv64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """Brute force ``q * (T z + bias z)`` with an explicit [L, L] Toeplitz matrix per group, float64.

    Written independently of ``sh2.kernels.reference``: ``T[t, s] = h[g, t - s]`` for ``0 <= t - s < K``.
    """
    B, L, D = q.shape
    G, K = h.shape
    dg = D // G
    t = torch.arange(L)
    lag = t[:, None] - t[None, :]  # [L, L]
    valid = (lag >= 0) & (lag < K)
    z = k * v
    out = []
    for g in range(G):
        T = torch.where(valid, h[g][lag.clamp(0, K - 1)], torch.zeros((), dtype=h.dtype))  # [L, L]
        zg = z[..., g * dg:(g + 1) * dg]  # [B, L, dg]
        out.append(torch.einsum("ts,bsc->btc", T, zg))
    y = torch.cat(out, dim=-1)
    if bias is not None:
        y = y + bias * z
    return q * y


def leaf64(x: torch.Tensor) -> torch.Tensor:
    """A float64 CPU leaf copy of ``x`` that requires grad."""
    return x.detach().double().cpu().requires_grad_(True)
