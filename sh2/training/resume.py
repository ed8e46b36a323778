"""What a checkpoint given to ``--ckpt_path`` holds, and how the run's settings must agree with it.

A resume continues the checkpoint's run: the model it builds must be the checkpoint's architecture, and (for
``fit``) its data stream must be laid out as the checkpoint's, or the saved stream position means nothing. Settings
that conflict are refused together, in one message, before anything is built or written
(:func:`resume_conflicts`). Optimizer and schedule settings may change on a resume; the module applies the new
values to the restored optimizer and prints them (:func:`optimizer_changes`,
``SH2LightningModule.on_train_start``). Everything else (activation checkpointing, compile, logging) is free.

The checkpoint is read memory-mapped, so its tensors are not loaded here (:func:`read_checkpoint_info`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sh2.checkpoints.files import CheckpointError, is_distributed_checkpoint, load_file
from sh2.models.config import SH2Config
from sh2.models.lora import LoRAConfig

OPTIMIZER_SETTINGS = ("lr", "min_lr_ratio", "warmup_steps", "decay_steps", "weight_decay", "betas", "eps",
                      "grad_clip")
"""Module settings a resume may change: applied to the restored optimizer and schedule, with a notice."""

# SH2Config fields that do not change the weights' meaning (a label, the nominal context, the init scale)
_NOT_ARCHITECTURE = ("name", "max_seq_len", "init_std")
# data settings that do not change the training stream: where the files are (the data module warns when it
# moved), how much is validated, and the worker count beyond its slots (compared below)
_FREE_DATA_SETTINGS = ("path", "name", "data_files", "val_batches", "num_workers")


@dataclass
class CheckpointInfo:
    """The settings and position saved with a Lightning checkpoint (file or sharded folder).

    Attributes:
        path: the checkpoint as given.
        hyper_parameters: the module's saved settings (empty when the checkpoint has none).
        data_hyper_parameters: the data module's saved settings (empty when none).
        global_step: optimizer steps done when it was saved (None when unknown).
        has_training_state: whether it holds optimizer and loop state (False for weights-only saves).
    """

    path: str
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    data_hyper_parameters: dict[str, Any] = field(default_factory=dict)
    global_step: int | None = None
    has_training_state: bool = True


def read_checkpoint_info(path: str, trust_pickle: bool = False) -> CheckpointInfo:
    """Read the settings saved with a ``--ckpt_path`` checkpoint without loading its tensors.

    Accepts a single-file Lightning checkpoint, a sharded ``torch.distributed.checkpoint`` folder (its
    ``meta.pt``) and a DeepSpeed checkpoint folder (nothing is read from it: DeepSpeed's files hold pickled
    objects; Lightning checks them when it loads them).

    Raises:
        CheckpointError: a missing, empty, truncated or corrupt checkpoint, or one that is not a Lightning
            checkpoint (e.g. exported weights), naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if p.is_dir():
        if is_distributed_checkpoint(p):
            meta = p / "meta.pt"
            return _info(path, load_file(meta, trust_pickle) if meta.is_file() else {})
        if (p / "latest").is_file() or any(p.glob("*/*model_states.pt")):
            return CheckpointInfo(path)
        raise CheckpointError(f"{path} is a folder but not a checkpoint written by sh2 fit (no sharded "
                              f"checkpoint's .metadata, no DeepSpeed 'latest' file)")
    ckpt = load_file(p, trust_pickle)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} is not a Lightning checkpoint written by sh2 fit (it has no 'state_dict' "
                              f"with the module's weights): weights in another format are read by "
                              f"--model.init_from {path} instead")
    return _info(path, ckpt)


def _info(path: str, ckpt: Mapping[str, Any]) -> CheckpointInfo:
    step = ckpt.get("global_step")
    return CheckpointInfo(path, dict(ckpt.get("hyper_parameters") or {}),
                          dict(ckpt.get("datamodule_hyper_parameters") or {}),
                          int(step) if isinstance(step, int) else None,
                          "optimizer_states" in ckpt or "loops" in ckpt or not ckpt)


def _same(a: Any, b: Any) -> bool:
    """Equality of saved and configured values across the forms YAML and checkpoints give them (lists and tuples,
    ints and floats, an unset mapping and an empty one)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not all(x is None or isinstance(x, Mapping) for x in (a, b)):
            return False
        a, b = dict(a or {}), dict(b or {})
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _architecture(settings: Mapping[str, Any], vocab_size: int) -> SH2Config:
    overrides = dict(settings.get("overrides") or {})
    return SH2Config.from_name(settings.get("preset", "tiny"), **{"vocab_size": vocab_size, **overrides})


def architecture_conflicts(saved: Mapping[str, Any], model: Mapping[str, Any], vocab_size: int) -> list[str]:
    """Lines naming how this run's model differs from the checkpoint's (empty when they are the same).

    Args:
        saved: the checkpoint's module settings (``preset``, ``overrides``, ``vocab_size``).
        model: this run's ``model.*`` settings.
        vocab_size: this run's vocabulary size (linked from the tokenizer).
    """
    if "preset" not in saved:
        return []  # not an sh2 module's checkpoint: Lightning compares the weights when it loads them
    try:
        before = _architecture(saved, int(saved.get("vocab_size", vocab_size)))
    except (KeyError, TypeError, ValueError):
        return []  # a preset or field this version does not know: the weights are compared on loading
    now = _architecture(model, vocab_size)
    fields = [(k, v, getattr(now, k)) for k, v in before.to_dict().items()
              if k not in _NOT_ARCHITECTURE and not _same(v, getattr(now, k))]
    if not fields:
        return []
    lines = [f"model.{key}: checkpoint {saved.get(key)!r}, this run {model.get(key)!r}"
             for key in ("preset", "overrides") if not _same(saved.get(key), model.get(key))]
    if not _same(saved.get("vocab_size", vocab_size), vocab_size):
        lines.append(f"model.vocab_size (from the tokenizer): checkpoint {saved['vocab_size']}, this run {vocab_size}")
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in fields[:6]) + (", ..." if len(fields) > 6 else "")
    lines.append(f"architecture: {shown}")
    return lines


def data_conflicts(saved: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """Lines naming the ``data.*`` settings that lay the training stream out differently from the checkpoint's.

    Args:
        saved: the checkpoint's data-module settings.
        data: this run's ``data.*`` settings.
    """
    lines = []
    for key, value in saved.items():
        if key in _FREE_DATA_SETTINGS or key not in data or _same(value, data[key]):
            continue
        lines.append(f"data.{key}: checkpoint {value!r}, this run {data[key]!r}")
    if "num_workers" in saved and "num_workers" in data and max(1, saved["num_workers"] or 0) != max(
            1, data["num_workers"] or 0):
        lines.append(f"data.num_workers: checkpoint {saved['num_workers']!r}, this run {data['num_workers']!r} "
                     f"(each worker reads its own part of the stream)")
    return lines


def _lora_layout(value: Any) -> dict[str, Any] | None:
    """The LoRA settings that shape the adapters' tensors and their effect (dropout and saving are free)."""
    try:
        config = LoRAConfig.coerce(value)
    except (TypeError, ValueError):
        return {"unreadable": value}
    if config is None:
        return None
    return {"rank": config.rank, "alpha": float(config.alpha),
            "targets": sorted(config.targets) if config.targets is not None else None}


def finetune_conflicts(saved: Mapping[str, Any], model: Mapping[str, Any], fitting: bool) -> list[str]:
    """Lines naming how this run's ``model.lora`` (and, for ``fit``, ``model.freeze``) differ from the checkpoint's.

    The adapters are tensors of the checkpoint (``...lora_A``/``...lora_B``), so a run that adds, drops or reshapes
    them cannot load it; the frozen set decides which parameters the saved optimizer state belongs to.
    """
    if "preset" not in saved:
        return []
    lines = []
    before, now = _lora_layout(saved.get("lora")), _lora_layout(model.get("lora"))
    if before != now:
        lines.append(f"model.lora: checkpoint {before!r}, this run {now!r}")
    freeze_before, freeze_now = saved.get("freeze"), model.get("freeze")
    if fitting and sorted(freeze_before or []) != sorted(freeze_now or []):
        lines.append(f"model.freeze: checkpoint {freeze_before!r}, this run {freeze_now!r}")
    return lines


def resume_conflicts(info: CheckpointInfo, model: Mapping[str, Any], data: Mapping[str, Any], vocab_size: int,
                     fitting: bool) -> list[str]:
    """Every setting of this run that conflicts with the checkpoint, one line each.

    For ``fit`` also the sequence length and the data layout (the saved stream position must mean the same
    tokens); ``validate``, ``test`` and ``predict`` only need the architecture.
    """
    lines = architecture_conflicts(info.hyper_parameters, model, vocab_size)
    lines += finetune_conflicts(info.hyper_parameters, model, fitting)
    if fitting:
        saved_len = info.hyper_parameters.get("seq_len")
        if saved_len is not None and "seq_len" in data and not _same(saved_len, data["seq_len"]) and \
                "seq_len" not in info.data_hyper_parameters:
            lines.append(f"data.seq_len: checkpoint {saved_len!r}, this run {data['seq_len']!r}")
        lines += data_conflicts(info.data_hyper_parameters, data)
    return lines


def optimizer_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, checkpoint value, this run's value)`` for every optimizer or schedule setting that changed."""
    return [(key, saved[key], now[key]) for key in OPTIMIZER_SETTINGS
            if key in saved and key in now and not _same(saved[key], now[key])]
