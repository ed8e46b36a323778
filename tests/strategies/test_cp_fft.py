"""The p2p FFT convolution of Hyena-LI (docs/design.md, "Distributed FFT convolution"), first as a
single-process simulation of cp = 2.

``simulated_cp2_spectra`` runs the two ranks of the radix-2 decimation-in-frequency algorithm side by side
on one process, in float64, with the "exchanges" written as plain indexing. It checks the algebra the
distributed :class:`~sh2.strategies.cp_fft.P2PFFTConv` relies on: which frequencies each rank ends up with
(bit-reversed order) and that the inverse returns the causal convolution in the zig-zag sharding.
"""

from __future__ import annotations

import math

import torch

from sh2.kernels import reference
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_fft import P2PFFTConv
from sh2.strategies.sharding import shard_sequence, unshard_sequence


def W(n: torch.Tensor, N: int) -> torch.Tensor:
    return torch.exp(-2j * math.pi * n.double() / N)


def simulated_cp2_spectra(x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Rank -> ``[4, c]`` spectra of the length-2L zero-padded DFT of ``x [L]``, for cp = 2 (float64)."""
    L = x.shape[0]
    c = L // 4
    ar = torch.arange(c)
    chunk = {j: x[j * c:(j + 1) * c].to(torch.complex128) for j in range(4)}
    out = {}
    stage1 = {}
    for r in (0, 1):  # rank r holds chunks r (A) and 3 - r (B)
        pos_a = r * c + ar
        s_a = torch.stack([chunk[r], chunk[r] * W(pos_a, 2 * L)])              # stage 0, local
        pos_u = (r + 2) * c + ar                                               # chunk r + 2: B of rank 1 - r
        s_u = torch.stack([chunk[r + 2], chunk[r + 2] * W(pos_u, 2 * L)])
        stage1[r] = torch.cat([s_a + s_u, (s_a - s_u) * W(pos_a, L)])          # stage 1, partner 1 - r
    for r in (0, 1):                                                           # stage 2, partner r ^ 1
        lo, hi = stage1[0], stage1[1]
        X = lo + hi if r == 0 else (lo - hi) * W(ar, 2 * c)
        out[r] = torch.fft.fft(X, dim=-1)
    return out


def test_simulated_cp2_dif_gives_the_dft_in_bit_reversed_order() -> None:
    L = 32
    x = torch.randn(L, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = torch.fft.fft(x, n=2 * L)
    spectra = simulated_cp2_spectra(x)
    # sequence 0 = s0 lower-half-of-stage-1 (a): frequencies 0 mod 8 on rank 0 and 4 mod 8 on rank 1; the
    # odd branch s1 gives 1 (mod 2), the stage-1 difference b gives 2 (mod 4) and so on.
    offsets = {(0, 0): 0, (1, 0): 4, (0, 1): 1, (1, 1): 5, (0, 2): 2, (1, 2): 6, (0, 3): 3, (1, 3): 7}
    for (rank, seq), offset in offsets.items():
        expected = X[offset::8]
        assert torch.allclose(spectra[rank][seq], expected, atol=1e-10), (rank, seq)


def test_simulated_cp2_convolution_matches_direct_causal_conv() -> None:
    L = 32
    g = torch.Generator().manual_seed(1)
    z = torch.randn(L, generator=g, dtype=torch.float64)
    h = torch.randn(L, generator=g, dtype=torch.float64)
    Z, Hs = simulated_cp2_spectra(z), simulated_cp2_spectra(h)
    # The product spectrum, back to time by a full inverse DFT (frequencies placed by the mapping above).
    Y = torch.zeros(2 * L, dtype=torch.complex128)
    offsets = {(0, 0): 0, (1, 0): 4, (0, 1): 1, (1, 1): 5, (0, 2): 2, (1, 2): 6, (0, 3): 3, (1, 3): 7}
    for (rank, seq), offset in offsets.items():
        Y[offset::8] = Z[rank][seq] * Hs[rank][seq]
    y = torch.fft.ifft(Y).real[:L]
    direct = torch.stack([sum(h[s] * z[t - s] for s in range(t + 1)) for t in range(L)])
    assert torch.allclose(y, direct, atol=1e-10)


def test_p2p_fft_on_one_rank_matches_the_reference_fft_conv() -> None:
    """cp = 1 runs every stage locally (the partner is the rank itself): same result as the kernel."""
    g = torch.Generator().manual_seed(2)
    B, L, D = 2, 64, 8
    z = torch.randn(B, L, D, generator=g)
    h = torch.randn(D, L, generator=g) * 0.1
    conv = P2PFFTConv(CPGroup(group=None, rank=0, size=1, global_ranks=[0]))
    y = conv.causal_conv(z, h)
    ref = reference.fft_causal_conv(z, h)
    assert float((y - ref).norm() / ref.norm()) < 1e-6


def test_zigzag_shards_roundtrip_and_balance() -> None:
    x = torch.arange(2 * 16).view(2, 16)
    shards = [shard_sequence(x, 4, r) for r in range(4)]
    assert shards[0][0].tolist() == [0, 1, 14, 15] and shards[3][0].tolist() == [6, 7, 8, 9]
    assert torch.equal(unshard_sequence(shards), x)
