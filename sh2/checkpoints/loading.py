"""One entry point for pretrained weights: detect the format, convert, validate, copy into a model.

Formats (detected from the file's content, not its name):

- ``lightning``: an sh2 Lightning ``.ckpt`` (``{"state_dict": {"model.*": ...}, "hyper_parameters": ...}``);
  the config is rebuilt from the hyper-parameters (``preset`` + ``overrides`` + ``vocab_size``).
- ``sh2``: a plain sh2 state dict ``.pt``/``.pth`` (optionally ``{"state_dict": ..., "config": {...}}``).
- ``vortex``: an evo2-package ``.pt`` (or byte shards ``.pt.partN``) with its YAML config beside it or
  passed; without YAML the config is inferred from the shapes and the Evo 2 presets.
- ``savanna``: a Savanna/DeepSpeed ``mp_rank_00_model_states.pt`` (file or ``global_stepN`` directory).

A sharded Lightning checkpoint folder (``torch.distributed.checkpoint``, what FSDP2 and the context-parallel
strategy write) is read as ``lightning``: its model weights only, in one process. So is a Lightning DeepSpeed
checkpoint folder (ZeRO 1-3; its fp32 weights gathered with DeepSpeed's ``zero_to_fp32``, which needs the
``deepspeed`` package and ``trust_pickle``).

sh2 weights exported as safetensors (:mod:`sh2.checkpoints.safetensors_file`) are read as ``sh2``, and a Hugging
Face repo id is first resolved to its files in the local cache (:mod:`sh2.checkpoints.hub`). The LoRA adapters
of a LoRA run's checkpoint are merged into the weights they adapt (:mod:`sh2.checkpoints.adapters`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sh2.checkpoints.adapters import is_adapter_file, lora_settings_of, merge_adapters
from sh2.checkpoints.files import (
    CheckpointError,
    assemble_shards,
    deepspeed_checkpoint_tag,
    follow_latest,
    is_distributed_checkpoint,
    load_deepspeed_checkpoint,
    load_distributed_checkpoint,
    load_file,
)
from sh2.checkpoints.hub import resolve_hub_checkpoint
from sh2.checkpoints.safetensors_file import is_safetensors_checkpoint, read_safetensors
from sh2.checkpoints.savanna import find_savanna_file, read_savanna
from sh2.checkpoints.state import LazyStateDict, _outside_zero_init, as_lazy, check_state, expected_shapes
from sh2.checkpoints.vortex import find_vortex_yaml, read_vortex
from sh2.checkpoints.vortex_config import config_from_vortex, read_yaml, warn_if_fp8_trained
from sh2.models.config import SH2Config

log = logging.getLogger(__name__)
_STRIP_PREFIXES = ("model.", "_orig_mod.", "module.")
_NON_SEMANTIC = ("name", "max_seq_len", "init_std")


def detect_format(obj: Any) -> str:
    """``lightning``, ``sh2``, ``vortex`` or ``savanna`` for a loaded checkpoint object.

    Raises:
        CheckpointError: when the object is none of them (the message lists its first keys).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    if isinstance(obj.get("state_dict"), Mapping):
        keys = list(obj["state_dict"])
        if any(k.startswith("model.") for k in keys) or "hyper_parameters" in obj:
            return "lightning"
        return "sh2"
    if isinstance(obj.get("module"), Mapping) or any(str(k).startswith("sequential.") for k in obj):
        return "savanna"
    if "embedding_layer.weight" in obj or any(str(k).endswith("pre_norm.scale") for k in obj):
        return "vortex"
    if "embedding.weight" in obj or any(str(k).startswith(_STRIP_PREFIXES) for k in obj):
        return "sh2"
    raise CheckpointError(f"unknown checkpoint format (first keys: {list(obj)[:5]}); expected an sh2 state dict "
                          f"or Lightning .ckpt, a Vortex (evo2) .pt or a Savanna model-state file")


def _strip(state: Mapping[str, Any], lightning: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if lightning and not key.startswith("model."):
            continue  # metric states and other module attributes
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _config_of(obj: Mapping[str, Any]) -> SH2Config | None:
    """The config stored with an sh2 checkpoint (``config`` or Lightning hyper-parameters), if any."""
    for holder in (obj, obj.get("hyper_parameters") or {}):
        cfg = holder.get("config")
        if isinstance(cfg, SH2Config):
            return cfg
        if isinstance(cfg, Mapping):
            return SH2Config.from_dict(dict(cfg))
    hp = obj.get("hyper_parameters") or {}
    if hp.get("preset"):
        overrides = dict(hp.get("overrides") or {})
        if "vocab_size" in hp:
            overrides.setdefault("vocab_size", hp["vocab_size"])
        return SH2Config.from_name(hp["preset"], **overrides)
    return None


def _resolve(path: Path) -> tuple[Path, bool]:
    """The file to read and whether it is a Savanna directory."""
    path = follow_latest(path)  # a DeepSpeed/Savanna run folder: its latest global_stepN folder
    if path.is_dir():
        if list(path.glob("mp_rank_*_model_states.pt")):
            return find_savanna_file(path), True
        files = sorted(set(path.glob("*.pt")) | set(path.glob("*.pth")) | set(path.glob("*.ckpt")))
        parts = sorted({p.with_name(p.name.split(".part")[0]) for p in path.glob("*.pt.part*")})
        found = sorted(set(files) | set(parts))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected one checkpoint file in the directory, found "
                                  f"{[p.name for p in found] or 'none'}; pass the file itself")
        return found[0], False
    return path, False


def read_checkpoint(path: str | os.PathLike, config: SH2Config | None = None,
                    vortex_config: str | os.PathLike | Mapping[str, Any] | None = None,
                    trust_pickle: bool = False) -> tuple[SH2Config | None, LazyStateDict, str]:
    """Read any supported checkpoint into a lazily converted sh2 state.

    Args:
        path: checkpoint file, shard or directory.
        config: the config to load into (e.g. the model's). When the checkpoint carries its own config
            and they differ, a warning lists the differing fields. Shapes are validated against it.
        vortex_config: the evo2 YAML for Vortex files (default: found beside the file).
        trust_pickle: allow pickled Python objects in the file (trusted files only).

    Returns:
        ``(config, state, format)``; config is None only for a plain state dict without config when none
        was passed.
    """
    hub = resolve_hub_checkpoint(path)  # a Hugging Face repo id: its files in the local cache (sh2/checkpoints/hub.py)
    if hub is not None:
        path, vortex_config = hub.path, vortex_config if vortex_config is not None else hub.vortex_config
    if is_distributed_checkpoint(path):  # sharded Lightning checkpoint (FSDP2 / context-parallel runs)
        file, is_savanna_dir = Path(path), False
        obj = load_distributed_checkpoint(file, trust_pickle=trust_pickle)
    elif is_safetensors_checkpoint(path):  # sh2 weights exported as safetensors (file, or folder + config.json)
        if is_adapter_file(path):
            raise CheckpointError(f"{path} holds LoRA adapters only, not model weights; merge them into the weights "
                                  f"they were trained on: python -m sh2.checkpoints.export BASE merged.safetensors "
                                  f"--adapters {path}")
        file, is_savanna_dir = Path(path), False
        obj = read_safetensors(file)
    elif deepspeed_checkpoint_tag(path, trust_pickle) is not None:  # Lightning DeepSpeed run (ZeRO 1-3)
        file, is_savanna_dir = Path(path), False
        obj = load_deepspeed_checkpoint(file, trust_pickle=trust_pickle)
    else:
        file, is_savanna_dir = _resolve(Path(path))
        obj = load_file(assemble_shards(file), trust_pickle=trust_pickle)
    fmt = "savanna" if is_savanna_dir else detect_format(obj)
    own: SH2Config | None = None
    if fmt == "vortex":
        yaml_src = vortex_config if vortex_config is not None else find_vortex_yaml(file)
        own = config_from_vortex(read_yaml(yaml_src)) if yaml_src is not None else None
        used, state = read_vortex(file, vortex_config=yaml_src, config=config or own, state=obj)
        warn_if_fp8_trained(used)
    elif fmt == "savanna":
        used, state = read_savanna(file, config=config, state=obj)
        warn_if_fp8_trained(used)
    else:
        inner = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
        own = _config_of(obj)
        used = config or own
        state = as_lazy({k: v for k, v in _strip(inner, fmt == "lightning").items() if isinstance(v, torch.Tensor)})
        state = merge_adapters(state, None, lora_settings_of(obj), str(path))  # a LoRA run: W + (alpha / r) B A
    if config is not None and own is not None:
        diff = {k: (v, getattr(config, k)) for k, v in own.to_dict().items()
                if k not in _NON_SEMANTIC and getattr(config, k) != v}
        if diff:
            log.warning("%s: the checkpoint's config differs from the target config in %s (checkpoint, target); "
                        "loading with the target config", path, diff)
    if used is not None:
        check_state(expected_shapes(used), state, f"{path} ({fmt})")
    return used, state, fmt


def load_pretrained(path: str, config: SH2Config | None = None, *,
                    vortex_config: str | os.PathLike | Mapping[str, Any] | None = None, trust_pickle: bool = False,
                    lazy: bool = False) -> tuple[SH2Config | None, dict[str, torch.Tensor]]:
    """Load pretrained weights of any supported format as an sh2 state dict.

    Example:
        >>> cfg, state = load_pretrained("evo2_7b.pt")          # evo2_7b.yml beside it, or inferred
        >>> model = SH2Model(cfg); model.load_state_dict(state)

    Args:
        path: sh2 ``.ckpt``/``.pt``, Vortex ``.pt`` (or ``.pt.part0``), Savanna file or directory.
        config: target config (validated; used for the layout conversions). Default: the checkpoint's.
        vortex_config: evo2 YAML for Vortex checkpoints (default: beside the file).
        trust_pickle: allow pickled objects (trusted files only).
        lazy: return the lazily converted mapping instead of a dict (converts tensors on access).

    Returns:
        ``(config or None, state_dict)`` in sh2 naming and layout.

    Raises:
        CheckpointError: unreadable/truncated file, missing shard, unknown format, or a state that does not
            match the config (the message names the first mismatching key and both shapes).
    """
    with _outside_zero_init():
        used, state, _ = read_checkpoint(path, config, vortex_config, trust_pickle)
        return used, (state if lazy else state.materialize())  # type: ignore[return-value]


@torch.no_grad()
def load_into(model: nn.Module, path: str | os.PathLike | Mapping[str, torch.Tensor] | None, *,
              vortex_config: str | os.PathLike | Mapping[str, Any] | None = None,
              trust_pickle: bool = False,
              gather: Callable[[nn.Module], AbstractContextManager] | None = None) -> SH2Config | None:
    """Copy pretrained weights into an existing model, in place.

    Every key and shape is validated before anything is copied (the first mismatch is reported with
    both shapes); then tensors are converted and copied one at a time, cast to each parameter's dtype
    and device (LI ``p, gamma, R`` keep the model's fp32). Works for models on any device.

    Args:
        model: an :class:`~sh2.models.SH2Model` (uses ``model.config`` when present).
        path: a checkpoint path (any supported format), an sh2 state dict (or the lazy state of
            :func:`load_pretrained` with ``lazy=True``), or None with ``gather`` on ranks that only take part
            in the gathers while another rank (whose values ``gather`` keeps) copies.
        vortex_config: evo2 YAML for Vortex files.
        trust_pickle: allow pickled objects (trusted files only).
        gather: for a model with partitioned parameters (DeepSpeed ZeRO-3): ``gather(unit)`` is a context in
            which ``unit``'s parameters are whole. The weights are then copied one ``model.init_units()``
            unit at a time, so no device holds more than one block in full.

    Returns:
        The config the weights were converted with.
    """
    with _outside_zero_init():  # conversions must not build partitioned bf16 tensors under zero.Init
        config = getattr(model, "config", None)
        if gather is None:
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        elif config is None:
            raise CheckpointError("load_into with gather= needs an SH2Model (model.config)")
        else:
            shapes = expected_shapes(config)
        if path is None:
            if gather is None:
                raise CheckpointError("load_into: path=None only with gather= (a rank that copies nothing)")
            for unit in model.init_units():
                with gather(unit):
                    pass
            return config
        if isinstance(path, LazyStateDict):
            state, where = path, "state dict"
        elif isinstance(path, Mapping):
            state, where = as_lazy(_strip(path, False)), "state dict"
        else:
            config, state, fmt = read_checkpoint(path, config, vortex_config, trust_pickle)
            where = f"{path} ({fmt})"
        check_state(shapes, state, where)
        if gather is None:
            _copy(model.state_dict(), state, "")
            return config
        names = {id(m): n for n, m in model.named_modules()}
        for unit in model.init_units():
            with gather(unit):
                _copy(unit.state_dict(), state, names[id(unit)] + ".")
    return config


def _copy(targets: Mapping[str, torch.Tensor], state: LazyStateDict, prefix: str) -> None:
    for key, dst in targets.items():
        if dst.is_meta:
            raise CheckpointError(f"load_into: {prefix}{key} is on the meta device; materialise the model first "
                                  f"(model.to_empty(device=...))")
        src = state[prefix + key]
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
        del src
