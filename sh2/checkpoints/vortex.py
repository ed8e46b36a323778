"""Vortex (evo2 package) checkpoints: read into sh2 layout, and export sh2 models.

Which Vortex key holds which sh2 parameter, and how the two differ, is declared per operator kind as data
(``kind.evo2.tensors``, see :class:`~sh2.models.mixer.Evo2Tensor`); this module implements each
:class:`~sh2.models.mixer.TensorForm` once, for reading and for writing:

- Hyena projection rows and featurizer taps: Vortex interleaves the streams (row ``3c + s``), sh2 stores
  them stream-major (row ``p*D + c``; p = 0 q (post-gate), 1 k (pre-gate), 2 v (value)).
- Filter orientation: Vortex applies the featurizer and filters shorter than 128 taps with ``conv1d``
  (cross-correlation: the last tap multiplies the current token); sh2 stores every filter causally (tap
  0 = current token), so those are flipped. Filters of 128 taps or more (MR) are causal in both, and Vortex
  gives them a Dskip vector ``filter.D``.
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
from sh2.models.mixer import Evo2Tensor, OperatorKind, TensorForm
from sh2.models.operators import mixer_classes, operator_kind

CAUSAL_MIN_LEN = 128  # Vortex: filters of >= 128 taps are causal FFT filters with a D term, shorter ones conv1d
FIR_DSKIP = "filter.D"  # the Dskip vector Vortex gives every FIR filter of >= CAUSAL_MIN_LEN taps
_FIR_FORMS = (TensorForm.FIR_TAPS, TensorForm.DECAYED_FIR_TAPS)
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


def layout_decay(config: SH2Config) -> torch.Tensor | None:
    """:func:`mr_decay` when a kind in the layout stores decayed FIR taps, else None."""
    forms = {t.form for cls in mixer_classes(config.operators) for t in cls.kind.evo2.tensors}
    return mr_decay(config) if TensorForm.DECAYED_FIR_TAPS in forms else None


def present(config: SH2Config, t: Evo2Tensor) -> bool:
    """Whether the model of ``config`` has the parameter ``t`` (optional biases exist under a config flag)."""
    return t.when is None or bool(getattr(config, t.when))


def sibling(kind: OperatorKind, *forms: TensorForm) -> Evo2Tensor:
    """The tensor of ``kind`` stored in one of ``forms`` (a FIR Dskip's taps, a modal rate's scale)."""
    return next(t for t in kind.evo2.tensors if t.form in forms)


def hyena_rows(D: int, layout: VortexLayout) -> torch.Tensor:
    """Index ``idx`` with ``sh2_rows = vortex_rows[idx]`` for a [3D, ...] Hyena projection/featurizer."""
    streams = (1, 0, 2) if layout.swap_qk else (0, 1, 2)  # sh2 stream p comes from Vortex stream streams[p]
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


class _VortexReader:
    """Converts the tensors of a Vortex state dict (lazily) into an sh2 :class:`LazyStateDict`, one
    :class:`TensorForm` per method, recording which Vortex keys were used."""

    def __init__(self, config: SH2Config, vsd: Mapping[str, torch.Tensor], layout: VortexLayout) -> None:
        self.config, self.vsd, self.out = config, vsd, LazyStateDict()
        self.used: set[str] = set()
        D = config.hidden_size
        self.hrows, self.qrows = hyena_rows(D, layout), qkv_rows(config.num_heads, config.head_dim, layout.qkv_per_head)
        self.decay = layout_decay(config)

    def get(self, key: str, ndim: int | None = None) -> torch.Tensor:
        if key not in self.vsd:
            raise CheckpointError(f"Vortex checkpoint: missing key {key!r} (config layout {self.config.layout})",
                                  hints=[CheckpointHint.MATCH_ARCHITECTURE])
        t = self.vsd[key]
        if ndim is not None and t.dim() != ndim:
            raise CheckpointError(f"Vortex checkpoint: {key!r} has shape {list(t.shape)}, expected {ndim} dims")
        self.used.add(key)
        return t

    def rows(self, key: str, src: str, t: torch.Tensor, idx: torch.Tensor, flip: bool = False) -> None:
        if t.dim() == 3 and t.shape[1] != 1:
            raise CheckpointError(f"Vortex checkpoint: {src!r} has shape {list(t.shape)}, expected [C, 1, K]")
        shape = (t.shape[0], t.shape[-1])
        if t.shape[0] != idx.numel():
            self.out.add_tensor(key, t, src)  # wrong size: leave it to the shape check, which names both shapes
            return

        def make() -> torch.Tensor:
            r = t.index_select(0, idx).reshape(shape)
            return r.flip(-1) if flip else r
        self.out.add(key, shape, src, make)

    def mixer(self, kind: OperatorKind, m: str, v: str) -> None:
        """Every parameter of the mixer of ``kind``: ``m`` the sh2 prefix, ``v`` the Vortex block prefix."""
        for t in kind.evo2.tensors:
            if present(self.config, t):
                self.tensor(kind, t, m + t.sh2, v)

    def tensor(self, kind: OperatorKind, t: Evo2Tensor, key: str, v: str) -> None:
        """Read ``t`` of a block (Vortex prefix ``v``) into the sh2 ``key``."""
        src, form, out = v + t.vortex, t.form, self.out
        if form in (TensorForm.MATRIX, TensorForm.VECTOR):
            out.add_tensor(key, self.get(src, 2 if form is TensorForm.MATRIX else 1), src)
        elif form is TensorForm.STREAM_ROWS:
            self.rows(key, src, self.get(src, 2), self.hrows)
        elif form is TensorForm.STREAM_TAPS:
            self.rows(key, src, self.get(src, 3), self.hrows, flip=True)
        elif form is TensorForm.HEAD_ROWS:
            self.rows(key, src, self.get(src, 2), self.qrows)
        elif form in _FIR_FORMS:
            self.fir_taps(key, src, self.get(src, 3), v, decayed=form is TensorForm.DECAYED_FIR_TAPS)
        elif form is TensorForm.FIR_SKIP:
            self.fir_skip(key, src, self.vsd[v + sibling(kind, *_FIR_FORMS).vortex])
        elif form in (TensorForm.MODAL_RATE, TensorForm.MODAL_SCALE):
            self.modal(key, src, self.get(src, 3), scale=form is TensorForm.MODAL_SCALE)
        elif form is TensorForm.MODAL_RESIDUES:
            r = self.get(src, 2)
            out.add(key, tuple(r.shape), src, lambda: r.float())
        else:
            raise NotImplementedError(f"Vortex reader: no conversion for {form}")

    def fir_taps(self, key: str, src: str, h: torch.Tensor, v: str, decayed: bool) -> None:
        """Grouped FIR taps; their Vortex orientation depends on the filter length, not on the operator."""
        G, K = h.shape[0], h.shape[-1]
        causal = K >= CAUSAL_MIN_LEN

        def taps() -> torch.Tensor:
            t = h.reshape(G, K)
            return t if causal else t.flip(-1)

        if not decayed:
            d_key = v + FIR_DSKIP
            if causal:  # Vortex gives the filter a Dskip vector; sh2's filter has none: it must be zero
                _check_zero(d_key, self.get_dskip(d_key))
            self.out.add(key, (G, K), src, taps)
            return
        decay = self.decay
        assert decay is not None
        if decay.shape != (G, K):
            self.out.add(key, (G, K), src, taps)  # the shape check reports the mismatch
        else:
            self.out.add(key, (G, K), src, lambda: (taps().double() / decay.double()).float())

    def get_dskip(self, d_key: str) -> torch.Tensor:
        skip = self.vsd.get(d_key)
        if skip is None:
            raise CheckpointError(f"Vortex checkpoint: missing key {d_key!r} (filters of >= 128 taps have a D term)",
                                  hints=[CheckpointHint.MATCH_ARCHITECTURE])
        self.used.add(d_key)
        return skip

    def fir_skip(self, key: str, src: str, h: torch.Tensor) -> None:
        """The Dskip of the FIR filter ``h`` (its Vortex taps)."""
        if h.shape[-1] >= CAUSAL_MIN_LEN:
            self.out.add_tensor(key, self.get_dskip(src), src)
        else:  # a short FIR filter in Vortex has no D term: an exact zero skip
            D = self.config.hidden_size
            self.out.add(key, (D,), src, lambda: torch.zeros(D, dtype=h.dtype))

    def modal(self, key: str, src: str, log_poles: torch.Tensor, scale: bool) -> None:
        """``p`` (or, with ``scale``, ``gamma = 0``) from Vortex's ``log_poles [D, N, 1]``."""
        if log_poles.shape[-1] != 1:
            raise CheckpointError(f"Vortex checkpoint: {src!r} has shape {list(log_poles.shape)}, expected [D, N, 1]")
        shape = tuple(log_poles.shape[:2])
        if scale:
            self.out.add(key, shape, src, lambda: torch.zeros(shape, dtype=torch.float32))
            return

        def p() -> torch.Tensor:
            lp = log_poles.reshape(shape).double()
            if bool((lp >= 0).any()):
                raise CheckpointError(f"Vortex checkpoint: {src} has non-negative entries (growing filters); "
                                      f"sh2's parametrisation -exp(p)*exp(gamma) cannot represent them")
            return torch.log(-lp).float()
        self.out.add(key, shape, src, p)


def vortex_to_sh2(config: SH2Config, vsd: Mapping[str, torch.Tensor],
                  layout: VortexLayout | None = None) -> LazyStateDict:
    """Convert a Vortex state dict (lazily) to sh2 keys and layouts for ``config``.

    Raises:
        CheckpointError: missing key, a tensor of the wrong rank, an unexpected key, a non-zero bias sh2
            does not have, or non-negative LI log-poles.
    """
    reader = _VortexReader(config, vsd, layout or VortexLayout())
    get, out = reader.get, reader.out
    out.add_tensor("embedding.weight", get("embedding_layer.weight", 2), "embedding_layer.weight")
    out.add_tensor("norm.scale", get("norm.scale", 1), "norm.scale")
    if not config.tie_embeddings:
        out.add_tensor("lm_head.weight", get("unembed.weight", 2), "unembed.weight")
    elif "unembed.weight" in vsd:
        reader.used.add("unembed.weight")
    for i, op in enumerate(config.operators):
        v, s = f"blocks.{i}.", f"blocks.{i}."
        out.add_tensor(s + "norm_in.scale", get(v + "pre_norm.scale", 1), v + "pre_norm.scale")
        out.add_tensor(s + "norm_mlp.scale", get(v + "post_norm.scale", 1), v + "post_norm.scale")
        for a, b in (("l1", "w1"), ("l2", "w2"), ("l3", "w3")):
            out.add_tensor(f"{s}mlp.{b}.weight", get(f"{v}mlp.{a}.weight", 2), f"{v}mlp.{a}.weight")
        reader.mixer(operator_kind(op), s + "mixer.", v)
    for key in vsd:
        if key in reader.used or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key.endswith(_ZERO_OK):
            _check_zero(key, vsd[key])
            continue
        raise CheckpointError(f"Vortex checkpoint: unexpected key {key!r} for config layout {config.layout} "
                              f"({config.num_layers} layers); is the config right?",
                              hints=[CheckpointHint.MATCH_ARCHITECTURE])
    return out


class _VortexWriter:
    """Converts an sh2 state dict into Vortex tensors, one :class:`TensorForm` per branch of :meth:`tensor`."""

    def __init__(self, config: SH2Config, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        self.config, self.state, self.dtype = config, state, dtype
        self.out: dict[str, torch.Tensor] = {}
        self.hinv = _inverse(hyena_rows(config.hidden_size, VortexLayout()))
        self.qinv = _inverse(qkv_rows(config.num_heads, config.head_dim, True))
        self.decay = layout_decay(config)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"sh2 state dict: missing key {key!r}",
                                  hints=[CheckpointHint.MATCH_ARCHITECTURE])
        return self.state[key].detach()

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None else t

    def mixer(self, kind: OperatorKind, m: str, v: str) -> None:
        """Every parameter of the mixer of ``kind``: ``m`` the sh2 prefix, ``v`` the Vortex block prefix."""
        for t in kind.evo2.tensors:
            if present(self.config, t):
                self.tensor(kind, t, m, v)

    def tensor(self, kind: OperatorKind, t: Evo2Tensor, m: str, v: str) -> None:
        get, cast, out = self.get, self.cast, self.out
        key, dst, form = m + t.sh2, v + t.vortex, t.form
        if form in (TensorForm.MATRIX, TensorForm.VECTOR):
            out[dst] = cast(get(key))
        elif form is TensorForm.STREAM_ROWS:
            out[dst] = cast(get(key)[self.hinv])
        elif form is TensorForm.STREAM_TAPS:
            out[dst] = cast(get(key)[self.hinv].flip(-1)[:, None, :])
        elif form is TensorForm.HEAD_ROWS:
            out[dst] = cast(get(key)[self.qinv])
        elif form in _FIR_FORMS:
            h = get(key)
            if form is TensorForm.DECAYED_FIR_TAPS:
                assert self.decay is not None
                h = (h.double() * self.decay.double()).to(h.dtype)
            causal = h.shape[-1] >= CAUSAL_MIN_LEN
            out[dst] = cast((h if causal else h.flip(-1))[:, None, :])
            if causal and not any(u.form is TensorForm.FIR_SKIP for u in kind.evo2.tensors):
                # Vortex creates a D term for every filter of >= 128 taps; this filter has none
                out[v + FIR_DSKIP] = torch.zeros(self.config.hidden_size, dtype=self.dtype or h.dtype)
        elif form is TensorForm.FIR_SKIP:
            if get(m + sibling(kind, *_FIR_FORMS).sh2).shape[-1] >= CAUSAL_MIN_LEN:
                out[dst] = cast(get(key))
            else:
                _check_zero(f"{key} (a Vortex filter shorter than 128 taps has no D term)", get(key))
        elif form is TensorForm.MODAL_RATE:  # gamma (MODAL_SCALE) is folded in here
            p, g = get(key).double(), get(m + sibling(kind, TensorForm.MODAL_SCALE).sh2).double()
            out[dst] = (-torch.exp(p) * torch.exp(g)).float()[..., None]
        elif form is TensorForm.MODAL_RESIDUES:
            out[dst] = get(key).float()
        elif form is not TensorForm.MODAL_SCALE:
            raise NotImplementedError(f"Vortex writer: no conversion for {form}")


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
    writer = _VortexWriter(config, state, dtype)
    get, cast, out = writer.get, writer.cast, writer.out
    out["embedding_layer.weight"] = cast(get("embedding.weight"))
    out["norm.scale"] = cast(get("norm.scale"))
    if not config.tie_embeddings:
        out["unembed.weight"] = cast(get("lm_head.weight"))
    for i, op in enumerate(config.operators):
        s, v = f"blocks.{i}.", f"blocks.{i}."
        out[v + "pre_norm.scale"] = cast(get(s + "norm_in.scale"))
        out[v + "post_norm.scale"] = cast(get(s + "norm_mlp.scale"))
        for a, b in (("l1", "w1"), ("l2", "w2"), ("l3", "w3")):
            out[f"{v}mlp.{a}.weight"] = cast(get(f"{s}mlp.{b}.weight"))
        writer.mixer(operator_kind(op), s + "mixer.", v)
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
