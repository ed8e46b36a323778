"""The Vortex (evo2 package) YAML config <-> :class:`~sh2.models.SH2Config`.

Vortex configs name operators by layer index lists (``hcs_layer_idxs`` = Hyena-SE, ``hcm_layer_idxs`` =
Hyena-MR, ``hcl_layer_idxs`` = Hyena-LI, ``attn_layer_idxs`` = MHA: each kind declares its list as
``kind.evo2.vortex_layers``); sh2 uses one layout string. Fields
sh2 has no use for (kernel switches, tokenizer, parallel sizes) are ignored on import and written with
the values the evo2 package expects on export, so an exported file runs there unchanged. The MR decay
is not part of a Vortex config (Vortex stores the filter with the decay multiplied in); sh2 writes its
own ``sh2_mr_decay``/``sh2_mr_ref_len`` keys, which Vortex ignores, and reads them back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sh2.checkpoints.files import CheckpointError
from sh2.models.config import PRESETS, SH2Config, layout_string
from sh2.models.mixer import Evo2Names
from sh2.models.operators import MIXERS

log = logging.getLogger(__name__)

# Released Evo 2 models that used FP8 input projections (Transformer Engine) during training.
FP8_TRAINED_PREFIXES = ("evo2_1b", "evo2_20b", "evo2_40b")
_IDX_FIELDS = tuple((cls.kind.evo2.vortex_layers, name) for name, cls in MIXERS.items())


@dataclass(frozen=True)
class VortexLayout:
    """How a Vortex file arranges the Hyena streams and the fused QKV weight.

    Attributes:
        interleave: projection rows interleaved (row ``3c + s`` is stream s); Evo 2: True.
        swap_qk: Vortex's ``hyena_flip_x1x2``: the post-gate (q) and pre-gate (k) streams are swapped;
            Evo 2: False.
        qkv_per_head: ``column_split``: Wqkv rows in per-head order ``[heads, (q,k,v), head_dim]``; Evo 2: True.
    """

    interleave: bool = True
    swap_qk: bool = False
    qkv_per_head: bool = True


def identify_kind(has: Callable[[str], bool], keys: Callable[[Evo2Names], tuple[str, ...]]) -> str | None:
    """The operator kind of a checkpoint block, from the keys it holds.

    Args:
        has: whether the block holds a key (relative to the block).
        keys: the identifying keys of a kind in the format (``lambda e: e.vortex_keys``).

    Returns:
        The first kind whose keys are all held, kinds with more keys first; else the kind that declares no
        keys (the one left over), or None when every kind declares some.
    """
    ranked = sorted(MIXERS.values(), key=lambda cls: -len(keys(cls.kind.evo2)))
    for cls in ranked:
        wanted = keys(cls.kind.evo2)
        if wanted and all(has(k) for k in wanted):
            return cls.kind.name
    return next((cls.kind.name for cls in ranked if not keys(cls.kind.evo2)), None)


def read_yaml(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A Vortex config as a dict, from a YAML path or an existing mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"Vortex config {path} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise CheckpointError(f"Vortex config {path} is not a YAML mapping")
    return data


def _req(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"Vortex config: required field {key!r} is missing")
    return cfg[key]


def layout_from_idxs(cfg: Mapping[str, Any], num_layers: int) -> str:
    """The compact sh2 layout from the four Vortex index lists (each layer must be in exactly one)."""
    ops: list[str | None] = [None] * num_layers
    for field_name, op in _IDX_FIELDS:
        for i in cfg.get(field_name) or []:
            if not 0 <= int(i) < num_layers:
                raise CheckpointError(f"Vortex config: {field_name} contains {i}, outside 0..{num_layers - 1}")
            if ops[int(i)] is not None:
                raise CheckpointError(f"Vortex config: layer {i} is listed as both {ops[int(i)]} and {op}")
            ops[int(i)] = op
    missing = [i for i, op in enumerate(ops) if op is None]
    if missing:
        raise CheckpointError(f"Vortex config: layer {missing[0]} is in none of {[f for f, _ in _IDX_FIELDS]}")
    return layout_string(ops)  # type: ignore[arg-type]


def vortex_layout(cfg: Mapping[str, Any]) -> VortexLayout:
    """The stream/QKV arrangement a Vortex config declares; unsupported arrangements raise."""
    if cfg.get("column_split_hyena", False):
        raise CheckpointError("Vortex config: column_split_hyena=True (per-head Hyena streams) is not supported; "
                              "Evo 2 uses column_split_hyena=False")
    if int(cfg.get("proj_groups", 1)) != 1 or cfg.get("smeared_gqa", False):
        raise CheckpointError("Vortex config: grouped-query attention (proj_groups != 1) is not supported by the "
                              "Vortex reader")
    return VortexLayout(interleave=bool(cfg.get("interleave", True)),
                        swap_qk=bool(cfg.get("hyena_flip_x1x2", False)),
                        qkv_per_head=bool(cfg.get("column_split", True)))


def config_from_vortex(cfg: Mapping[str, Any], name: str | None = None) -> SH2Config:
    """Map a Vortex config to :class:`SH2Config`.

    Raises:
        CheckpointError: for a missing required field or a feature sh2 cannot represent exactly.
    """
    D = int(_req(cfg, "hidden_size"))
    layers = int(_req(cfg, "num_layers"))
    heads = int(_req(cfg, "num_attention_heads"))
    act = cfg.get("mlp_activation", "gelu")
    if act != "gelu":
        raise CheckpointError(f"Vortex config: mlp_activation={act!r} is not supported (sh2 has exact GELU)")
    for key in ("hcl_filter_groups", "num_filters"):
        if cfg.get(key) not in (None, D):
            raise CheckpointError(f"Vortex config: {key}={cfg[key]} but sh2 Hyena-LI has one filter per channel "
                                  f"({D})")
    if cfg.get("final_norm", True) is False:
        raise CheckpointError("Vortex config: final_norm=False is not supported")
    mlp = cfg.get("inner_mlp_size")
    if mlp is None:  # Vortex's own default
        multiple = int(cfg.get("inner_size_multiple_of", 64)) * int(cfg.get("model_parallel_size", 1))
        mlp = multiple * ((int(2 * D * 4 / 3) + multiple - 1) // multiple)
    scaling = float(cfg.get("rotary_emb_scaling_factor") or 1.0)
    values: dict[str, Any] = dict(
        name=name or str(cfg.get("model_name") or "vortex"),
        vocab_size=int(cfg.get("vocab_size", 512)),
        hidden_size=D, num_layers=layers, num_heads=heads, mlp_hidden_size=int(mlp),
        mlp_activation="evo2" if cfg.get("evo2_style_activations", False) else "gelu",
        layout=layout_from_idxs(cfg, layers),
        featurizer_len=int(cfg.get("short_filter_length", 3)),
        se_filter_len=int(cfg.get("hcs_filter_length", 7)),
        mr_filter_len=int(cfg.get("hcm_filter_length", 128)),
        se_groups=int(cfg.get("hcs_filter_groups", D)),
        mr_groups=int(cfg.get("hcm_filter_groups", D)),
        li_state_size=int(cfg.get("state_size", 16)),
        mr_decay=str(cfg.get("sh2_mr_decay", "weak")),
        mr_ref_len=int(cfg.get("sh2_mr_ref_len", 8192)),
        norm_eps=float(cfg.get("eps", 1e-6)),
        rope_base=float(cfg.get("rotary_emb_base", 1e6)),  # Vortex's default when the field is absent
        rope_scaling=scaling if cfg.get("use_interpolated_rotary_pos_emb", False) else 1.0,
        tie_embeddings=bool(cfg.get("tie_embeddings", True)),
        hyena_out_bias=bool(cfg.get("hyena_out_proj_bias", True)),
        attn_out_bias=bool(cfg.get("mha_out_proj_bias", True)),
        max_seq_len=int(cfg.get("max_seqlen", 8192)),
    )
    try:
        return SH2Config.from_dict(values)
    except ValueError as err:
        raise CheckpointError(f"Vortex config cannot be represented as an SH2Config: {err}") from None


def vortex_from_config(config: SH2Config) -> dict[str, Any]:
    """A Vortex config (as the evo2 package reads it) for an sh2 config.

    Raises:
        CheckpointError: for configs Vortex cannot express (GQA, short MR filters with a skip term, ...).
    """
    if config.kv_heads != config.num_heads:
        raise CheckpointError("export to Vortex: grouped-query attention (num_kv_heads) is not supported by Vortex")
    if config.vocab_size % 8:
        raise CheckpointError("export to Vortex: vocab_size must be a multiple of 8")
    layer_lists = {field_name: [i for i, o in enumerate(config.operators) if o == op] for field_name, op in _IDX_FIELDS}
    return {
        "model_name": config.name, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_filters": config.hidden_size, **layer_lists, "hcm_filter_length": config.mr_filter_len,
        "hcl_filter_groups": config.hidden_size, "hcm_filter_groups": config.mr_groups,
        "hcs_filter_groups": config.se_groups, "hcs_filter_length": config.se_filter_len,
        "num_layers": config.num_layers, "short_filter_length": config.featurizer_len,
        "num_attention_heads": config.num_heads, "short_filter_bias": False,
        "mlp_init_method": "torch.nn.init.zeros_", "mlp_output_init_method": "torch.nn.init.zeros_",
        "eps": config.norm_eps, "state_size": config.li_state_size, "rotary_emb_base": config.rope_base,
        "rotary_emb_scaling_factor": config.rope_scaling,
        "use_interpolated_rotary_pos_emb": config.rope_scaling != 1.0,
        "make_vocab_size_divisible_by": 8, "inner_size_multiple_of": 16, "inner_mlp_size": config.mlp_hidden_size,
        "log_intermediate_values": False, "proj_groups": 1, "hyena_filter_groups": 1, "column_split_hyena": False,
        "column_split": True, "interleave": True, "evo2_style_activations": config.mlp_activation == "evo2",
        "model_parallel_size": 1, "pipe_parallel_size": 1, "tie_embeddings": config.tie_embeddings,
        "mha_out_proj_bias": config.attn_out_bias, "hyena_out_proj_bias": config.hyena_out_bias,
        "hyena_flip_x1x2": False, "qkv_proj_bias": False, "use_fp8_input_projections": False,
        "max_seqlen": config.max_seq_len, "max_batch_size": 1, "final_norm": True, "use_flash_attn": True,
        "use_flash_rmsnorm": False, "use_flash_depthwise": False, "use_flashfft": False,
        "use_laughing_hyena": False, "inference_mode": True, "tokenizer_type": "CharLevelTokenizer",
        "prefill_style": "fft", "mlp_activation": "gelu", "print_activations": False,
        "sh2_mr_decay": config.mr_decay, "sh2_mr_ref_len": config.mr_ref_len,
    }


def _shape_signature(c: SH2Config) -> tuple:
    return (c.vocab_size, c.hidden_size, c.num_layers, c.mlp_hidden_size, c.layout, c.se_groups, c.mr_groups,
            c.se_filter_len, c.mr_filter_len, c.li_state_size, c.featurizer_len)


def infer_config(state: Mapping[str, torch.Tensor], name: str = "vortex") -> SH2Config:
    """Build a config from the tensor shapes of a Vortex state dict (when no YAML is available).

    Shapes fix the width, depth, layout, filter sizes and MLP size; the remaining fields (heads, RoPE,
    activation policy) come from the first Evo 2 preset with the same shapes. Without a match, Evo 2
    defaults are used (head size 128) and a warning says to pass the YAML config.
    """
    if "embedding_layer.weight" not in state:
        raise CheckpointError("Vortex checkpoint: 'embedding_layer.weight' is missing")
    vocab, D = state["embedding_layer.weight"].shape
    layer_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    layers = max(layer_ids) + 1 if layer_ids else 0
    ops, values = [], {}
    for i in range(layers):
        p = f"blocks.{i}."
        op = identify_kind(lambda key, p=p: p + key in state, lambda names: names.vortex_keys)
        if op is None:
            raise CheckpointError(f"Vortex checkpoint: cannot tell the operator of layer {i} from its keys")
        ops.append(op)
        for size in MIXERS[op].kind.evo2.vortex_sizes:
            if p + size.key in state:
                values[size.field] = state[p + size.key].shape[size.dim]
        if p + "mlp.l1.weight" in state:
            values["mlp_hidden_size"] = state[p + "mlp.l1.weight"].shape[0]
    base = dict(name=name, vocab_size=vocab, hidden_size=D, num_layers=layers, layout=layout_string(ops), **values)
    for preset, fields in PRESETS.items():
        candidate = SH2Config.from_dict({**fields, "name": preset})
        try:
            wanted = SH2Config.from_dict({**fields, **base})
        except ValueError:
            continue
        if _shape_signature(candidate) == _shape_signature(wanted):
            log.warning("no Vortex YAML config given: inferred preset %s from the tensor shapes (RoPE and "
                        "activation settings come from the preset); pass the evo2 config YAML to be sure", preset)
            return candidate
    heads = D // 128 if D % 128 == 0 else 1
    log.warning("no Vortex YAML config given and no preset matches the shapes: assuming %d heads, Evo 2 "
                "activations, RoPE base 1e4 without interpolation; pass the YAML config to be exact", heads)
    return SH2Config.from_dict({**base, "num_heads": heads, "mlp_activation": "evo2"})


def warn_if_fp8_trained(config: SH2Config) -> None:
    """Warn for released Evo 2 models trained with FP8 input projections (1B, 20B, 40B)."""
    if config.name.startswith(FP8_TRAINED_PREFIXES) or (config.hidden_size, config.num_layers) in (
            (1920, 25), (8192, 50)):
        log.warning("%s: this Evo 2 model was trained with FP8 (Transformer Engine) Hyena input projections; "
                    "sh2 runs them in bf16/fp32, which matches the original to bf16 rounding but not bit-for-bit "
                    "(see docs/evo2.md)", config.name)
