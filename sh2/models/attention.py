"""Multi-head attention (the MHA operator kind) with rotary embeddings (rotate-half, position interpolation,
configurable base), its KV-cache decoding and its cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sh2.models.mixer import Evo2Names, Evo2Tensor, Mixer, OperatorKind, TensorForm

if TYPE_CHECKING:
    from sh2.models.config import SH2Config


def _rope_angles(position_ids: torch.Tensor, head_dim: int, base: float, scaling: float, double: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float64) / head_dim))
    freqs = (position_ids.double() / scaling)[..., None] * inv_freq
    if not double:
        freqs = freqs.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


# An opaque operator, so that torch.compile materialises the [L, head_dim] tables once per layer. Traced as plain
# ops, Inductor inlines the float64 angles and cos/sin into every element of q and k (once per head) and RoPE
# then costs more than the attention kernel at 8K (docs/design.md, "RoPE tables").
@torch.library.custom_op("sh2::rope_cos_sin", mutates_args=())
def _rope_cos_sin_op(position_ids: torch.Tensor, head_dim: int, base: float, scaling: float, double: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_angles(position_ids, head_dim, base, scaling, double)


@_rope_cos_sin_op.register_fake
def _(position_ids, head_dim, base, scaling, double):
    shape = (*position_ids.shape, head_dim)
    dtype = torch.float64 if double else torch.float32
    return position_ids.new_empty(shape, dtype=dtype), position_ids.new_empty(shape, dtype=dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, scaling: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[..., L, head_dim]`` for positions divided by ``scaling`` (angles from float64, then
    fp32 unless ``dtype`` is float64: large positions keep their precision)."""
    return _rope_cos_sin_op(position_ids, head_dim, float(base), float(scaling), dtype == torch.float64)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head of ``x [B, L, H, hd]``; cos/sin ``[L, hd]`` or ``[B, L, hd]``."""
    xf = x if x.dtype == torch.float64 else x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values ``[B, kv_heads, capacity, head_dim]`` of one attention layer; ``length`` slots filled."""

    k: torch.Tensor
    v: torch.Tensor
    length: int

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some samples finished)."""
        self.k, self.v = self.k[index], self.v[index]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention on ``q [B, H, Lq, hd]``, ``k, v [B, Hkv, Lk, hd]`` (GQA by repetition), boolean mask."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(Mixer):
    """Causal MHA (optionally GQA). The fused QKV projection is stored as [q heads | k heads | v heads].

    Decoding keeps a KV cache allocated once for prompt + new tokens; left padding is masked out of the keys.
    """

    kind = OperatorKind(
        name="MHA", symbol="*", aliases=("ATTN",), summary="causal multi-head attention with rotary embeddings",
        sequence_op="attention", channel_groups="num_heads",
        evo2=Evo2Names(
            vortex_layers="attn_layer_idxs",
            tensors=(Evo2Tensor("qkv.weight", "inner_mha_cls.Wqkv.weight", "mixer.dense_projection.weight",
                                TensorForm.HEAD_ROWS),
                     Evo2Tensor("out_proj.weight", "inner_mha_cls.out_proj.weight", "mixer.dense.weight",
                                TensorForm.MATRIX),
                     Evo2Tensor("out_proj.bias", "inner_mha_cls.out_proj.bias", "mixer.dense.bias", TensorForm.VECTOR,
                                when="attn_out_bias")),
            vortex_keys=("inner_mha_cls.Wqkv.weight",),
            savanna_keys=()))

    def __init__(self, config: SH2Config, out_std: float) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.rope_base, self.rope_scaling = config.rope_base, config.rope_scaling
        D = config.hidden_size
        self.qkv = nn.Linear(D, (self.num_heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=config.attn_out_bias)
        self.init_std, self.out_std = config.init_std, out_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qkv.weight, std=self.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.out_std)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v, ``[B, L, heads, head_dim]``."""
        B, L, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.num_heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.view(B, L, self.num_heads, hd)
        k = k.view(B, L, self.kv_heads, hd)
        v = v.view(B, L, self.kv_heads, hd)
        cos, sin = rope_cos_sin(position_ids, hd, self.rope_base, self.rope_scaling, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)
        q, k, v = self.project(x, position_ids)
        out = self.ops.attention(q, k, v)
        return self.out_proj(out.reshape(B, L, self.num_heads * self.head_dim))

    def prefill(self, x: torch.Tensor, *, positions: torch.Tensor, valid: torch.Tensor | None = None,
                capacity: int = 0) -> tuple[torch.Tensor, KVCache]:
        B, L, _ = x.shape
        q, k, v = self.project(x, positions)
        if valid is None:
            out = self.ops.attention(q, k, v)
        else:
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            eye = torch.eye(L, dtype=torch.bool, device=x.device)
            # A padded query attends to itself only (finite garbage, never read); real queries skip pad keys.
            mask = causal & (valid[:, None, :] | eye)
            out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None]).transpose(1, 2)
        out = self.out_proj(out.reshape(B, L, self.num_heads * self.head_dim))
        shape = (B, self.kv_heads, max(capacity, L), self.head_dim)
        cache = KVCache(k.new_zeros(shape), v.new_zeros(shape), L)
        cache.k[:, :, :L] = k.transpose(1, 2)
        cache.v[:, :, :L] = v.transpose(1, 2)
        return out, cache

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: KVCache, *, position: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        q, k, v = self.project(x, position[:, None])
        i = state.length
        if i >= state.k.shape[2]:  # grow (only when generating past the planned capacity)
            grow = max(64, state.k.shape[2] // 2)
            state.k = F.pad(state.k, (0, 0, 0, grow))
            state.v = F.pad(state.v, (0, 0, 0, grow))
        state.k[:, :, i] = k[:, 0]
        state.v[:, :, i] = v[:, 0]
        state.length = i + 1
        mask = None if valid is None else valid[:, None, None, : i + 1]
        out = _sdpa(q.transpose(1, 2), state.k[:, :, : i + 1], state.v[:, :, : i + 1], mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, 1, self.num_heads * self.head_dim))

    @classmethod
    def flops_per_token(cls, config: SH2Config, seq_len: int) -> dict[str, float]:
        D, hd = config.hidden_size, config.head_dim
        # QK^T and PV over on average L/2 keys (causal halving): 2 * 2 * (L/2) * H * hd.
        return {"projections": 2 * D * (config.num_heads + 2 * config.kv_heads) * hd + 2 * D * D,
                "mixer": 2 * seq_len * config.num_heads * hd}

    @classmethod
    def block_working_set(cls, config: SH2Config) -> float:
        # Measured at the 7B width (H100/H200, bf16 autocast, flash attention).
        return 49.7
