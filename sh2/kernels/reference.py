"""Pure-PyTorch reference implementations of every sh2 kernel.

These are the oracles the Triton kernels are tested against, and the path used on CPU. Filters are
in *causal orientation* everywhere in sh2: ``h[..., 0]`` multiplies the current token, ``h[..., s]``
the token ``s`` steps back. All arithmetic is done in float32 (float64 inputs stay float64) and the
result is cast back to the input dtype.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_depthwise_conv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution ``y[b, t, c] = sum_s w[c, s] * x[b, t - s, c]``.

    Computed as K shifted multiply-adds in the ``[B, L, C]`` layout into one fp32 accumulator: no
    transposed or padded fp32 copies of the input (the featurizer runs on ``[B, L, 3D]`` tensors of
    several GB at long L).

    Args:
        x: input ``[B, L, C]``.
        w: filters ``[C, K]`` in causal orientation.

    Returns:
        ``[B, L, C]`` in the dtype of ``x``.
    """
    cd = _compute_dtype(x.dtype)
    K = w.shape[1]
    wc = w.to(cd)
    y = x.to(cd) * wc[:, 0]
    L = x.shape[1]
    for s in range(1, min(K, L)):
        y[:, s:].addcmul_(x[:, : L - s], wc[:, s])
    return y.to(x.dtype)


def expand_groups(h: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat grouped filters ``[G, K]`` to per-channel filters ``[D, K]`` (channel c uses ``c // (D // G)``)."""
    G = h.shape[0]
    return h.repeat_interleave(channels // G, dim=0)


def gated_fir_conv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``q * (conv(k * v, h) + bias * (k * v))`` with a direct causal convolution.

    Args:
        q, k, v: ``[B, L, D]`` (post-gate, pre-gate, value).
        h: grouped filters ``[G, K]``, causal orientation.
        bias: per-channel skip (Dskip) ``[D]`` or None.
    """
    cd = _compute_dtype(q.dtype)
    z = k.to(cd) * v.to(cd)
    y = causal_depthwise_conv_ref(z, expand_groups(h.to(cd), q.shape[-1]))
    if bias is not None:
        y = y + bias.to(cd) * z
    return (q.to(cd) * y).to(q.dtype)


def fft_causal_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Causal linear convolution along dim 1 of ``z [B, L, D]`` with ``h [D, K]`` (K <= L) by FFT of size 2L."""
    L = z.shape[1]
    n = 2 * L
    zf = torch.fft.rfft(z.transpose(1, 2), n=n)  # [B, D, n/2+1]
    hf = torch.fft.rfft(h, n=n)  # [D, n/2+1]
    return torch.fft.irfft(zf * hf, n=n)[..., :L].transpose(1, 2)


def gated_fft_conv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Same semantics as :func:`gated_fir_conv_ref`, computed by an fp32 FFT; ``h [G, K]`` with K up to L."""
    cd = _compute_dtype(q.dtype)
    L = q.shape[1]
    z = k.to(cd) * v.to(cd)
    hh = expand_groups(h.to(cd), q.shape[-1])[:, :L]
    y = fft_causal_conv(z, hh)
    if bias is not None:
        y = y + bias.to(cd) * z
    return (q.to(cd) * y).to(q.dtype)


def modal_filter_ref(
    log_poles: torch.Tensor, residues: torch.Tensor, length: int, chunk_channels: int = 256
) -> torch.Tensor:
    """The Hyena-LI modal filter ``h[c, t] = sum_n residues[c, n] * exp(log_poles[c, n] * t)``.

    Built in channel chunks so that the ``[D, N, L]`` tensor is never materialised at once.

    Args:
        log_poles: ``[D, N]`` (negative: decay rates per token are ``exp(log_poles)`` in (0, 1)).
        residues: ``[D, N]``.
        length: number of taps L.
        chunk_channels: channels per chunk.

    Returns:
        ``[D, L]`` float32 (float64 if the parameters are float64).
    """
    cd = _compute_dtype(log_poles.dtype)
    D = log_poles.shape[0]
    t = torch.arange(length, device=log_poles.device, dtype=cd)
    out = torch.empty(D, length, device=log_poles.device, dtype=cd)
    for c0 in range(0, D, chunk_channels):
        lp = log_poles[c0 : c0 + chunk_channels].to(cd)
        r = residues[c0 : c0 + chunk_channels].to(cd)
        out[c0 : c0 + chunk_channels] = torch.einsum("cn,cnt->ct", r, torch.exp(lp[..., None] * t))
    return out


def gated_modal_conv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor, residues: torch.Tensor,
    bias: torch.Tensor | None = None, initial_state: torch.Tensor | None = None, return_state: bool = False,
    chunk: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hyena-LI by its modal recurrence ``s_n <- lambda_n s_n + z``, ``y = q (sum_n R_n s_n + bias z)``.

    The recurrence is advanced ``chunk`` tokens at a time: inside a chunk the output is the convolution with
    the chunk's first ``chunk`` filter taps ``h[m] = sum_n R_n lambda_n^m`` plus the decayed start state, and
    the state jumps by ``lambda^chunk``. With ``chunk=1`` this is literally the token-by-token recurrence.
    Only non-positive powers of lambda appear (``exp(log_poles * m)``, m >= 0).

    Args:
        q, k, v: ``[B, L, D]`` (post-gate, pre-gate, value).
        log_poles: ``[D, N]``, negative (``lambda = exp(log_poles)`` in (0, 1)).
        residues: ``[D, N]``.
        bias: Dskip ``[D]`` or None.
        initial_state: ``[B, D, N]`` state before the first token (None: zero).
        return_state: also return the state after the last token.
        chunk: tokens per vectorised step.

    Returns:
        ``y [B, L, D]`` in q's dtype, and the final state ``[B, D, N]`` (fp32, fp64 for fp64 inputs) when
        ``return_state``.
    """
    cd = _compute_dtype(q.dtype)
    B, L, D = q.shape
    lp, r = log_poles.to(cd), residues.to(cd)
    z = k.to(cd) * v.to(cd)
    s = (initial_state.to(cd) if initial_state is not None
         else torch.zeros(B, D, lp.shape[1], device=q.device, dtype=cd))
    outs = []
    for t0 in range(0, L, chunk):
        T = min(chunk, L - t0)
        zc = z[:, t0:t0 + T]
        m = torch.arange(T, device=q.device, dtype=cd)
        powers = torch.exp(lp[..., None] * m)  # [D, N, T]: lambda^m
        taps = torch.einsum("dn,dnm->dm", r, powers)  # h[m]
        lag = m[:, None] - m[None, :]
        toeplitz = torch.where(lag >= 0, taps[:, lag.clamp(min=0).long()], taps.new_zeros(()))  # [D, T, T]
        conv = torch.einsum("dtu,bud->btd", toeplitz, zc)
        conv = conv + torch.einsum("bdn,dnt->btd", s * r, powers * torch.exp(lp)[..., None])  # R lambda^(t+1) s
        s = s * torch.exp(lp * T) + torch.einsum("dnu,bud->bdn", powers.flip(-1), zc)  # lambda^(T-1-u) z_u
        outs.append(conv)
    y = torch.cat(outs, dim=1) if outs else z.new_zeros(B, 0, D)
    if bias is not None:
        y = y + bias.to(cd) * z
    y = (q.to(cd) * y).to(q.dtype)
    return (y, s) if return_state else y
