"""Context-parallel Hyena-LI by a distributed decimation-in-frequency FFT (scheme ``p2p_fft``; docs/design.md)."""

from __future__ import annotations

import math

import torch

from sh2 import kernels
from sh2.strategies.cp_comm import CPGroup, exchange


def _twiddle(n: torch.Tensor, N: int, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """``exp(-2 pi i n / N)`` computed in float64 and rounded once."""
    angle = (-2.0 * math.pi / N) * (n.to(torch.float64) % N)
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


class P2PFFTConv:
    """Causal long convolution with the sequence sharded, by a distributed radix-2 DIF FFT.

    The causal convolution of z and h (length L) is ``irfft(fft(z_pad) * fft(h_pad))[:L]`` with FFTs of
    size N = 2L. The transform is computed without gathering the sequence, with pairwise exchanges only:

    1. Stage 0 (local). The first DIF butterfly pairs n with n + L, which is padding (zero). So
       ``s0[n] = x[n]`` (its DFT of size L gives the even frequencies) and ``s1[n] = x[n] W_2L^n`` (odd
       frequencies): two length-L sequences, still zig-zag sharded, no communication.
    2. Stage 1 (partner ``cp-1-r``). The next butterfly pairs n with n + L/2, i.e. chunk j with chunk
       j + cp. Rank r holds chunk r; chunk r + cp is the B chunk of rank cp-1-r, and vice versa. The two
       ranks swap their B chunks, and rank r forms ``a = s[r] + s[r+cp]`` and ``b = (s[r] - s[r+cp]) W_L^n``
       for the positions of chunk r. Now four sequences of length L/2 are *block* distributed: rank r holds
       block r (c values) of each.
    3. Stages 2.. (partner ``r xor half`` for half = cp/2, cp/4, ..., 1). Standard block-distributed
       radix-2 DIF: both ranks swap their blocks; the lower rank keeps the sum, the upper one the twiddled
       difference. After log2(cp) stages each rank holds c values per sequence whose local FFT of size c
       yields c frequencies (in bit-reversed rank order, which does not matter: see 4).
    4. Multiply by the filter's spectrum. The filter's taps for the rank's own zig-zag positions are built
       locally (the modal filter is analytic: ``h[t0 + s]`` is the modal filter with residues scaled by
       ``exp(log_pole * t0)``) and go through the same transform in the same batch, so both spectra have
       the same (permuted) frequency order and the product is pointwise.
    5. Inverse: the exact inverse of each stage in reverse order (local inverse FFT; each butterfly
       ``x_lo = (a + b / w) / 2``, ``x_hi = (a - b / w) / 2`` after a swap with the same partner; stage 1 sends
       chunk r + cp back to its owner; stage 0 keeps ``y[n] = (s0[n] + s1[n] / W_2L^n) / 2`` for n < L).
       The output lands in the input's zig-zag sharding: no all-to-all at all.

    Backward: autograd's. Each exchange is a swap, whose adjoint is the same swap of the gradients; the
    butterflies and local FFTs are differentiated in complex arithmetic (fp32 / complex64 throughout).

    Constraint: cp a power of two. Communication per layer and rank (complex64, ``B + 1`` sequences
    including the filter): ``(B + 1) D c (4 + 8 log2 cp)`` complex values for forward and inverse
    transforms, the same again backward; more than the all-to-all scheme, but only between rank pairs.
    """

    def __init__(self, cpg: CPGroup) -> None:
        cp = cpg.size
        if cp < 1 or cp & (cp - 1):
            raise ValueError(f"li_scheme='p2p_fft' needs cp.size to be a power of two, got {cp}")
        self.cpg = cpg

    def _positions(self, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        r, cp = self.cpg.rank, self.cpg.size
        ar = torch.arange(c, device=device)
        return r * c + ar, (2 * cp - 1 - r) * c + ar

    def local_filter(self, log_poles: torch.Tensor, residues: torch.Tensor, c: int) -> torch.Tensor:
        """The modal filter at this rank's zig-zag positions, ``[D, 2c]`` fp32."""
        r, cp = self.cpg.rank, self.cpg.size
        parts = []
        for t0 in (r * c, (2 * cp - 1 - r) * c):
            shift = torch.exp(log_poles.float() * t0)
            parts.append(kernels.modal_filter(log_poles, residues.float() * shift, c))
        return torch.cat(parts, dim=-1)

    def forward_transform(self, x: torch.Tensor) -> torch.Tensor:
        """DFT of size 2L of zero-padded zig-zag shards ``x [..., 2c]`` (real) -> ``[4, ..., c]`` complex."""
        r, cp = self.cpg.rank, self.cpg.size
        c = x.shape[-1] // 2
        L = 2 * cp * c
        pos_a, pos_b = self._positions(c, x.device)
        xa, xb = x[..., :c].to(torch.complex64), x[..., c:].to(torch.complex64)
        sa = torch.stack([xa, xa * _twiddle(pos_a, 2 * L)])
        sb = torch.stack([xb, xb * _twiddle(pos_b, 2 * L)])
        u = exchange(sb, cp - 1 - r, self.cpg)  # chunk r + cp of both sequences
        w1 = _twiddle(pos_a, L)
        X = torch.cat([sa + u, (sa - u) * w1])
        half = cp // 2
        while half >= 1:
            other = exchange(X, r ^ half, self.cpg)
            if r & half:
                n = (r & (half - 1)) * c + torch.arange(c, device=x.device)
                X = (other - X) * _twiddle(n, 2 * half * c)
            else:
                X = X + other
            half //= 2
        return torch.fft.fft(X, dim=-1)

    def inverse_transform(self, F: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`forward_transform`, keeping the first L outputs: ``[4, ..., c]`` -> ``[..., 2c]``."""
        r, cp = self.cpg.rank, self.cpg.size
        c = F.shape[-1]
        L = 2 * cp * c
        X = torch.fft.ifft(F, dim=-1)
        half = 1
        while half < cp:
            other = exchange(X, r ^ half, self.cpg)
            n = (r & (half - 1)) * c + torch.arange(c, device=F.device)
            winv = _twiddle(n, 2 * half * c).conj()
            X = (other - X * winv) * 0.5 if r & half else (X + other * winv) * 0.5
            half *= 2
        pos_a, pos_b = self._positions(c, F.device)
        w1inv = _twiddle(pos_a, L).conj()
        a, b = X[:2], X[2:] * w1inv
        s_a, s_hi = (a + b) * 0.5, (a - b) * 0.5
        s_b = exchange(s_hi, cp - 1 - r, self.cpg)
        ya = (s_a[0] + s_a[1] * _twiddle(pos_a, 2 * L).conj()) * 0.5
        yb = (s_b[0] + s_b[1] * _twiddle(pos_b, 2 * L).conj()) * 0.5
        return torch.cat([ya.real, yb.real], dim=-1)

    def causal_conv(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Causal convolution of zig-zag shards ``z [B, 2c, D]`` with filter shards ``h [D, 2c]`` (fp32 out)."""
        B = z.shape[0]
        x = torch.cat([z.float().transpose(1, 2), h.float()[None]], dim=0)  # [B + 1, D, 2c]
        F = self.forward_transform(x)
        y = self.inverse_transform(F[:, :B] * F[:, B:])
        return y.transpose(1, 2)

    def long_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                  residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Hyena-LI ``q * (conv(k v, h) + Dskip k v)`` on ``[B, 2c, D]`` zig-zag shards."""
        z = k.float() * v.float()
        h = self.local_filter(log_poles, residues, q.shape[1] // 2)
        y = self.causal_conv(z, h)
        if bias is not None:
            y = y + bias.float() * z
        return (q.float() * y).to(q.dtype)

    def modal_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The modal recurrence's operator computed as this scheme computes it: an FFT convolution with the
        materialised modal filter (the same function of the inputs)."""
        return self.long_conv(q, k, v, log_poles, residues, bias)
