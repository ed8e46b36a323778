"""Savanna (the Evo 2 training code, DeepSpeed) checkpoints: read into sh2 layout.

A Savanna model-state file (``global_stepN/mp_rank_00_model_states.pt``) holds ``{"module": state}``
with keys ``sequential.{j}.*``: ``sequential.0`` is the embedding, blocks are ``sequential.{i + 2}``, the
final norm is the last index. Per block: ``input_layernorm``/``pre_mlp_layernorm``, ``mlp.w1/w2/w3``,
``mixer.dense_projection`` (Hyena input projection, interleaved streams; or the per-head fused QKV of
attention), ``mixer.dense`` (output projection), ``mixer.hyena_proj_conv.short_conv_weight`` (featurizer,
conv1d orientation), and the inner filter: SE ``mixer.mixer.short_conv.short_conv_weight`` (conv1d
orientation), MR ``mixer.mixer.filter.h`` + ``mixer.mixer.filter.decay`` (the effective filter is
``(h * decay)[:, :K]``), LI ``mixer.mixer.filter.{p, gamma, R}`` (sh2's own parametrisation) and
``mixer.mixer.conv_bias`` (Dskip of MR and LI).

Savanna's MR ``h`` and LI ``p, gamma, R`` are the training parameters themselves, so when Savanna's decay
equals sh2's (Evo 2: weak preset, T_ref 8192) the conversion is exact. Which Savanna key holds which sh2
parameter, and in which :class:`~sh2.models.mixer.TensorForm`, is declared per operator kind
(``kind.evo2.tensors``); this module implements each form for Savanna's layout.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sh2.checkpoints.files import CheckpointError, CheckpointHint, assemble_shards, load_file
from sh2.checkpoints.state import LazyStateDict
from sh2.checkpoints.vortex import VortexLayout, hyena_rows, layout_decay, present, qkv_rows
from sh2.checkpoints.vortex_config import identify_kind
from sh2.models.config import PRESETS, SH2Config, layout_string
from sh2.models.mixer import TensorForm
from sh2.models.operators import operator_kind

log = logging.getLogger(__name__)
_IGNORED = ("._extra_state", "rotary_emb.inv_freq", "filter.t", "outer_mlp_layernorm.weight",
            "outer_mlp_layernorm.scale", "post_attention_layernorm.scale", "mixer.mixer.short_conv.conv_bias")
_SEQ = re.compile(r"^sequential\.(\d+)\.(.+)$")


def savanna_state(obj: object) -> dict[str, torch.Tensor]:
    """The model state of a loaded Savanna file (``obj["module"]`` or the dict itself)."""
    if isinstance(obj, Mapping) and "module" in obj and isinstance(obj["module"], Mapping):
        obj = obj["module"]
    if not isinstance(obj, Mapping) or not any(str(k).startswith("sequential.") for k in obj):
        raise CheckpointError("not a Savanna checkpoint: expected keys 'sequential.{i}.*' (under 'module')")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _split(state: Mapping[str, torch.Tensor]) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _SEQ.match(key)
        if m:
            groups.setdefault(int(m.group(1)), {})[m.group(2)] = t
    blocks = sorted(j for j, g in groups.items() if "mlp.w1.weight" in g)
    if not blocks or blocks != list(range(2, 2 + len(blocks))):
        raise CheckpointError(f"Savanna checkpoint: blocks must be sequential.2 .. sequential.N+1 consecutively, "
                              f"found block indices {blocks[:8]}...")
    return groups, len(blocks)


def _operator(g: Mapping[str, torch.Tensor]) -> str:
    op = identify_kind(g.__contains__, lambda names: names.savanna_keys)
    assert op is not None, "one operator kind declares no Savanna keys"
    return op


def infer_savanna_config(state: Mapping[str, torch.Tensor]) -> SH2Config:
    """A config from the shapes of a Savanna state; non-shape fields from the matching Evo 2 preset."""
    groups, n = _split(state)
    emb = groups.get(0, {}).get("word_embeddings.weight")
    if emb is None:
        raise CheckpointError("Savanna checkpoint: 'sequential.0.word_embeddings.weight' is missing")
    ops = [_operator(groups[i + 2]) for i in range(n)]
    vals = dict(vocab_size=emb.shape[0], hidden_size=emb.shape[1], num_layers=n, layout=layout_string(ops),
                mlp_hidden_size=groups[2]["mlp.w1.weight"].shape[0])
    for i, op in enumerate(ops):
        g = groups[i + 2]
        for size in operator_kind(op).evo2.savanna_sizes:
            vals[size.field] = g[size.key].shape[size.dim]
    for name, fields in PRESETS.items():
        ref = SH2Config.from_dict({**fields, "name": name})
        if all(getattr(ref, k) == v for k, v in vals.items()):
            return ref
    D = vals["hidden_size"]
    log.warning("Savanna checkpoint matches no preset: assuming head size 128, Evo 2 activations, RoPE base 1e4; "
                "pass config= to be exact")
    return SH2Config.from_dict({**vals, "name": "savanna", "num_heads": max(1, D // 128), "mlp_activation": "evo2"})


def savanna_to_sh2(config: SH2Config, state: Mapping[str, torch.Tensor], interleave: bool = True) -> LazyStateDict:
    """Convert a Savanna model state (lazily) to sh2 keys and layouts.

    Raises:
        CheckpointError: missing key or layer, operator mismatch with the config, unexpected key.
    """
    groups, n = _split(state)
    if n != config.num_layers:
        raise CheckpointError(f"Savanna checkpoint has {n} blocks but the config has num_layers={config.num_layers}")
    D, out = config.hidden_size, LazyStateDict()
    hrows = hyena_rows(D, VortexLayout(interleave=interleave))
    qrows = qkv_rows(config.num_heads, config.head_dim, True)
    decay = layout_decay(config)

    def take(j: int, name: str, *alts: str) -> tuple[torch.Tensor, str]:
        for k in (name, *alts):
            if k in groups.get(j, {}):
                return groups[j].pop(k), f"sequential.{j}.{k}"
        raise CheckpointError(f"Savanna checkpoint: missing key 'sequential.{j}.{name}'",
                          hints=[CheckpointHint.MATCH_ARCHITECTURE])

    def permuted(key: str, t: torch.Tensor, src: str, idx: torch.Tensor, flip: bool = False) -> None:
        t2 = t.reshape(t.shape[0], -1)
        if t2.shape[0] != idx.numel():
            out.add_tensor(key, t, src)
            return
        def make() -> torch.Tensor:
            r = t2.index_select(0, idx)
            return r.flip(-1) if flip else r
        out.add(key, tuple(t2.shape), src, make)

    emb, src = take(0, "word_embeddings.weight")
    out.add_tensor("embedding.weight", emb, src)
    norm_j = max(groups)
    t, src = take(norm_j, "norm.weight", "norm.scale")
    out.add_tensor("norm.scale", t, src)
    if not config.tie_embeddings:
        t, src = take(norm_j + 1 if norm_j + 1 in groups else norm_j, "final_linear.weight")
        out.add_tensor("lm_head.weight", t, src)
    for i, op in enumerate(config.operators):
        j, s = i + 2, f"blocks.{i}."
        found = _operator(groups[j])
        if found != op:
            raise CheckpointError(f"Savanna checkpoint: block {i} (sequential.{j}) is {found} but the config layout "
                                  f"{config.layout} says {op}")
        for a, b in (("input_layernorm", "norm_in"), ("pre_mlp_layernorm", "norm_mlp")):
            t, src = take(j, f"{a}.weight", f"{a}.scale")
            out.add_tensor(f"{s}{b}.scale", t, src)
        for w in ("w1", "w2", "w3"):
            t, src = take(j, f"mlp.{w}.weight")
            out.add_tensor(f"{s}mlp.{w}.weight", t, src)
        m = s + "mixer."
        for entry in operator_kind(op).evo2.tensors:
            if not present(config, entry):
                continue
            key, form = m + entry.sh2, entry.form
            t, src = take(j, entry.savanna)
            if form in (TensorForm.MATRIX, TensorForm.VECTOR, TensorForm.FIR_SKIP):
                out.add_tensor(key, t, src)
            elif form in (TensorForm.STREAM_ROWS, TensorForm.STREAM_TAPS):
                permuted(key, t, src, hrows, flip=form is TensorForm.STREAM_TAPS)
            elif form is TensorForm.HEAD_ROWS:
                permuted(key, t, src, qrows)
            elif form is TensorForm.FIR_TAPS:  # conv1d orientation
                t2 = t.reshape(t.shape[0], -1)
                out.add(key, tuple(t2.shape), src, lambda t2=t2: t2.flip(-1))
            elif form is TensorForm.DECAYED_FIR_TAPS:
                # Savanna keeps its decay beside the taps: '<filter>.h' and '<filter>.decay'
                decay_key = entry.savanna.rsplit(".", 1)[0] + ".decay"
                d_sav = take(j, decay_key)[0] if decay_key in groups[j] else None
                _add_decayed_taps(out, key, t, src, d_sav, config, decay)
            elif form in (TensorForm.MODAL_RATE, TensorForm.MODAL_SCALE, TensorForm.MODAL_RESIDUES):
                shape = (D, t.numel() // D) if t.numel() % D == 0 else tuple(t.shape)  # stored flattened
                out.add(key, shape, src, lambda t=t, shape=shape: t.reshape(shape).float())
            else:
                raise NotImplementedError(f"Savanna reader: no conversion for {form}")
    for j, g in groups.items():
        for k in g:
            if not k.endswith(_IGNORED) and not k.startswith("mixer.mixer.conv_bias"):
                raise CheckpointError(f"Savanna checkpoint: unexpected key 'sequential.{j}.{k}'",
                                      hints=[CheckpointHint.MATCH_ARCHITECTURE])
    return out


def _add_decayed_taps(out: LazyStateDict, key: str, h: torch.Tensor, src: str, d_sav: torch.Tensor | None,
                      config: SH2Config, decay: torch.Tensor | None) -> None:
    """MR taps: Savanna's ``h`` (longer than K) and decay ``d_sav`` (None: not stored, taken as sh2's) ->
    sh2's ``hhat`` under sh2's ``decay``."""
    K = config.mr_filter_len
    h2 = h.reshape(h.shape[0], -1)
    if decay is None or h2.shape[0] != decay.shape[0] or h2.shape[1] < K:
        out.add_tensor(key, h2, src)  # the shape check names the mismatch
        return
    if d_sav is None:
        out.add(key, (h2.shape[0], K), src, lambda: h2[:, :K])
        return
    ds = d_sav.reshape(d_sav.shape[0], -1)[:, :K].double()
    if ds.shape == decay.shape and torch.allclose(ds, decay.double(), rtol=1e-6, atol=0):
        out.add(key, (h2.shape[0], K), src, lambda: h2[:, :K])  # same decay: the parameter itself
    else:
        log.warning("%s: Savanna's MR decay differs from sh2's (%s, T_ref %d); folding it into hhat", src,
                    config.mr_decay, config.mr_ref_len)
        out.add(key, (h2.shape[0], K), src, lambda: (h2[:, :K].double() * ds / decay.double()).float())


def find_savanna_file(path: str | os.PathLike) -> Path:
    """The model-state file of a Savanna checkpoint given as a file or a ``global_stepN`` directory."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not candidates:
            raise CheckpointError(f"{path}: no mp_rank_*_model_states.pt in this Savanna checkpoint directory")
        if len(candidates) > 1:
            raise CheckpointError(f"{path}: {len(candidates)} model-parallel shards; only single-rank (mp_rank_00) "
                                  f"Savanna checkpoints are supported")
        return candidates[0]
    return path


def read_savanna(path: str | os.PathLike, config: SH2Config | None = None, trust_pickle: bool = False,
                 state: Mapping[str, torch.Tensor] | None = None) -> tuple[SH2Config, LazyStateDict]:
    """Read a Savanna checkpoint (file or ``global_stepN`` directory) into sh2 layout.

    Args:
        path: ``mp_rank_00_model_states.pt`` or its directory.
        config: the model config; default: inferred from the shapes and the Evo 2 presets.
        trust_pickle: DeepSpeed files usually pickle non-tensor objects; allow them (trusted files only).
        state: an already loaded Savanna object (skips reading ``path``).
    """
    if state is None:
        state = load_file(assemble_shards(find_savanna_file(path)), trust_pickle=trust_pickle)
    sd = savanna_state(state)
    config = config or infer_savanna_config(sd)
    return config, savanna_to_sh2(config, sd)
