"""Test helpers: random Evo 2 checkpoints in the real formats and an independent float64 Vortex forward.

Nothing here imports sh2: the forward below is written from the Vortex semantics (listed below) so
that the sh2 readers are checked against an independent oracle:

- projection output channels are interleaved: channel ``3c + s`` is stream s, and Vortex names the
  streams ``(x2, x1, v)``; the output is ``x2 * (conv(x1 * v) + D * x1 * v)``;
- the featurizer and filters shorter than 128 taps are applied with ``conv1d`` (cross-correlation, the
  last tap multiplies the current token); filters of 128 taps or more (MR) and the LI filter built from
  ``log_poles``/``residues`` are causal impulse responses, with the D term;
- RMSNorm ``scale * x / (||x|| / sqrt(D) + eps)``; gated MLP with exact GELU in layer 0 only when
  ``evo2_style_activations``; tied head;
- attention: ``Wqkv`` rows per head ``[heads, (q, k, v), head_dim]``, rotate-half RoPE over the whole head
  at positions ``t / rotary_emb_scaling_factor``, causal softmax.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F

F64 = torch.float64


def tiny_vortex_yaml(layout: str = "SDH*SDH*", D: int = 32, heads: int = 2, mlp: int = 64) -> dict:
    """A small Vortex config (Evo 2 style) whose layers follow ``layout`` (S/D/H/*)."""
    idx = {c: [i for i, ch in enumerate(layout) if ch == c] for c in "SDH*"}
    return {
        "model_name": "tiny-evo2", "vocab_size": 512, "hidden_size": D, "num_filters": D, "num_layers": len(layout),
        "hcs_layer_idxs": idx["S"], "hcm_layer_idxs": idx["D"], "hcl_layer_idxs": idx["H"],
        "attn_layer_idxs": idx["*"], "hcm_filter_length": 128, "hcs_filter_length": 7, "hcl_filter_groups": D,
        "hcm_filter_groups": D // 16 * 2, "hcs_filter_groups": D // 16 * 2, "short_filter_length": 3,
        "num_attention_heads": heads, "short_filter_bias": False, "eps": 1e-6, "state_size": 16,
        "rotary_emb_base": 10000, "rotary_emb_scaling_factor": 2, "use_interpolated_rotary_pos_emb": True,
        "inner_mlp_size": mlp, "proj_groups": 1, "column_split_hyena": False, "column_split": True,
        "interleave": True, "evo2_style_activations": True, "tie_embeddings": True, "mha_out_proj_bias": True,
        "hyena_out_proj_bias": True, "hyena_flip_x1x2": False, "qkv_proj_bias": False,
        "use_fp8_input_projections": False, "max_seqlen": 1024, "mlp_activation": "gelu",
    }


def random_vortex_state(cfg: dict, seed: int = 0, extras: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under the real Vortex key names and shapes (fp32; LI poles strictly negative)."""
    g = torch.Generator().manual_seed(seed)
    D, F_, V = cfg["hidden_size"], cfg["inner_mlp_size"], cfg["vocab_size"]

    def n(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"embedding_layer.weight": n(V, D, std=0.5), "norm.scale": 1 + n(D, std=0.1)}
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        sd[p + "pre_norm.scale"] = 1 + n(D, std=0.1)
        sd[p + "post_norm.scale"] = 1 + n(D, std=0.1)
        sd[p + "mlp.l1.weight"] = n(F_, D, std=D ** -0.5)
        sd[p + "mlp.l2.weight"] = n(F_, D, std=D ** -0.5)
        sd[p + "mlp.l3.weight"] = n(D, F_, std=F_ ** -0.5)
        if i in cfg["attn_layer_idxs"]:
            sd[p + "inner_mha_cls.Wqkv.weight"] = n(3 * D, D, std=D ** -0.5)
            sd[p + "inner_mha_cls.out_proj.weight"] = n(D, D, std=D ** -0.5)
            sd[p + "inner_mha_cls.out_proj.bias"] = n(D, std=0.1)
            if extras:
                hd = D // cfg["num_attention_heads"]
                sd[p + "inner_mha_cls.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2) / hd))
            continue
        sd[p + "projections.weight"] = n(3 * D, D, std=D ** -0.5)
        sd[p + "filter.short_filter_weight"] = n(3 * D, 1, cfg["short_filter_length"], std=0.5)
        sd[p + "out_filter_dense.weight"] = n(D, D, std=D ** -0.5)
        sd[p + "out_filter_dense.bias"] = n(D, std=0.1)
        if extras:
            sd[p + "projections._extra_state"] = io.BytesIO(b"fp8 metadata")
        if i in cfg["hcs_layer_idxs"]:
            sd[p + "filter.h"] = n(cfg["hcs_filter_groups"], 1, cfg["hcs_filter_length"], std=0.4)
        elif i in cfg["hcm_layer_idxs"]:
            K = cfg["hcm_filter_length"]
            sd[p + "filter.h"] = n(cfg["hcm_filter_groups"], 1, K, std=0.3) * torch.exp(-torch.arange(K) / 30.0)
            sd[p + "filter.D"] = n(D, std=0.5)
        else:
            N = cfg["state_size"]
            rates = torch.exp(torch.empty(D, N).uniform_(math.log(0.01), math.log(0.5), generator=g))
            sd[p + "filter.log_poles"] = (-rates)[..., None]
            sd[p + "filter.residues"] = n(D, N, std=0.3)
            sd[p + "filter.D"] = n(D, std=0.5)
    return sd


def _rms(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return scale * (x / (x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + eps))


def _causal(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``y[b, c, t] = sum_s h[c, s] z[b, c, t - s]`` (z ``[B, C, L]``)."""
    L = z.shape[-1]
    y = torch.zeros_like(z)
    for s in range(min(h.shape[-1], L)):
        y[..., s:] += h[:, s, None] * z[..., : L - s]
    return y


def _hyena(cfg: dict, sd: dict, p: str, z: torch.Tensor, i: int) -> torch.Tensor:
    B, L, D = z.shape
    u = (z @ sd[p + "projections.weight"].to(F64).T).transpose(1, 2)  # [B, 3D, L]
    w = sd[p + "filter.short_filter_weight"].to(F64)
    u = F.conv1d(u, w, padding=w.shape[-1] - 1, groups=3 * D)[..., :L]
    x2, x1, v = u[:, 0::3], u[:, 1::3], u[:, 2::3]
    zz = x1 * v
    if i in cfg["hcl_layer_idxs"]:
        lp, r = sd[p + "filter.log_poles"].to(F64), sd[p + "filter.residues"].to(F64)
        h = (r[..., None] * torch.exp(lp * torch.arange(L, dtype=F64))).sum(1)  # [D, L]
        y = _causal(zz, h) + sd[p + "filter.D"].to(F64)[:, None] * zz
    else:
        h = sd[p + "filter.h"].to(F64)
        h = h.repeat_interleave(D // h.shape[0], 0)
        if h.shape[-1] >= 128:
            y = _causal(zz, h[:, 0]) + sd[p + "filter.D"].to(F64)[:, None] * zz
        else:
            y = F.conv1d(zz, h, padding=h.shape[-1] - 1, groups=D)[..., :L]
    y = (x2 * y).transpose(1, 2)
    return y @ sd[p + "out_filter_dense.weight"].to(F64).T + sd[p + "out_filter_dense.bias"].to(F64)


def _attention(cfg: dict, sd: dict, p: str, z: torch.Tensor) -> torch.Tensor:
    B, L, D = z.shape
    H = cfg["num_attention_heads"]
    hd = D // H
    qkv = (z @ sd[p + "inner_mha_cls.Wqkv.weight"].to(F64).T).view(B, L, H, 3, hd)
    q, k, v = qkv.unbind(3)
    inv = 1.0 / (float(cfg["rotary_emb_base"]) ** (torch.arange(0, hd, 2, dtype=F64) / hd))
    scale = cfg["rotary_emb_scaling_factor"] if cfg.get("use_interpolated_rotary_pos_emb") else 1.0
    ang = (torch.arange(L, dtype=F64) / scale)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rot(x: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * sin

    q, k = rot(q), rot(k)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, L, D)
    return o @ sd[p + "inner_mha_cls.out_proj.weight"].to(F64).T + sd[p + "inner_mha_cls.out_proj.bias"].to(F64)


def vortex_forward64(cfg: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L, vocab]`` in float64 from a Vortex state dict and config."""
    eps = cfg["eps"]
    emb = sd["embedding_layer.weight"].to(F64)
    x = emb[ids]
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        z = _rms(x, sd[p + "pre_norm.scale"].to(F64), eps)
        mix = _attention(cfg, sd, p, z) if i in cfg["attn_layer_idxs"] else _hyena(cfg, sd, p, z, i)
        u = x + mix
        m = _rms(u, sd[p + "post_norm.scale"].to(F64), eps)
        a = m @ sd[p + "mlp.l1.weight"].to(F64).T
        if i == 0 or not cfg["evo2_style_activations"]:
            a = F.gelu(a)
        x = u + (a * (m @ sd[p + "mlp.l2.weight"].to(F64).T)) @ sd[p + "mlp.l3.weight"].to(F64).T
    return _rms(x, sd["norm.scale"].to(F64), eps) @ emb.T


def evo2_decay(groups: int, length: int, ref_len: int = 8192) -> torch.Tensor:
    """Savanna's MR decay (weak preset): rates log-uniform in [1e-2, 1e2], ``exp(-r t / (T_ref - 1))``, float64."""
    rates = torch.logspace(-2, 2, groups, dtype=F64)
    return torch.exp(-rates[:, None] * torch.arange(length, dtype=F64)[None] / (ref_len - 1))


def random_savanna(cfg: dict, seed: int = 0, h_len: int = 160) -> tuple[dict, dict]:
    """A random Savanna ``{"module": state}`` and the equivalent Vortex state (by the published conversion)."""
    g = torch.Generator().manual_seed(seed + 1)
    vsd = random_vortex_state(cfg, seed, extras=False)
    D, N, n_layers = cfg["hidden_size"], cfg["state_size"], cfg["num_layers"]
    mod = {"sequential.0.word_embeddings.weight": vsd["embedding_layer.weight"],
           f"sequential.{n_layers + 3}.norm.weight": vsd["norm.scale"]}
    for i in range(n_layers):
        v, s = f"blocks.{i}.", f"sequential.{i + 2}."
        mod[s + "input_layernorm.weight"] = vsd[v + "pre_norm.scale"]
        mod[s + "pre_mlp_layernorm.weight"] = vsd[v + "post_norm.scale"]
        for a, b in (("l1", "w1"), ("l2", "w2"), ("l3", "w3")):
            mod[f"{s}mlp.{b}.weight"] = vsd[f"{v}mlp.{a}.weight"]
        if i in cfg["attn_layer_idxs"]:
            mod[s + "mixer.dense_projection.weight"] = vsd[v + "inner_mha_cls.Wqkv.weight"]
            mod[s + "mixer.dense.weight"] = vsd[v + "inner_mha_cls.out_proj.weight"]
            mod[s + "mixer.dense.bias"] = vsd[v + "inner_mha_cls.out_proj.bias"]
            continue
        mod[s + "mixer.dense_projection.weight"] = vsd[v + "projections.weight"]
        mod[s + "mixer.dense_projection._extra_state"] = None
        mod[s + "mixer.hyena_proj_conv.short_conv_weight"] = vsd[v + "filter.short_filter_weight"][:, 0]
        mod[s + "mixer.dense.weight"] = vsd[v + "out_filter_dense.weight"]
        mod[s + "mixer.dense.bias"] = vsd[v + "out_filter_dense.bias"]
        if i in cfg["hcs_layer_idxs"]:
            mod[s + "mixer.mixer.short_conv.short_conv_weight"] = vsd[v + "filter.h"]
        elif i in cfg["hcm_layer_idxs"]:
            G = cfg["hcm_filter_groups"]
            h = torch.randn(G, h_len, generator=g) * 0.3
            decay = evo2_decay(G, h_len)
            mod[s + "mixer.mixer.filter.h"] = h
            mod[s + "mixer.mixer.filter.decay"] = decay.float()
            mod[s + "mixer.mixer.conv_bias"] = vsd[v + "filter.D"]
            vsd[v + "filter.h"] = (h.to(F64) * decay)[:, None, :128]
        else:
            p = torch.randn(D * N, generator=g) * 0.3 - 1.0
            gamma = torch.log(torch.empty(D, N).uniform_(0.01, 0.1, generator=g))
            mod[s + "mixer.mixer.filter.p"] = p
            mod[s + "mixer.mixer.filter.gamma"] = gamma
            mod[s + "mixer.mixer.filter.R"] = vsd[v + "filter.residues"].reshape(-1)
            mod[s + "mixer.mixer.filter.t"] = torch.arange(64.0)[None, None]
            mod[s + "mixer.mixer.conv_bias"] = vsd[v + "filter.D"]
            vsd[v + "filter.log_poles"] = (-torch.exp(p.to(F64).view(D, N)) * torch.exp(gamma.to(F64)))[..., None]
    return {"module": mod, "global_steps": 10}, vsd
