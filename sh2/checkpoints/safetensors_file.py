"""sh2 weights as safetensors: one file whose metadata holds the config, or a folder with a config.json.

Two layouts, both read back by :func:`sh2.checkpoints.load_pretrained` and ``model.init_from``:

- ``NAME.safetensors``: the sh2 state dict; the header's ``__metadata__`` holds ``sh2_config`` (the
  :class:`~sh2.models.SH2Config` as JSON) and ``format: pt``.
- a folder with ``model.safetensors`` and ``config.json`` (``{"model_type": "sh2", ...SH2Config fields}``),
  the layout Hugging Face repositories use; a sharded ``model.safetensors.index.json`` (``weight_map``) with
  its ``model-0000N-of-0000M.safetensors`` files is read too.

Tensors are memory-mapped when read (the ``safetensors`` library's ``safe_open``), so loading needs no second
copy of the weights in memory. safetensors files hold no pickled code, so they need no ``trust_pickle``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sh2.checkpoints.files import CheckpointError, give_default_permissions
from sh2.models.config import SH2Config

__all__ = ["is_safetensors_checkpoint", "read_safetensors", "save_safetensors", "CONFIG_KEY"]

CONFIG_KEY = "sh2_config"
FOLDER_WEIGHTS = "model.safetensors"
FOLDER_INDEX = "model.safetensors.index.json"
FOLDER_CONFIG = "config.json"
FP32_SUFFIXES = ("filter.p", "filter.gamma", "filter.R")  # LI poles and residues stay fp32 (as trained)


def is_safetensors_checkpoint(path: str | os.PathLike) -> bool:
    """A ``.safetensors`` file, or a folder holding ``model.safetensors`` (or its sharded index)."""
    path = Path(path)
    if path.is_dir():
        return (path / FOLDER_WEIGHTS).is_file() or (path / FOLDER_INDEX).is_file()
    return path.suffix == ".safetensors" and path.is_file()


def _config_from(values: Mapping[str, Any], where: str) -> SH2Config:
    values = {k: v for k, v in values.items() if k != "model_type"}
    try:
        return SH2Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: the stored sh2 config is not valid ({err})") from None


def _open(file: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {file} as safetensors ({err}); is it truncated? Download or export "
                              f"it again") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """An sh2 safetensors checkpoint as ``{"state_dict": {name: memory-mapped tensor}, "config": dict | None}``
    (the shape of a plain sh2 checkpoint, see :func:`sh2.checkpoints.loading.detect_format`).

    The config comes from the file's ``sh2_config`` metadata, else from a ``config.json`` beside it (or in the
    folder) with ``"model_type": "sh2"``; without either it is None (the target model's config is used).

    Raises:
        CheckpointError: unreadable file, a shard named by the index that is missing, an invalid config.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / FOLDER_INDEX).is_file() and not (path / FOLDER_WEIGHTS).is_file():
        weight_map = json.loads((path / FOLDER_INDEX).read_text()).get("weight_map") or {}
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [path / FOLDER_WEIGHTS if path.is_dir() else path]
    state: dict[str, torch.Tensor] = {}
    config: dict[str, Any] | None = None
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} does not exist (named by {path / FOLDER_INDEX}); download every shard")
        handle = _open(file)
        meta = handle.metadata() or {}
        if CONFIG_KEY in meta and config is None:
            config = _config_from(json.loads(meta[CONFIG_KEY]), str(file)).to_dict()
        for key in handle.keys():
            state[key] = handle.get_tensor(key)
    cfg_file = folder / FOLDER_CONFIG
    if config is None and cfg_file.is_file():
        values = json.loads(cfg_file.read_text())
        if isinstance(values, dict) and values.get("model_type") == "sh2":
            config = _config_from(values, str(cfg_file)).to_dict()
    return {"state_dict": state, "config": config}


def save_safetensors(state: Mapping[str, torch.Tensor] | torch.nn.Module, config: SH2Config,
                     path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write sh2 weights with their config as safetensors.

    Args:
        state: an sh2 state dict or model (``model.state_dict()`` is taken).
        config: the model's config (stored with the weights).
        path: ``NAME.safetensors`` (config in the metadata) or a folder (``model.safetensors`` +
            ``config.json``, config also in the metadata).
        dtype: cast floating-point weights to this dtype (e.g. ``torch.bfloat16``); the LI ``p, gamma, R``
            stay fp32. Default: keep each tensor's dtype.

    Returns:
        The ``.safetensors`` file written.
    """
    from safetensors.torch import save_file

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = {}
    for key, t in state.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point() and not key.endswith(FP32_SUFFIXES):
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    path = Path(path)
    values = config.to_dict()
    if path.suffix == ".safetensors":
        file = path
    else:
        path.mkdir(parents=True, exist_ok=True)
        file = path / FOLDER_WEIGHTS
        (path / FOLDER_CONFIG).write_text(json.dumps({"model_type": "sh2", **values}, indent=2) + "\n")
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata={"format": "pt", CONFIG_KEY: json.dumps(values)})
    give_default_permissions(file)
    return file
