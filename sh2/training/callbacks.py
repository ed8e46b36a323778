"""Callbacks and plugins of the training application: atomic checkpoint writes (and the removal of what a killed
save left) and the reports of a run (validation loss beside the unigram entropy, throughput and MFU, the memory
estimate)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from tqdm import tqdm

from sh2.data.datamodule import SH2DataModule
from sh2.strategies.contract import strategy_contract
from sh2.training.flops import measure_bf16_peak_flops, model_flops_per_token
from sh2.training.module import SH2LightningModule

# checkpoints (AtomicCheckpointIO) and adapter files (sh2.checkpoints.adapters) are staged under these names
_TEMPORARY = re.compile(r"^\.(?P<name>.+\.(ckpt|safetensors))\.tmp-(?P<pid>\d+)$")


def say(msg: str) -> None:
    """Print a report line to stdout on a line of its own: ``tqdm.write`` lifts the progress bars drawn on the
    terminal out of the way (a plain ``print`` lands in the middle of a bar's line) and draws them again."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def temporary_checkpoint_path(path: Path) -> Path:
    """The hidden file :class:`AtomicCheckpointIO` writes before renaming it to ``path``: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has not started saving: a file with its id was left by an earlier one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary checkpoint and adapter files that a killed save left in ``folder`` and return them.

    Only files named as :func:`temporary_checkpoint_path` names them whose process is gone are removed, so a
    save in progress in another live process on this machine is never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        found = _TEMPORARY.match(entry.name)
        if found and entry.is_file() and not _process_alive(int(found.group("pid"))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, fsyncs it and renames it into place.

    An interrupted save therefore never leaves a file under the final name that looks complete, and the
    previous checkpoint of that name survives until the new one is whole. A save killed outright (``kill -9``)
    leaves its temporary file behind; :func:`remove_stale_temporaries` deletes it when the next run starts.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        fs = get_filesystem(path)
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_checkpoint_path(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class LastCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` (the ``checkpoint.*`` settings) whose ``last.ckpt`` always holds the newest state.

    Lightning writes ``last.ckpt`` only at a step where it also writes a top-k checkpoint (or on a period), so a
    validation that does not improve the monitored loss, or the end of training, leaves ``last.ckpt`` at an
    older step and a resume repeats the steps since. With ``save_last`` this callback also writes it after every
    validation and when training ends, unless this step is already saved.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        # skips sanity checks, other commands than fit, and a step that was saved already
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
        if self._entropy is None and isinstance(dm, SH2DataModule):
            self._entropy = float(dm.unigram_entropy())
        step = trainer.global_step
        if (trainer.state.fn != "fit" and isinstance(pl_module, SH2LightningModule)
                and pl_module.checkpoint_step is not None):
            step = pl_module.checkpoint_step  # validate/test: the loops start at 0; the weights are from here
        msg = f"[sh2] step {step}: val/loss {float(loss):.4f} nats/token"
        if self._entropy is not None:
            verdict = "below" if float(loss) < self._entropy else "not below"
            msg += f", unigram entropy of validation bases {self._entropy:.4f} nats/token ({verdict})"
        say(msg)


class ThroughputReport(L.Callback):
    """Logs training throughput every ``log_every_n_steps`` optimizer steps and prints a summary at the end.

    TensorBoard tags: ``perf/tokens_per_s`` (tokens of all ranks together), ``perf/mfu`` (model FLOPs
    utilisation: the analytic FLOPs of :func:`sh2.training.flops.model_flops_per_token` over the bf16 peak
    measured on the GPU; GPUs only) and ``perf/peak_mem_gib`` (GPUs only). The rates are those of the last
    interval, computed by Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput` over a window
    of two samples. Lightning's ``ThroughputMonitor`` callback is not used as such: it synchronises the GPU
    after every batch, reads FLOPs from a ``flops_per_batch`` attribute of the module, takes the peak from a
    table of known GPUs and logs under its own names; here the GPU is synchronised only when a sample is taken.

    Args:
        log_every_n_steps: optimizer steps between samples (micro-batches of one step count once); default:
            the trainer's ``log_every_n_steps``, so that every sample reaches the logger.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"throughput.log_every_n_steps must be >= 1 or null, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.samples: list[tuple[float, float | None]] = []  # (tokens/s, MFU) per interval
        self._throughput: Throughput | None = None
        self._peak_flops: float | None = None
        self._flops_per_token: float | None = None
        self._ranks = 1
        self._t0 = 0.0
        self._batches = self._tokens = 0  # this rank's totals at the last sample
        self._batches_since = self._tokens_since = 0
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        contract = strategy_contract(trainer.strategy)
        # ranks that process distinct tokens: a context-parallel rank holds 1/cp of each sequence
        self._ranks = contract.data_parallel_size * contract.context_parallel_size
        if isinstance(pl_module, SH2LightningModule):
            self._flops_per_token = model_flops_per_token(pl_module.config, pl_module.hparams.seq_len)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens_since += batch["input_ids"].numel()
        self._batches_since += 1
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step % max(1, every) or step == self._last_step:
            return  # (with gradient accumulation several micro-batches end on the same optimizer step)
        self._last_step = step
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if self._throughput is None:  # the first sample starts the clock
            self._peak_flops = measure_bf16_peak_flops(device) or None
            self._throughput = Throughput(available_flops=self._peak_flops, world_size=self._ranks, window_size=2)
            self._t0 = now
            self._throughput.update(time=0.0, batches=0, samples=0, flops=0 if self._flops_per_token else None)
        elif self._tokens_since:
            self._batches += self._batches_since
            self._tokens += self._tokens_since
            flops = self._flops_per_token * self._tokens_since if self._flops_per_token else None
            self._throughput.update(time=now - self._t0, batches=self._batches, samples=self._tokens, flops=flops)
            metrics = self._throughput.compute()
            tokens_per_s = metrics["device/samples_per_sec"] * self._ranks
            mfu = metrics.get("device/mfu")
            pl_module.log("perf/tokens_per_s", tokens_per_s, on_step=True, on_epoch=False)
            if mfu is not None:
                pl_module.log("perf/mfu", mfu, on_step=True, on_epoch=False)
            if device.type == "cuda":
                pl_module.log("perf/peak_mem_gib", torch.cuda.max_memory_allocated(device) / 2**30, on_step=True,
                              on_epoch=False)
            self.samples.append((tokens_per_s, mfu))
        self._batches_since = self._tokens_since = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print a throughput summary (median over the logging intervals after the first)."""
        if not self.samples or not trainer.is_global_zero:
            return
        perf = self.samples[1:] or self.samples
        tps = sorted(p[0] for p in perf)[len(perf) // 2]
        mfus = sorted(p[1] for p in perf if p[1] is not None)
        msg = f"[sh2] throughput: {tps:,.0f} tokens/s over {trainer.world_size} device(s)"
        if mfus and self._peak_flops:
            msg += (f", MFU {mfus[len(mfus) // 2]:.1%} (analytic FLOPs vs measured bf16 peak "
                    f"{self._peak_flops / 1e12:.0f} TFLOP/s per device)")
        if pl_module.device.type == "cuda":
            msg += f", peak memory {torch.cuda.max_memory_allocated(pl_module.device) / 2**30:.1f} GiB"
        say(msg)


class MemoryReport(L.Callback):
    """At the start of ``fit`` on GPUs: prints the per-GPU memory estimate of :mod:`sh2.training.memory` for
    this run, or warns, naming a setting that would fit, when it predicts running out of memory.

    The estimate is a diagnostic: when it cannot be made, a line says why and training goes on.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cuda" or not trainer.is_global_zero or not isinstance(pl_module,
                                                                                            SH2LightningModule):
            return
        gpu_gib = torch.cuda.get_device_properties(pl_module.device).total_memory / 2**30
        dm = trainer.datamodule
        batch = dm.layout.micro_batch_size if isinstance(dm, SH2DataModule) else 1
        try:
            msg, over = self.report(pl_module, trainer.strategy, gpu_gib, batch)
        except Exception as err:  # a diagnostic: never the reason a run stops
            say(f"[sh2] memory estimate unavailable ({type(err).__name__}: {err})")
            return
        if over:
            rank_zero_warn(msg)
        else:
            say(msg)

    @staticmethod
    def report(module: SH2LightningModule, strategy: Any, gpu_gib: float, micro_batch_size: int = 1
               ) -> tuple[str, bool]:
        """The estimate of :func:`sh2.training.memory.memory_report` for ``module`` trained under ``strategy``.

        Args:
            module: the module (its model config, sequence length, activation checkpointing, LoRA and frozen
                groups).
            strategy: the trainer's strategy (its CP and data-parallel sizes, sharding and compute precision).
            gpu_gib: memory of one GPU.
            micro_batch_size: sequences per batch and data-parallel rank.

        Returns:
            ``(message, over)``: the line to print, and whether it predicts running out of memory.
        """
        from sh2.training.memory import memory_report

        contract = strategy_contract(strategy)
        return memory_report(module.config, module.hparams.seq_len, gpu_gib, cp=contract.context_parallel_size,
                             dp=contract.data_parallel_size, batch=micro_batch_size,
                             activation_checkpointing=module.hparams.activation_checkpointing,
                             sharded=contract.shards_parameters, mixed_precision=contract.mixed_precision,
                             lora=module.lora, freeze=module.hparams.get("freeze"))
