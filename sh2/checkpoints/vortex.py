"""Vortex (evo2 package) checkpoints: read into sh2 layout, and export sh2 models.

Conventions converted at this boundary (SPEC 1.2-1.4):

- Hyena projection rows and featurizer taps: Vortex interleaves the streams (row ``3c + s``), sh2 stores
  them stream-major (row ``p*D + c``; p = 0 post-gate, 1 pre-gate, 2 value).
- Filter orientation: Vortex applies the featurizer and filters shorter than 128 taps with ``conv1d``
  (cross-correlation: the last tap multiplies the current token); sh2 stores every filter causally (tap
  0 = current token), so those are flipped. Filters of 128 taps or more (MR) are causal in both.
- MR: Vortex stores ``h = hhat * decay``; sh2 stores ``hhat`` and applies the decay of its config, so
  the reader divides by the decay (in float64) and the writer multiplies.
- LI: Vortex stores ``log_poles [D, N, 1]`` and ``residues [D, N]``; sh2 has fp32 ``p, gamma, R`` with
  ``log_poles = -exp(p) * exp(gamma)``. The reader sets ``gamma = 0, p = log(-log_poles)``.
- Attention: Vortex's fused ``Wqkv`` is per head ``[heads, (q, k, v), head_dim]``; sh2 is
  ``[q heads | k heads | v heads]``.

Everything else is a rename. The two reparametrised filters (MR ``hhat``/``h``, LI ``p, gamma``/
``log_poles``) are the only tensors that round-trip to fp32 rounding rather than bit-exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from sh2.checkpoints.files import CheckpointError, CheckpointHint, assemble_shards, load_file
from sh2.checkpoints.state import LazyStateDict
from sh2.checkpoints.vortex_config import (
    VortexLayout,
    config_from_vortex,
    infer_config,
    read_yaml,
    vortex_from_config,
    vortex_layout,
)
from sh2.models.config import SH2Config
from sh2.models.filters import DecayedFilter

CAUSAL_MIN_LEN = 128  # Vortex: filters of >= 128 taps are causal FFT filters with a D term, shorter ones conv1d
_IGNORED_SUFFIXES = ("._extra_state", "rotary_emb.inv_freq", "filter.t")
_ZERO_OK = ("projections.bias", "inner_mha_cls.Wqkv.bias", "filter.short_filter_bias")


def mr_decay(config: SH2Config) -> torch.Tensor:
    """The MR decay ``[G, K]`` exactly as the model computes it (fp32), for (un)folding Vortex filters."""
    d = DecayedFilter(config.mr_groups, config.mr_filter_len, config.mr_decay, config.mr_ref_len).decay()
    if float(d.min()) < 1e-20:
        raise CheckpointError(f"MR decay underflows (min {float(d.min()):.3g}) for mr_filter_len="
                              f"{config.mr_filter_len}, mr_ref_len={config.mr_ref_len}, preset {config.mr_decay}: "
                              f"the Vortex filter cannot be unfolded; use a larger mr_ref_len")
    return d


def hyena_rows(D: int, layout: VortexLayout) -> torch.Tensor:
    """Index ``idx`` with ``sh2_rows = vortex_rows[idx]`` for a [3D, ...] Hyena projection/featurizer."""
    streams = (1, 0, 2) if layout.flip_x1x2 else (0, 1, 2)  # sh2 stream p comes from Vortex stream streams[p]
    c = torch.arange(D)
    parts = [(3 * c + s) if layout.interleave else (s * D + c) for s in streams]
    return torch.cat(parts)


def qkv_rows(heads: int, head_dim: int, per_head: bool) -> torch.Tensor:
    """Index with ``sh2_qkv = vortex_wqkv[idx]``: per-head ``[H, 3, hd]`` -> ``[3, H, hd]``."""
    idx = torch.arange(3 * heads * head_dim)
    if not per_head:
        return idx
    return idx.view(heads, 3, head_dim).transpose(0, 1).reshape(-1)


def _inverse(idx: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel())
    return inv


def _check_zero(key: str, t: torch.Tensor) -> None:
    if t.numel() and float(t.detach().abs().max()) != 0.0:
        raise CheckpointError(f"Vortex checkpoint: {key!r} is non-zero but sh2 has no such bias; this model "
                              f"variant cannot be loaded exactly")


def vortex_to_sh2(config: SH2Config, vsd: Mapping[str, torch.Tensor],
                  layout: VortexLayout | None = None) -> LazyStateDict:
    """Convert a Vortex state dict (lazily) to sh2 keys and layouts for ``config``.

    Raises:
        CheckpointError: missing key, a tensor of the wrong rank, an unexpected key, a non-zero bias sh2
            does not have, or non-negative LI log-poles.
    """
    D, out = config.hidden_size, LazyStateDict()
    layout = layout or VortexLayout()
    used: set[str] = set()

    def get(key: str, ndim: int | None = None) -> torch.Tensor:
        if key not in vsd:
            raise CheckpointError(f"Vortex checkpoint: missing key {key!r} (config layout {config.layout})",
                                  hints=[CheckpointHint.MATCH_ARCHITECTURE])
        t = vsd[key]
        if ndim is not None and t.dim() != ndim:
            raise CheckpointError(f"Vortex checkpoint: {key!r} has shape {list(t.shape)}, expected {ndim} dims")
        used.add(key)
        return t

    def rows(key: str, src: str, t: torch.Tensor, idx: torch.Tensor, flip: bool = False) -> None:
        if t.dim() == 3 and t.shape[1] != 1:
            raise CheckpointError(f"Vortex checkpoint: {src!r} has shape {list(t.shape)}, expected [C, 1, K]")
        shape = (t.shape[0], t.shape[-1])
        if t.shape[0] != idx.numel():
            out.add_tensor(key, t, src)  # wrong size: leave it to the shape check, which names both shapes
            return

        def make() -> torch.Tensor:
            r = t.index_select(0, idx).reshape(shape)
            return r.flip(-1) if flip else r
        out.add(key, shape, src, make)

    out.add_tensor("embedding.weight", get("embedding_layer.weight", 2), "embedding_layer.weight")
    out.add_tensor("norm.scale", get("norm.scale", 1), "norm.scale")
    if not config.tie_embeddings:
        out.add_tensor("lm_head.weight", get("unembed.weight", 2), "unembed.weight")
    elif "unembed.weight" in vsd:
        used.add("unembed.weight")
    hrows, qrows = hyena_rows(D, layout), qkv_rows(config.num_heads, config.head_dim, layout.qkv_per_head)
    decay = mr_decay(config) if "MR" in config.operators else None
    for i, op in enumerate(config.operators):
        v, s = f"blocks.{i}.", f"blocks.{i}."
        out.add_tensor(s + "norm_in.scale", get(v + "pre_norm.scale", 1), v + "pre_norm.scale")
        out.add_tensor(s + "norm_mlp.scale", get(v + "post_norm.scale", 1), v + "post_norm.scale")
        for a, b in (("l1", "w1"), ("l2", "w2"), ("l3", "w3")):
            out.add_tensor(f"{s}mlp.{b}.weight", get(f"{v}mlp.{a}.weight", 2), f"{v}mlp.{a}.weight")
        m = s + "mixer."
        if op == "MHA":
            rows(m + "qkv.weight", v + "inner_mha_cls.Wqkv.weight", get(v + "inner_mha_cls.Wqkv.weight", 2), qrows)
            out.add_tensor(m + "out_proj.weight", get(v + "inner_mha_cls.out_proj.weight", 2),
                           v + "inner_mha_cls.out_proj.weight")
            if config.attn_out_bias:
                out.add_tensor(m + "out_proj.bias", get(v + "inner_mha_cls.out_proj.bias", 1),
                               v + "inner_mha_cls.out_proj.bias")
            continue
        rows(m + "in_proj.weight", v + "projections.weight", get(v + "projections.weight", 2), hrows)
        rows(m + "short_filter", v + "filter.short_filter_weight", get(v + "filter.short_filter_weight", 3), hrows,
             flip=True)
        out.add_tensor(m + "out_proj.weight", get(v + "out_filter_dense.weight", 2), v + "out_filter_dense.weight")
        if config.hyena_out_bias:
            out.add_tensor(m + "out_proj.bias", get(v + "out_filter_dense.bias", 1), v + "out_filter_dense.bias")
        if op in ("SE", "MR"):
            _add_fir(out, op, m, v, get(v + "filter.h", 3), vsd, used, decay)
        else:
            _add_modal(out, m, v, get(v + "filter.log_poles", 3), get(v + "filter.residues", 2),
                       get(v + "filter.D", 1))
    for key in vsd:
        if key in used or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key.endswith(_ZERO_OK):
            _check_zero(key, vsd[key])
            continue
        raise CheckpointError(f"Vortex checkpoint: unexpected key {key!r} for config layout {config.layout} "
                              f"({config.num_layers} layers); is the config right?",
                              hints=[CheckpointHint.MATCH_ARCHITECTURE])
    return out


def _add_fir(out: LazyStateDict, op: str, m: str, v: str, h: torch.Tensor, vsd: Mapping[str, torch.Tensor],
             used: set[str], decay: torch.Tensor | None) -> None:
    """SE/MR filter and skip. Vortex orientation depends on the filter length, not on the operator."""
    G, K = h.shape[0], h.shape[-1]
    causal = K >= CAUSAL_MIN_LEN
    d_key = v + "filter.D"
    skip = vsd.get(d_key) if causal else None
    if causal and skip is None:
        raise CheckpointError(f"Vortex checkpoint: missing key {d_key!r} (filters of >= 128 taps have a D term)",
                              hints=[CheckpointHint.MATCH_ARCHITECTURE])
    if skip is not None:
        used.add(d_key)

    def taps() -> torch.Tensor:
        t = h.reshape(G, K)
        return t if causal else t.flip(-1)

    if op == "SE":
        if skip is not None:
            _check_zero(d_key, skip)
        out.add(m + "filter.h", (G, K), v + "filter.h", taps)
        return
    assert decay is not None
    if decay.shape != (G, K):
        out.add(m + "filter.h", (G, K), v + "filter.h", taps)  # the shape check reports the mismatch
    else:
        out.add(m + "filter.h", (G, K), v + "filter.h",
                lambda: (taps().double() / decay.double()).float())
    if skip is not None:
        out.add_tensor(m + "skip", skip, d_key)
    else:  # a short "MR" filter in Vortex has no D term: an exact zero skip
        D = int(out.shape(m + "out_proj.weight")[0])
        out.add(m + "skip", (D,), d_key, lambda: torch.zeros(D, dtype=h.dtype))


def _add_modal(out: LazyStateDict, m: str, v: str, log_poles: torch.Tensor, residues: torch.Tensor,
               skip: torch.Tensor) -> None:
    shape = tuple(residues.shape)
    if tuple(log_poles.shape[:2]) != shape:
        raise CheckpointError(f"Vortex checkpoint: {v}filter.log_poles has shape {list(log_poles.shape)} but "
                              f"{v}filter.residues has {list(shape)}")

    def p() -> torch.Tensor:
        lp = log_poles.reshape(shape).double()
        if bool((lp >= 0).any()):
            raise CheckpointError(f"Vortex checkpoint: {v}filter.log_poles has non-negative entries (growing "
                                  f"filters); sh2's parametrisation -exp(p)*exp(gamma) cannot represent them")
        return torch.log(-lp).float()

    out.add(m + "filter.p", shape, v + "filter.log_poles", p)
    out.add(m + "filter.gamma", shape, v + "filter.log_poles", lambda: torch.zeros(shape, dtype=torch.float32))
    out.add(m + "filter.R", shape, v + "filter.residues", lambda: residues.float())
    out.add_tensor(m + "skip", skip, v + "filter.D")


def sh2_to_vortex(config: SH2Config, state: Mapping[str, torch.Tensor],
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Convert an sh2 state dict to a Vortex state dict (evo2 package key names and layouts).

    Args:
        config: the model's config.
        state: sh2 state dict (``model.state_dict()``).
        dtype: cast the weights to this dtype (e.g. ``torch.bfloat16`` like the released files); LI
            ``log_poles``/``residues`` always stay fp32. Default: keep each tensor's dtype.

    Raises:
        CheckpointError: for models Vortex cannot express (see :func:`vortex_from_config`), a short MR
            filter (< 128 taps) with a non-zero skip, or a missing key.
    """
    vortex_from_config(config)  # raises for unsupported configs
    D = config.hidden_size

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"sh2 state dict: missing key {key!r}", hints=[CheckpointHint.MATCH_ARCHITECTURE])
        return state[key].detach()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None else t

    hinv = _inverse(hyena_rows(D, VortexLayout()))
    qinv = _inverse(qkv_rows(config.num_heads, config.head_dim, True))
    out: dict[str, torch.Tensor] = {"embedding_layer.weight": cast(get("embedding.weight")),
                                    "norm.scale": cast(get("norm.scale"))}
    if not config.tie_embeddings:
        out["unembed.weight"] = cast(get("lm_head.weight"))
    decay = mr_decay(config) if "MR" in config.operators else None
    for i, op in enumerate(config.operators):
        s, v = f"blocks.{i}.", f"blocks.{i}."
        m = s + "mixer."
        out[v + "pre_norm.scale"] = cast(get(s + "norm_in.scale"))
        out[v + "post_norm.scale"] = cast(get(s + "norm_mlp.scale"))
        for a, b in (("l1", "w1"), ("l2", "w2"), ("l3", "w3")):
            out[f"{v}mlp.{a}.weight"] = cast(get(f"{s}mlp.{b}.weight"))
        if op == "MHA":
            out[v + "inner_mha_cls.Wqkv.weight"] = cast(get(m + "qkv.weight")[qinv])
            out[v + "inner_mha_cls.out_proj.weight"] = cast(get(m + "out_proj.weight"))
            if config.attn_out_bias:
                out[v + "inner_mha_cls.out_proj.bias"] = cast(get(m + "out_proj.bias"))
            continue
        out[v + "projections.weight"] = cast(get(m + "in_proj.weight")[hinv])
        out[v + "filter.short_filter_weight"] = cast(get(m + "short_filter")[hinv].flip(-1)[:, None, :])
        out[v + "out_filter_dense.weight"] = cast(get(m + "out_proj.weight"))
        if config.hyena_out_bias:
            out[v + "out_filter_dense.bias"] = cast(get(m + "out_proj.bias"))
        if op == "LI":
            p, g = get(m + "filter.p").double(), get(m + "filter.gamma").double()
            out[v + "filter.log_poles"] = (-torch.exp(p) * torch.exp(g)).float()[..., None]
            out[v + "filter.residues"] = get(m + "filter.R").float()
            out[v + "filter.D"] = cast(get(m + "skip"))
            continue
        h = get(m + "filter.h")
        if op == "MR":
            assert decay is not None
            h = (h.double() * decay.double()).to(h.dtype)
        causal = h.shape[-1] >= CAUSAL_MIN_LEN
        out[v + "filter.h"] = cast((h if causal else h.flip(-1))[:, None, :])
        if op == "MR" and not causal:
            _check_zero(f"{m}skip (a Vortex filter shorter than 128 taps has no D term)", get(m + "skip"))
        elif op == "MR":
            out[v + "filter.D"] = cast(get(m + "skip"))
        elif causal:  # SE with >= 128 taps: Vortex creates a D term; sh2's SE has none
            out[v + "filter.D"] = torch.zeros(D, dtype=dtype or h.dtype)
    return out


def find_vortex_yaml(path: str | os.PathLike) -> Path | None:
    """The YAML config beside a Vortex checkpoint: ``NAME.yml``/``NAME.yaml``, ``config.yml``/``.yaml``, or the
    only YAML file in the directory."""
    path = Path(path)
    base = path.name.split(".part")[0]
    stem = base[: -len(".pt")] if base.endswith(".pt") else Path(base).stem
    for name in (f"{stem}.yml", f"{stem}.yaml", "config.yml", "config.yaml"):
        if (path.parent / name).is_file():
            return path.parent / name
    yamls = sorted(p for p in path.parent.glob("*.y*ml") if p.suffix in (".yml", ".yaml"))
    return yamls[0] if len(yamls) == 1 else None


def read_vortex(path: str | os.PathLike, vortex_config: str | os.PathLike | Mapping[str, Any] | None = None,
                config: SH2Config | None = None, trust_pickle: bool = False,
                state: Mapping[str, torch.Tensor] | None = None) -> tuple[SH2Config, LazyStateDict]:
    """Read a Vortex checkpoint (``.pt`` or byte shards ``.pt.partN``) into sh2 layout.

    Args:
        path: the ``.pt`` file (or its first shard); shards are assembled beside it once.
        vortex_config: the evo2 YAML (path or dict). Default: a YAML beside the checkpoint, else inferred
            from the tensor shapes and the presets (with a warning).
        config: an sh2 config to load into instead of the one derived from the YAML (its shapes are
            checked when the weights are copied).
        trust_pickle: allow pickled objects in the file (trusted files only).
        state: an already loaded Vortex state dict (skips reading ``path``).

    Returns:
        ``(config, lazy_state)``: the state converts each tensor when accessed.
    """
    if state is None:
        state = load_file(assemble_shards(path), trust_pickle=trust_pickle)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: a Vortex checkpoint is a state dict, got {type(state).__name__}")
    yaml_source = vortex_config if vortex_config is not None else find_vortex_yaml(path)
    raw = read_yaml(yaml_source) if yaml_source is not None else {}
    layout = vortex_layout(raw)
    if config is None:
        config = config_from_vortex(raw) if raw else infer_config(state, Path(path).name.split(".")[0])
    return config, vortex_to_sh2(config, state, layout)


def save_vortex(state: Mapping[str, torch.Tensor] | torch.nn.Module, config: SH2Config, path: str | os.PathLike,
                dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Write an sh2 model as a Vortex checkpoint ``path`` plus its YAML config ``path`` with ``.yml``.

    The pair loads in the evo2 package (``Evo2(model_name, local_path=path)`` with the YAML copied to
    its config) and back into sh2 with :func:`sh2.checkpoints.load_pretrained`.

    Returns:
        ``(checkpoint_path, yaml_path)``.
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    path = Path(path)
    vsd = sh2_to_vortex(config, state, dtype=dtype)
    torch.save({k: t.contiguous().cpu() for k, t in vsd.items()}, path)
    yaml_path = path.with_name(path.name[: -len(".pt")] + ".yml" if path.name.endswith(".pt") else path.name + ".yml")
    with open(yaml_path, "w") as fh:
        yaml.safe_dump(vortex_from_config(config), fh, sort_keys=False)
    return path, yaml_path
