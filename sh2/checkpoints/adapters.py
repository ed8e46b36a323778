"""LoRA adapters on disk: adapter-only safetensors files, and adapters folded into full weights on read.

An adapter file (``adapters.safetensors``, written by :func:`save_adapters`) holds only the ``...lora_A`` /
``...lora_B`` tensors of a model under their sh2 names, and in its metadata ``format: sh2-lora-adapters``, the
LoRA settings (``lora``: rank, alpha, dropout, targets), the model config (``sh2_config``), the base weights
the run started from (``base``, its ``model.init_from``) and the training step (``step``). A 7B model's
adapters at rank 8 on every projection take about 72 MB (fp32) instead of the model's 13 GB (bf16).

Full checkpoints of a LoRA run (an sh2 ``.ckpt`` file or folder) hold the base weights and the adapters; when
they are read as pretrained weights (``model.init_from``, ``sh2 predict``, the export command), the adapters are
merged, ``W' = W + (alpha / r) B A`` with the run's settings from the checkpoint's hyper-parameters, so the
state has the base model's keys and loads into, or exports from, any sh2 model (:func:`merge_adapters`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sh2.checkpoints.files import CheckpointError
from sh2.checkpoints.state import LazyStateDict, as_lazy
from sh2.models.config import SH2Config
from sh2.models.lora import LoRAConfig, adapter_parameters, is_adapter_key, lora_delta

ADAPTER_FORMAT = "sh2-lora-adapters"


def save_adapters(tensors: Mapping[str, torch.Tensor] | nn.Module, lora: LoRAConfig, config: SH2Config,
                  path: str | os.PathLike, *, base: str | None = None, step: int | None = None) -> Path:
    """Write LoRA adapters as safetensors, atomically (temporary file in the same folder, fsync, rename).

    Args:
        tensors: the adapters by sh2 parameter name (``blocks.0.mlp.w1.lora_A``, ...), or a model with LoRA
            layers (its adapters are taken; they must be whole tensors, not shards).
        lora: the settings the adapters were trained with.
        config: the model's config.
        path: the ``.safetensors`` file to write.
        base: the base weights the adapters apply to (recorded for the reader).
        step: the training step (recorded).

    Returns:
        The file written.
    """
    from safetensors.torch import save

    if isinstance(tensors, nn.Module):
        tensors = adapter_parameters(tensors)
    if not tensors:
        raise ValueError("save_adapters: no LoRA adapters to save (apply_lora first)")
    out = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    meta = {"format": ADAPTER_FORMAT, "lora": json.dumps(lora.to_dict()), "sh2_config": json.dumps(config.to_dict()),
            "base": base or "", "step": "" if step is None else str(step)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:  # adapters are small: serialised in memory, written and synced at once
            fh.write(save(out, metadata=meta))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_adapter_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_adapters`."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == ADAPTER_FORMAT
    except (SafetensorError, OSError):
        return False


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoRAConfig, SH2Config, dict[str, str]]:
    """``(tensors, lora settings, model config, metadata)`` of an adapter file.

    Raises:
        CheckpointError: not an adapter file, or unreadable.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path} as safetensors ({err}); is it truncated?") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not an sh2 LoRA adapter file (its metadata has no "
                              f"format: {ADAPTER_FORMAT}); adapter files are written as adapters.safetensors "
                              f"beside the checkpoints of a run with model.lora")
    try:
        lora = LoRAConfig.coerce(json.loads(meta["lora"]))
        config = SH2Config.from_dict(json.loads(meta["sh2_config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid adapter metadata ({err})") from None
    return tensors, lora, config, meta


@torch.no_grad()
def load_adapters(model: nn.Module, path: str | os.PathLike) -> LoRAConfig:
    """Copy the adapters of an adapter file into a model that has the same LoRA layers (after ``apply_lora``).

    Raises:
        CheckpointError: the file's adapters and the model's differ in names or shapes (the first difference
            is named).
    """
    tensors, lora, _, _ = read_adapters(path)
    params = adapter_parameters(model)
    missing = [k for k in params if k not in tensors]
    extra = [k for k in tensors if k not in params]
    if missing or extra:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(f"{path}: its adapters do not fit the model's LoRA layers ({first}; the file has "
                              f"rank {lora.rank}, targets {list(lora.targets)}); apply LoRA with the file's "
                              f"settings")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: shape mismatch at {name!r}: file {list(tensors[name].shape)}, model "
                                  f"{list(p.shape)} (the file has rank {lora.rank})")
        p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return lora


def lora_settings_of(obj: Mapping[str, Any]) -> LoRAConfig | None:
    """The LoRA settings stored with an sh2 checkpoint (Lightning hyper-parameter ``lora``), if any."""
    hp = obj.get("hyper_parameters") or {}
    value = hp.get("lora") if isinstance(hp, Mapping) else None
    if value is None:
        return None
    try:
        return LoRAConfig.coerce(dict(value) if isinstance(value, Mapping) else value)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"the checkpoint's LoRA settings are invalid ({err})") from None


def merge_adapters(state: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor] | None,
                   lora: LoRAConfig | None, where: str) -> LazyStateDict:
    """``state`` with LoRA adapters folded into the weights they adapt, lazily (one tensor at a time).

    Args:
        state: an sh2 state dict (or lazy state), possibly with ``...lora_A`` / ``...lora_B`` keys.
        adapters: more adapters to merge (from an adapter file), or None.
        lora: their settings (the scale ``alpha / rank``); needed when there is any adapter.
        where: names the source in errors.

    Returns:
        The state without adapter keys; each adapted ``...weight`` is ``W + (alpha / r) B A`` in W's dtype.

    Raises:
        CheckpointError: adapters without settings, an adapter without its pair or its base weight, or
            shapes that do not fit.
    """
    lazy = as_lazy(state)
    pairs: dict[str, dict[str, Any]] = {}
    for source in (lazy, adapters or {}):
        for key in source:
            if is_adapter_key(key):
                module, _, which = key.rpartition(".")
                shape = lazy.shape(key) if source is lazy else tuple(source[key].shape)
                get = (lambda k=key: lazy[k]) if source is lazy else (lambda k=key, s=source: s[k])
                pairs.setdefault(module, {})[which] = (shape, get)
    if not pairs:
        return lazy
    if lora is None:
        raise CheckpointError(f"{where} holds LoRA adapters ({next(iter(pairs))}.lora_A, ...) but not their settings "
                              f"(rank, alpha): read it from the run's Lightning checkpoint, which stores them")
    out = LazyStateDict({k: e for k, e in lazy.entries.items() if not is_adapter_key(k)})
    for module, pair in pairs.items():
        key = f"{module}.weight"
        if set(pair) != {"lora_A", "lora_B"} or key not in out:
            lacking = "its base weight" if key not in out else f"{module}.{({'lora_A', 'lora_B'} - set(pair)).pop()}"
            raise CheckpointError(f"{where}: the LoRA adapter of {module!r} lacks {lacking}")
        (shape_a, get_a), (shape_b, get_b) = pair["lora_A"], pair["lora_B"]
        shape = out.shape(key)
        if len(shape_a) != 2 or tuple(shape) != (shape_b[0], shape_a[1]) or shape_a[0] != shape_b[1]:
            raise CheckpointError(f"{where}: LoRA adapter shapes {list(shape_a)} (A) and {list(shape_b)} (B) do not "
                                  f"fit the weight {key!r} {list(shape)}")
        base = out.entries[key]

        def make(base=base, get_a=get_a, get_b=get_b) -> torch.Tensor:
            weight = base()
            delta = lora_delta(get_a(), get_b(), lora.scaling)
            return (weight.to(delta.dtype) + delta).to(weight.dtype)

        out.add(key, shape, f"{base.source} + LoRA {module}", make)
    return out
