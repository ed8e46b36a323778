"""Parameter-efficient finetuning in training runs: LoRA and freezing applied to the model, adapter-only files.

``SH2LightningModule.configure_model`` calls :func:`apply_finetuning` after the pretrained weights are loaded and
before activation checkpointing, compilation and the strategy's parallelism (FSDP2 then shards adapters and
frozen weights with their block; only trainable parameters reach the optimizer, through
:func:`~sh2.models.params.parameter_groups`). With ``model.lora.save_adapters`` the module adds an
:class:`AdapterCheckpoint`, which writes ``adapters.safetensors`` beside every checkpoint the run saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sh2.models.freeze import freeze_parameters
from sh2.models.lora import LoRAConfig, adapter_parameters, apply_lora

ADAPTER_FILE = "adapters.safetensors"


@dataclass(frozen=True)
class FinetuneSummary:
    """What :func:`apply_finetuning` did: adapted layers, frozen groups, and the parameter counts."""

    adapted: tuple[str, ...]
    frozen_groups: tuple[str, ...]
    trainable: int
    total: int

    def describe(self, lora: LoRAConfig | None) -> str:
        """One line for the start of a run."""
        parts = []
        if lora is not None:
            kinds = sorted({p.rpartition(".")[2] for p in self.adapted})
            parts.append(f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {len(self.adapted)} linear layers "
                         f"({', '.join(kinds)})")
        if self.frozen_groups:
            parts.append(f"frozen: {', '.join(self.frozen_groups)}")
        share = 100.0 * self.trainable / max(1, self.total)
        return (f"[sh2] finetuning: {'; '.join(parts)}; trainable parameters {self.trainable:,} of "
                f"{self.total:,} ({share:.2f}%)")


def apply_finetuning(model: nn.Module, lora: LoRAConfig | None, freeze: Sequence[str] | None) -> FinetuneSummary:
    """Add LoRA adapters and freeze parameter groups of ``model``, in place.

    Args:
        model: the (loaded) :class:`~sh2.models.SH2Model`.
        lora: LoRA settings, or None for none.
        freeze: groups or name prefixes to freeze (:mod:`sh2.models.freeze`). None: ``[base]`` (every pretrained
            weight) with LoRA, nothing without. With LoRA, a list trains the adapters and everything it does not
            name (e.g. ``[embeddings, mixers, mlp]`` also trains the norms).

    Returns:
        The summary (:meth:`FinetuneSummary.describe` prints it).

    Raises:
        ValueError: a LoRA target matching no linear layer (``model.lora.targets``), an unknown freeze entry
            (``model.freeze``), or settings that leave no parameter to train.
    """
    adapted = tuple(apply_lora(model, lora)) if lora is not None else ()
    groups = tuple(freeze) if freeze is not None else (("base",) if lora is not None else ())
    if groups:
        freeze_parameters(model, groups)
    params = dict(model.named_parameters())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"model.freeze={list(groups)} freezes every parameter of the model"
                         f"{' and model.lora is not set' if lora is None else ''}: nothing would train. Freeze fewer "
                         f"groups, or set model.lora: {{rank: 8}} to train low-rank adapters.")
    return FinetuneSummary(adapted, groups, trainable, sum(p.numel() for p in params.values()))


def full_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapters as whole CPU tensors; FSDP2 shards are gathered (a collective: call on every rank)."""
    out = {}
    for name, p in adapter_parameters(model).items():
        t = p.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
    return out


class AdapterCheckpoint(L.Callback):
    """Writes the LoRA adapters alone as ``adapters.safetensors`` whenever the run saves a checkpoint.

    The file goes to the checkpoint folder (``trainer.checkpoint_callback.dirpath``; the run's root folder when
    checkpointing is off, at the end of training) and is replaced atomically, so it always holds the adapters of
    the newest checkpoint step. It loads with :func:`sh2.checkpoints.adapters.load_adapters` and merges into
    the base weights with ``python -m sh2.checkpoints.export BASE OUT --adapters FILE``. Under FSDP2 every rank
    gathers the adapter shards and global rank 0 writes.

    Args:
        lora: the run's LoRA settings (stored in the file).
        filename: the file's name.
    """

    def __init__(self, lora: LoRAConfig, filename: str = ADAPTER_FILE) -> None:
        self.lora = lora
        self.filename = filename
        self.last_path: Path | None = None
        self._written_step: int | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or trainer.default_root_dir
        self._write(trainer, pl_module, Path(folder))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.checkpoint_callback is None:
            self._write(trainer, pl_module, Path(trainer.default_root_dir))

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        from sh2.checkpoints.adapters import save_adapters

        if self._written_step == trainer.global_step:  # ModelCheckpoint saves top-k and last at the same step
            return
        tensors = full_adapters(pl_module.model)
        if trainer.is_global_zero:
            self.last_path = save_adapters(tensors, self.lora, pl_module.config, folder / self.filename,
                                           base=pl_module.hparams.get("init_from"), step=trainer.global_step)
        self._written_step = trainer.global_step
