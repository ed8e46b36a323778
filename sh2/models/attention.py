"""Multi-head attention with rotary embeddings (rotate-half, position interpolation, configurable base)."""

from __future__ import annotations

import torch
from torch import nn

from sh2.models.config import SH2Config
from sh2.models.seqops import LOCAL_OPS, SequenceOps


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, scaling: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[..., L, head_dim]`` for positions divided by ``scaling`` (angles from float64, then
    fp32 unless ``dtype`` is float64: large positions keep their precision)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float64) / head_dim))
    freqs = (position_ids.double() / scaling)[..., None] * inv_freq
    if dtype != torch.float64:
        freqs = freqs.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


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


class Attention(nn.Module):
    """Causal MHA (optionally GQA). The fused QKV projection is stored as [q heads | k heads | v heads]."""

    kind = "MHA"

    def __init__(self, config: SH2Config, out_std: float) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.rope_base, self.rope_scaling = config.rope_base, config.rope_scaling
        D = config.hidden_size
        self.qkv = nn.Linear(D, (self.num_heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=config.attn_out_bias)
        self.init_std, self.out_std = config.init_std, out_std
        self.ops: SequenceOps = LOCAL_OPS
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
