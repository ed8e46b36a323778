"""SH2LightningModule: the model, the weighted next-token loss, AdamW + warmup/cosine, logging."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import MeanMetric

from sh2.models import SH2Config, SH2Model, parameter_groups
from sh2.training.flops import measure_bf16_peak_flops, model_flops_per_token


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` (constant after)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SH2LightningModule(L.LightningModule):
    """Trains an :class:`~sh2.models.SH2Model` with weighted next-token cross-entropy.

    Args:
        preset: an :meth:`SH2Config.from_name` preset (``tiny``, ``evo2_7b_8k``, ``..._transformer`` ...).
        overrides: SH2Config fields to change from the preset (e.g. ``{num_layers: 4}``).
        seq_len: training sequence length (linked from ``data.seq_len`` by the CLI).
        vocab_size: vocabulary size (linked from the data's tokenizer by the CLI).
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine decay target).
        warmup_steps: linear warmup steps.
        decay_steps: steps of the cosine decay (default: ``trainer.max_steps``).
        weight_decay: AdamW weight decay on matrices (not on norms, biases, filters, featurizer, Dskip,
            embeddings).
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: gradient-norm clipping threshold (0 disables); the norm is logged as ``train/grad_norm``.
        activation_checkpointing: recompute every block in the backward pass.
        init_from: weights to start from (sh2 checkpoint file or folder, including FSDP2 and DeepSpeed run
            folders; Vortex or Savanna Evo 2 file): weights only, no optimizer state; use ``--ckpt_path`` to
            resume a run instead.
        init_from_trust_pickle: allow ``init_from`` files that hold pickled Python objects (DeepSpeed
            optimizer files, some Savanna files). Only for files from a trusted source.
        log_every_n_steps: how often throughput and MFU are logged.
    """

    def __init__(self, preset: str = "tiny", overrides: dict[str, Any] | None = None, seq_len: int = 1024,
                 vocab_size: int = 512, lr: float = 3e-4, min_lr_ratio: float = 0.1, warmup_steps: int = 100,
                 decay_steps: int | None = None, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, grad_clip: float = 1.0,
                 activation_checkpointing: bool = False, init_from: str | None = None,
                 init_from_trust_pickle: bool = False, log_every_n_steps: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = SH2Config.from_name(preset, **{"vocab_size": vocab_size, **(overrides or {})})
        if seq_len < 1:
            raise ValueError(f"model.seq_len must be >= 1, got {seq_len}")
        if lr <= 0 or not 0 <= min_lr_ratio <= 1 or warmup_steps < 0:
            raise ValueError("model.lr must be > 0, model.min_lr_ratio in [0, 1], model.warmup_steps >= 0")
        self.model: SH2Model | None = None
        self.val_loss = MeanMetric()
        self._flops_per_token = model_flops_per_token(self.config, seq_len)
        self._peak_flops: float | None = None
        self._t_last: float | None = None
        self._tokens_since = 0
        self._perf: list[tuple[float, float | None]] = []  # (tokens/s, MFU) per logging interval
        self._perf_step = -1
        self.checkpoint_step: int | None = None  # set when weights come from a Lightning checkpoint

    # ----------------------------------------------------------------- model construction
    def configure_model(self) -> None:
        """Build the model once (idempotent); sharded strategies then parallelize it from outside."""
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        meta = bool(getattr(strategy, "supports_meta_init", False)) and self.hparams.init_from is None
        with torch.device("meta") if meta else nullcontext():
            self.model = SH2Model(self.config)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        # DeepSpeed ZeRO-3 builds the model partitioned (zero.Init): parameters are empty placeholders until
        # gathered, so the model's own initialisation and init_from must run on gathered parameters.
        gather = strategy.gathered_parameters if getattr(strategy, "builds_partitioned_model", False) else None
        if gather is not None and not self.hparams.init_from:
            for unit in self.model.init_units():
                with gather(unit):
                    self.model.init_weights([unit])
        if self.hparams.init_from:
            self._load_init_from(strategy, gather)
        if strategy is not None and hasattr(strategy, "parallelize_model"):
            strategy.parallelize_model(self.model)

    def _load_init_from(self, strategy: Any, gather: Any) -> None:
        """Copy ``init_from`` into the model; errors name the setting and the fix.

        With ZeRO-3 (``gather``) only global rank 0 reads and converts the checkpoint; every rank enters each
        unit's gather and rank 0's values are kept, so the other ranks neither read nor hold the weights.
        """
        from sh2.checkpoints import CheckpointError, load_into, load_pretrained

        path, trust = self.hparams.init_from, self.hparams.init_from_trust_pickle
        try:
            if gather is None:
                load_into(self.model, path, trust_pickle=trust)
            else:
                state, err = None, None
                if strategy.is_global_zero:
                    try:
                        _, state = load_pretrained(path, self.config, trust_pickle=trust, lazy=True)
                    except CheckpointError as error:
                        err = str(error)
                err = strategy.broadcast(err)  # every rank stops, or none does
                if err is not None:
                    raise CheckpointError(err)
                load_into(self.model, state, gather=gather)
        except CheckpointError as err:
            msg = str(err)
            if "trust_pickle" in msg:
                fix = "set model.init_from_trust_pickle: true if you trust the file"
            elif "pip install" in msg:
                fix = "install the package named above"
            elif any(k in msg for k in ("missing key", "shape mismatch", "unexpected key")):
                fix = ("point model.init_from at a checkpoint whose architecture matches model.preset / "
                       "model.overrides (or change those to the checkpoint's architecture)")
            else:
                fix = ("point model.init_from at an existing, complete checkpoint (an sh2 .ckpt file or folder, a "
                       "Vortex .pt or a Savanna folder)")
            raise CheckpointError(f"model.init_from={path!r}: {msg}\nFix: {fix}") from None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, position_ids)

    # ----------------------------------------------------------------- loss
    def _loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"], batch.get("position_ids"))
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        w = batch["loss_weights"].flatten().to(ce.dtype)
        return ce, (ce * w).sum(), w.sum()

    def _reduce(self, loss_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None and hasattr(strategy, "reduce_loss"):
            return strategy.reduce_loss(loss_sum, weight_sum)
        return loss_sum / weight_sum.clamp_min(1.0)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss_sum, weight_sum = self._loss_terms(batch)
        loss = self._reduce(loss_sum, weight_sum)
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping "
                               f"before the weights are corrupted. Lower model.lr, check the data, or resume "
                               f"from the last checkpoint.")
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self._tokens_since += batch["input_ids"].numel()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ce, _, _ = self._loss_terms(batch)
        w = batch["loss_weights"].flatten().to(ce.dtype)
        # every rank updates on every batch (zero weights add nothing), so all ranks reach the metric sync in
        # on_*_epoch_end together even when one rank's shard holds no weighted token
        self.val_loss.update(ce, w)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Scores, embeddings or generations for a batch of ``sh2.inference.predict.PredictDataModule``."""
        from sh2.inference.predict import predict_batch

        return predict_batch(self.model, batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """``sh2 test``: the validation computation on the datamodule's test batches, logged as ``test/*``."""
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def _log_eval_metrics(self, prefix: str) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/perplexity": torch.exp(loss),
                       f"{prefix}/bits_per_token": loss / math.log(2)}, sync_dist=False, prog_bar=False)
        if prefix == "val":
            self._last_val_loss = float(loss)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the step the weights were saved at (``sh2 validate --ckpt_path`` reports it)."""
        step = checkpoint.get("global_step")
        self.checkpoint_step = int(step) if isinstance(step, int) else None

    # ----------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        groups = parameter_groups(self.model, hp.weight_decay)
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused or None)
        total = hp.decay_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else 10_000)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params or "deepspeed" in type(self.trainer.strategy).__name__.lower():
            return  # DeepSpeed clips inside its engine (gradient_clipping in its config)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_fit_start(self) -> None:
        """On GPUs, print the memory estimate for this run and warn when it predicts running out of memory."""
        if self.device.type != "cuda" or not self.trainer.is_global_zero:
            return
        gpu_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        try:
            msg, over = self.memory_report(self.trainer.strategy, gpu_gib)
        except Exception as err:  # a diagnostic: never the reason a run stops
            print(f"[sh2] memory estimate unavailable ({type(err).__name__}: {err})", flush=True)
            return
        if over:
            rank_zero_warn(msg)
        else:
            print(msg, flush=True)

    def memory_report(self, strategy: Any, gpu_gib: float) -> tuple[str, bool]:
        """The estimate of :func:`sh2.training.memory.memory_report` for this module under ``strategy``."""
        from sh2.training.memory import memory_report

        trainer = self._trainer
        deepspeed = "deepspeed" in type(strategy).__name__.lower()
        if deepspeed:
            bf16 = "bf16" in str(getattr(trainer, "precision", ""))
            mixed = "bf16" if bf16 else None
        else:
            mixed = getattr(strategy, "mixed_precision", None)
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", 1)
        return memory_report(self.config, self.hparams.seq_len, gpu_gib,
                             cp=getattr(strategy, "context_parallel_size", 1),
                             dp=getattr(strategy, "data_parallel_size", getattr(trainer, "world_size", 1)),
                             batch=batch if isinstance(batch, int) and batch > 0 else 1,
                             activation_checkpointing=self.hparams.activation_checkpointing,
                             sharded=hasattr(strategy, "parallelize_model"), mixed_precision=mixed)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        if step % max(1, self.hparams.log_every_n_steps) != 0 or step == self._perf_step:
            return  # (with gradient accumulation several micro-batches end on the same optimizer step)
        self._perf_step = step
        now = time.perf_counter()
        if self._t_last is not None and self._tokens_since:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                now = time.perf_counter()
            dp = getattr(self.trainer.strategy, "data_parallel_size", self.trainer.world_size)
            cp = getattr(self.trainer.strategy, "context_parallel_size", 1)
            tokens_per_s = self._tokens_since * dp * cp / (now - self._t_last)
            self.log("perf/tokens_per_s", tokens_per_s, on_step=True, on_epoch=False)
            if self._peak_flops is None:
                self._peak_flops = measure_bf16_peak_flops(self.device) or 0.0
            mfu = None
            if self._peak_flops:
                mfu = tokens_per_s * self._flops_per_token / (self._peak_flops * self.trainer.world_size)
                self.log("perf/mfu", mfu, on_step=True, on_epoch=False)
            self._perf.append((tokens_per_s, mfu))
            if self.device.type == "cuda":
                self.log("perf/peak_mem_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, on_step=True,
                         on_epoch=False)
        self._t_last, self._tokens_since = now, 0

    def on_train_end(self) -> None:
        """Print a throughput summary (median over the logging intervals after the first)."""
        if not self._perf or not self.trainer.is_global_zero:
            return
        perf = self._perf[1:] or self._perf
        tps = sorted(p[0] for p in perf)[len(perf) // 2]
        mfus = sorted(p[1] for p in perf if p[1] is not None)
        msg = f"[sh2] throughput: {tps:,.0f} tokens/s over {self.trainer.world_size} device(s)"
        if mfus:
            msg += (f", MFU {mfus[len(mfus) // 2]:.1%} (analytic FLOPs vs measured bf16 peak "
                    f"{self._peak_flops / 1e12:.0f} TFLOP/s per device)")
        if self.device.type == "cuda":
            msg += f", peak memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        print(msg, flush=True)
