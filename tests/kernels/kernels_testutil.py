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


class GuardBands:
    """Places tensors between NaN guard bands, so that tests see out-of-bounds addresses on the interpreter.

    The CPU interpreter does not fault on an address outside a tensor. Here every tensor lives in the
    middle of a larger buffer whose head and tail hold NaN: a read outside a tensor brings NaN into the
    result, a write outside it overwrites a guard (:meth:`check`). Buffers from :meth:`new_buffer` (the
    launchers' allocator, patched in by :meth:`patch`) are NaN-filled as well, so a store that misses part
    of an output or of a partial-sum buffer also leaves NaN in the result.
    """

    def __init__(self, pad: int = 1024) -> None:
        self.pad = pad
        self.buffers: list[torch.Tensor] = []

    def _slot(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = torch.full((n + 2 * self.pad,), float("nan"), dtype=dtype, device=device)
        self.buffers.append(buf)
        return buf[self.pad:self.pad + n].view(shape)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``x`` between guard bands."""
        out = self._slot(tuple(x.shape), x.dtype, x.device)
        out.copy_(x)
        return out

    def new_buffer(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Drop-in for ``sh2.kernels._tuning.new_buffer``: a NaN-filled tensor between guard bands."""
        return self._slot(tuple(shape), dtype, device)

    def patch(self, monkeypatch) -> GuardBands:
        """Route every allocation of the launchers through :meth:`new_buffer`."""
        from sh2.kernels import _tuning

        monkeypatch.setattr(_tuning, "new_buffer", self.new_buffer)
        return self

    def check(self) -> None:
        """Assert that every guard band still holds only NaN (nothing was written outside a tensor)."""
        for buf in self.buffers:
            for band in (buf[:self.pad], buf[-self.pad:]):
                assert torch.isnan(band).all(), "a kernel wrote outside its tensor"
