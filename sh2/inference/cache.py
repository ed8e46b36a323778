"""Per-layer inference caches and the prefill/step functions of every operator (SPEC 1.6).

- Featurizer (all Hyena layers): the last ``K_f - 1`` projected inputs per channel, ``[B, 3D, K_f - 1]``.
- Hyena-SE / Hyena-MR: FIR filters; the last ``K - 1`` values of ``z = x2 * v``, ``[B, D, K - 1]`` (fp32).
- Hyena-LI: the exact recurrence ``s_n <- lambda_n s_n + z_t``, ``y_t = x1_t (sum_n R_n s_n + Dskip z_t)``
  with ``lambda_n = exp(log_pole_n)``; state ``[B, D, N]`` fp32. Prefill computes the state after the
  prompt, ``s_n = sum_t lambda_n^(L-1-t) z_t``, by chunked reductions over the prompt: at most
  ``~2^24`` filter values exist at a time, never a ``[B, D, N, L]`` tensor.
- MHA: a KV cache ``[B, kv_heads, capacity, head_dim]`` allocated once for prompt + new tokens.

Prefill runs each mixer's own parallel methods (``in_proj``, ``ops.short_conv``, ``mix``, ``out_proj``,
``project``, ``ops.attention``), so prefill logits equal :meth:`SH2Model.forward` bit for bit when no
padding mask is given. Step functions use the same parameters in the same precision (fp32 accumulation,
like the reference kernels), so stepwise logits agree with the parallel forward to fp32 rounding.

Left padding: a boolean ``valid [B, L]`` zeroes the projected inputs at padded positions (so every
convolution sees a zero history, exactly as at the start of a sequence) and masks padded keys in
attention; positions (RoPE) count real tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sh2.kernels.reference import expand_groups

_LI_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reference kernels: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _last(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` steps of ``x [B, L, C]`` as ``[B, C, n]`` (zero-padded on the left if L < n).

    Always a copy: a view would keep the whole prompt-length tensor alive in the cache (GBs per layer).
    """
    x = x[:, -n:].transpose(1, 2) if n > 0 else x[:, :0].transpose(1, 2)
    return F.pad(x, (n - x.shape[-1], 0)) if x.shape[-1] < n else x.clone(memory_format=torch.contiguous_format)


@dataclass
class HyenaCache:
    """State of one Hyena layer. ``taps`` are the FIR taps ``[D, K]`` reversed (oldest first)."""

    featurizer: torch.Tensor
    fir: torch.Tensor | None = None
    taps: torch.Tensor | None = None
    li: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    residues: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some samples finished)."""
        self.featurizer = self.featurizer[index]
        if self.fir is not None:
            self.fir = self.fir[index]
        if self.li is not None:
            self.li = self.li[index]


@dataclass
class KVCache:
    """Keys and values ``[B, kv_heads, capacity, head_dim]`` of one attention layer; ``length`` slots filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int

    def select(self, index: torch.Tensor) -> None:
        self.k, self.v = self.k[index], self.v[index]


def li_prefill_state(z: torch.Tensor, log_poles: torch.Tensor) -> torch.Tensor:
    """LI state after a prompt: ``s[b, d, n] = sum_t exp(log_poles[d, n] * (L - 1 - t)) * z[b, t, d]``.

    Args:
        z: gated input ``[B, L, D]`` (fp32/fp64).
        log_poles: ``[D, N]`` (negative). Padded positions must already be zero in ``z``.

    Returns:
        ``[B, D, N]`` in the dtype of ``z``. Computed in chunks of T tokens with ``D * N * T <= 2^24``.
    """
    B, L, D = z.shape
    N = log_poles.shape[1]
    lp = log_poles.to(z.dtype)
    state = torch.zeros(B, D, N, dtype=z.dtype, device=z.device)
    step = max(1, _LI_CHUNK_ELEMENTS // max(1, D * N))
    for t0 in range(0, L, step):
        t1 = min(L, t0 + step)
        age = (L - 1 - torch.arange(t0, t1, device=z.device, dtype=z.dtype))
        weights = torch.exp(lp[:, :, None] * age)  # [D, N, T]
        state += torch.einsum("btd,dnt->bdn", z[:, t0:t1], weights)
    return state


def hyena_prefill(mixer: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, HyenaCache]:
    """Parallel forward of a Hyena mixer on the prompt ``x [B, L, D]`` plus its decoding cache."""
    D = mixer.hidden_size
    p = mixer.in_proj(x)
    if valid is not None:
        p = p * valid[..., None].to(p.dtype)
    u = mixer.ops.short_conv(p, mixer.short_filter)
    x1, x2, v = u.split(D, dim=-1)
    out = mixer.out_proj(mixer.mix(x1, x2, v))
    cd = compute_dtype(x.dtype)
    cache = HyenaCache(featurizer=_last(p, mixer.short_filter.shape[1] - 1))
    z = x2.to(cd) * v.to(cd)
    if mixer.kind in ("SE", "MR"):
        h = mixer.filter.weight().to(cd)
        cache.taps = expand_groups(h, D).flip(-1)
        cache.fir = _last(z, h.shape[1] - 1)
    else:
        log_poles = mixer.filter.log_poles().to(cd)
        cache.li = li_prefill_state(z, log_poles)
        cache.lam, cache.residues = torch.exp(log_poles), mixer.filter.residues().to(cd)
    return out, cache


@torch.no_grad()
def hyena_step(mixer: torch.nn.Module, x: torch.Tensor, cache: HyenaCache) -> torch.Tensor:
    """One decoding step of a Hyena mixer: ``x [B, 1, D]`` -> ``[B, 1, D]``; updates ``cache`` in place."""
    D = mixer.hidden_size
    cd = compute_dtype(x.dtype)
    p = mixer.in_proj(x)[:, 0]  # [B, 3D]
    window = torch.cat([cache.featurizer, p[..., None]], dim=-1)  # [B, 3D, K_f], oldest first
    cache.featurizer = window[..., 1:]
    u = (window.to(cd) * mixer.short_filter.to(cd).flip(-1)).sum(-1).to(x.dtype)
    x1, x2, v = u.split(D, dim=-1)
    z = x2.to(cd) * v.to(cd)  # [B, D]
    if cache.li is None:
        window = torch.cat([cache.fir, z[..., None]], dim=-1)  # [B, D, K]
        cache.fir = window[..., 1:]
        y = (window * cache.taps).sum(-1)
    else:
        cache.li = cache.lam * cache.li + z[..., None]
        y = (cache.li * cache.residues).sum(-1)
    if mixer.skip is not None:
        y = y + mixer.skip.to(cd) * z
    out = (x1.to(cd) * y).to(x.dtype)
    return mixer.out_proj(out[:, None])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention on ``q [B, H, Lq, hd]``, ``k, v [B, Hkv, Lk, hd]`` (GQA by repetition), boolean mask."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_prefill(mixer: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor,
                      valid: torch.Tensor | None, capacity: int) -> tuple[torch.Tensor, KVCache]:
    """Parallel attention on the prompt plus a KV cache with room for ``capacity`` tokens in total."""
    B, L, _ = x.shape
    q, k, v = mixer.project(x, positions)
    if valid is None:
        out = mixer.ops.attention(q, k, v)
    else:
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=x.device)
        # A padded query attends to itself only (finite garbage, never read); real queries skip pad keys.
        mask = causal & (valid[:, None, :] | eye)
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None]).transpose(1, 2)
    out = mixer.out_proj(out.reshape(B, L, mixer.num_heads * mixer.head_dim))
    shape = (B, mixer.kv_heads, max(capacity, L), mixer.head_dim)
    cache = KVCache(k.new_zeros(shape), v.new_zeros(shape), L)
    cache.k[:, :, :L] = k.transpose(1, 2)
    cache.v[:, :, :L] = v.transpose(1, 2)
    return out, cache


@torch.no_grad()
def attention_step(mixer: torch.nn.Module, x: torch.Tensor, position: torch.Tensor, cache: KVCache,
                   valid: torch.Tensor | None) -> torch.Tensor:
    """One decoding step: ``x [B, 1, D]`` at RoPE ``position [B]``; ``valid [B, length + 1]`` or None."""
    B = x.shape[0]
    q, k, v = mixer.project(x, position[:, None])
    i = cache.length
    if i >= cache.k.shape[2]:  # grow (only when generating past the planned capacity)
        grow = max(64, cache.k.shape[2] // 2)
        cache.k = F.pad(cache.k, (0, 0, 0, grow))
        cache.v = F.pad(cache.v, (0, 0, 0, grow))
    cache.k[:, :, i] = k[:, 0]
    cache.v[:, :, i] = v[:, 0]
    cache.length = i + 1
    mask = None if valid is None else valid[:, None, None, : i + 1]
    out = _sdpa(q.transpose(1, 2), cache.k[:, :, : i + 1], cache.v[:, :, : i + 1], mask)
    return mixer.out_proj(out.transpose(1, 2).reshape(B, 1, mixer.num_heads * mixer.head_dim))
