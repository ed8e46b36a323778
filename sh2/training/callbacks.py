"""Callbacks and plugins of the training application."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, fsyncs it and renames it into place.

    An interrupted save therefore never leaves a file under the final name that looks complete, and the
    previous checkpoint of that name survives until the new one is whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class ValidationReport(L.Callback):
    """Prints the validation loss beside the unigram entropy of the validation bases after each validation.

    A model that has learned nothing beyond base frequencies sits at the unigram entropy; below it, the
    model uses context.
    """

    def __init__(self) -> None:
        self._entropy: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None:
            return
        dm = trainer.datamodule
        if self._entropy is None and dm is not None and hasattr(dm, "unigram_entropy"):
            self._entropy = float(dm.unigram_entropy())
        step = trainer.global_step
        if trainer.state.fn != "fit" and getattr(pl_module, "checkpoint_step", None) is not None:
            step = pl_module.checkpoint_step  # validate/test: the loops start at 0; the weights are from here
        msg = f"[sh2] step {step}: val/loss {float(loss):.4f} nats/token"
        if self._entropy is not None:
            verdict = "below" if float(loss) < self._entropy else "not below"
            msg += f", unigram entropy of validation bases {self._entropy:.4f} nats/token ({verdict})"
        print(msg, flush=True)
