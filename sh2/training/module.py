"""SH2LightningModule: the model, the weighted next-token loss, AdamW + warmup/cosine, loss logging.

Throughput, MFU and the memory estimate are reported by callbacks (:mod:`sh2.training.callbacks`); the
strategy is used only through :class:`~sh2.strategies.contract.StrategyContract`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchmetrics import MeanMetric

from sh2.checkpoints import CheckpointError, CheckpointHint
from sh2.models import SH2Config, SH2Model, parameter_groups
from sh2.models.lora import LoRAConfig
from sh2.strategies.contract import StrategyContract, strategy_contract
from sh2.strategies.parallelize import apply_activation_checkpointing, apply_compile
from sh2.training.finetune import AdapterCheckpoint, apply_finetuning

# How to fix an init_from error, by the hint its raise site attached (in this order when there are several).
_INIT_FROM_FIXES = {
    CheckpointHint.TRUST_PICKLE: "set model.init_from_trust_pickle: true if you trust the file",
    CheckpointHint.INSTALL_PACKAGE: "install the package named above",
    CheckpointHint.MATCH_ARCHITECTURE: ("point model.init_from at a checkpoint whose architecture matches "
                                        "model.preset / model.overrides (or change those to the checkpoint's "
                                        "architecture)"),
}
_INIT_FROM_DEFAULT_FIX = ("point model.init_from at an existing, complete checkpoint (an sh2 .ckpt file or folder, "
                          "a Vortex .pt or a Savanna folder)")


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
        activation_checkpointing: recompute every block in the backward pass (less activation memory, about
            a third more compute).
        compile: compile every block with ``torch.compile`` (inductor) before the strategy parallelizes the
            model; the first steps are slower while the blocks compile.
        init_from: weights to start from (sh2 checkpoint file or folder, including FSDP2 and DeepSpeed run
            folders; Vortex or Savanna Evo 2 file): weights only, no optimizer state; use ``--ckpt_path`` to
            resume a run instead.
        init_from_trust_pickle: allow ``init_from`` files that hold pickled Python objects (DeepSpeed
            optimizer files, some Savanna files). Only for files from a trusted source.
        allow_random_init: whether the ``sh2`` command may start from random weights when neither ``init_from``
            nor ``--ckpt_path`` gives any: ``null`` (default) allows it for ``fit`` (pretraining) and refuses it
            for ``validate``, ``test`` and ``predict``; ``false`` refuses it everywhere (the finetune configs);
            ``true`` allows it everywhere (tests, smoke runs). The module itself always builds random weights
            first.
        lora: LoRA adapters on the linear layers (``{rank, alpha, dropout, targets, save_adapters}``, see
            :class:`~sh2.models.lora.LoRAConfig`), added after ``init_from`` is loaded; the base weights are
            then frozen unless ``freeze`` says otherwise. None: no adapters.
        freeze: parameter groups (``embeddings``, ``norms``, ``attention``, ``hyena_projections``,
            ``featurizer``, ``hyena_filters``, ``mlp``; shorthands ``hyena``, ``mixers``, ``base``) or
            parameter-name prefixes (``blocks.0``) to keep fixed (:mod:`sh2.models.freeze`).
    """

    def __init__(self, preset: str = "tiny", overrides: dict[str, Any] | None = None, seq_len: int = 1024,
                 vocab_size: int = 512, lr: float = 3e-4, min_lr_ratio: float = 0.1, warmup_steps: int = 100,
                 decay_steps: int | None = None, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, grad_clip: float = 1.0,
                 activation_checkpointing: bool = False, compile: bool = False, init_from: str | None = None,
                 init_from_trust_pickle: bool = False, allow_random_init: bool | None = None,
                 lora: LoRAConfig | None = None, freeze: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lora = self._finetune_settings(lora, freeze)
        self.config = SH2Config.from_name(preset, **{"vocab_size": vocab_size, **(overrides or {})})
        if seq_len < 1:
            raise ValueError(f"model.seq_len must be >= 1, got {seq_len}")
        problems = [f"model.lr must be > 0, got {lr}"] if lr <= 0 else []
        if not 0 <= min_lr_ratio <= 1:
            problems.append(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            problems.append(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        if problems:
            raise ValueError("; ".join(problems))
        self.model: SH2Model | None = None
        self.val_loss = MeanMetric()
        self.checkpoint_step: int | None = None  # set when weights come from a Lightning checkpoint
        self._resume_changes: list[tuple[str, Any, Any]] = []  # optimizer settings that differ from the checkpoint

    # ----------------------------------------------------------------- model construction
    def configure_model(self) -> None:
        """Build the model once (idempotent), then change it from outside in a fixed order: activation
        checkpointing, compilation, and the strategy's parallelism (CP operators, FSDP2)."""
        if self.model is not None:
            return
        lightning_strategy = self._trainer.strategy if self._trainer is not None else None
        strategy = strategy_contract(lightning_strategy)
        meta = strategy.meta_init and self.hparams.init_from is None
        with torch.device("meta") if meta else nullcontext():
            self.model = SH2Model(self.config)
        # DeepSpeed ZeRO-3 builds the model partitioned (zero.Init): parameters are empty placeholders until
        # gathered, so the model's own initialisation and init_from must run on gathered parameters.
        partitioned = strategy.builds_partitioned_model
        if partitioned and not self.hparams.init_from:
            for unit in self.model.init_units():
                with strategy.gathered_parameters(unit):
                    self.model.init_weights([unit])
        if self.hparams.init_from:
            self._load_init_from(strategy, lightning_strategy if partitioned else None)
        if self.lora is not None or self.hparams.freeze is not None:
            self._apply_finetuning(strategy)
        if self.hparams.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if self.hparams.compile:
            apply_compile(self.model)
        strategy.parallelize_model(self.model)

    def _load_init_from(self, strategy: StrategyContract, partitioned_on: Any) -> None:
        """Copy ``init_from`` into the model; errors name the setting and the fix.

        With a partitioned model (ZeRO-3; ``partitioned_on`` is then the Lightning strategy, whose rank and
        broadcast are used) only global rank 0 reads and converts the checkpoint; every rank enters each
        unit's gather and rank 0's values are kept, so the other ranks neither read nor hold the weights.
        """
        from sh2.checkpoints import load_into, load_pretrained

        path, trust = self.hparams.init_from, self.hparams.init_from_trust_pickle
        try:
            if partitioned_on is None:
                load_into(self.model, path, trust_pickle=trust)
            else:
                state, err = None, None
                if partitioned_on.is_global_zero:
                    try:
                        _, state = load_pretrained(path, self.config, trust_pickle=trust, lazy=True)
                    except CheckpointError as error:
                        err = (str(error), error.hints)
                err = partitioned_on.broadcast(err)  # every rank stops, or none does
                if err is not None:
                    raise CheckpointError(*err)
                load_into(self.model, state, gather=strategy.gathered_parameters)
        except CheckpointError as err:
            fix = "; or ".join(text for hint, text in _INIT_FROM_FIXES.items() if hint in err.hints)
            raise CheckpointError(f"model.init_from={path!r}: {err}\nFix: {fix or _INIT_FROM_DEFAULT_FIX}",
                                  err.hints) from None

    # ----------------------------------------------------------------- finetuning (sh2/training/finetune.py)
    def _finetune_settings(self, lora: LoRAConfig | dict[str, Any] | None, freeze: list[str] | None
                           ) -> LoRAConfig | None:
        """Validate ``lora`` and ``freeze``; the hyper-parameters keep ``lora`` as plain values, so a checkpoint
        loads without unpickling sh2 classes."""
        if freeze is not None and (isinstance(freeze, str) or not all(isinstance(g, str) for g in freeze)):
            raise ValueError(f"model.freeze must be a list of parameter groups or name prefixes, got {freeze!r}")
        config = LoRAConfig.coerce(lora)
        self.hparams["lora"] = config.to_dict() if config is not None else None
        return config

    def _apply_finetuning(self, strategy: StrategyContract) -> None:
        if strategy.builds_partitioned_model:
            raise ValueError("model.lora and model.freeze are not supported with DeepSpeed ZeRO-3 (its partitioned "
                             "parameters cannot be wrapped or frozen after the build); use the sh2_cp strategy "
                             "(FSDP2) or sh2_deepspeed_stage_2")
        summary = apply_finetuning(self.model, self.lora, self.hparams.freeze)
        rank_zero_info(summary.describe(self.lora))

    def configure_callbacks(self) -> list[L.Callback]:
        """With ``lora.save_adapters``: an :class:`~sh2.training.finetune.AdapterCheckpoint`."""
        return [AdapterCheckpoint(self.lora)] if self.lora is not None and self.lora.save_adapters else []

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, position_ids)

    # ----------------------------------------------------------------- loss
    def _loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"], batch.get("position_ids"))
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        w = batch["loss_weights"].flatten().to(ce.dtype)
        return ce, (ce * w).sum(), w.sum()

    def _reduce(self, loss_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        strategy = strategy_contract(self._trainer.strategy if self._trainer is not None else None)
        return strategy.reduce_loss(loss_sum, weight_sum)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss_sum, weight_sum = self._loss_terms(batch)
        loss = self._reduce(loss_sum, weight_sum)
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping "
                               f"before the weights are corrupted. Lower model.lr, check the data, or resume "
                               f"from the last checkpoint.")
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
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
        metrics = {f"{prefix}/loss": loss, f"{prefix}/perplexity": torch.exp(loss),
                   f"{prefix}/bits_per_token": loss / math.log(2)}
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == "fit"
        # While fitting, Lightning would log these at the index of the last training log (global_step - 1); they
        # go to the loggers at global_step instead, the step of the weights evaluated, which the console line
        # and the checkpoint names also use. Logged here too for the callbacks (checkpoint monitor, report).
        self.log_dict(metrics, sync_dist=False, prog_bar=False, logger=not fitting)
        if fitting and not trainer.sanity_checking:
            values = {k: float(v) for k, v in metrics.items()}
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the step the weights were saved at (``sh2 validate --ckpt_path`` reports it) and which
        optimizer and schedule settings of this run differ from the checkpoint's (applied in
        :meth:`on_train_start`)."""
        from sh2.training.resume import optimizer_changes

        step = checkpoint.get("global_step")
        self.checkpoint_step = int(step) if isinstance(step, int) else None
        self._resume_changes = optimizer_changes(checkpoint.get("hyper_parameters") or {}, self.hparams)

    def on_train_start(self) -> None:
        """On a resume with changed optimizer or schedule settings: apply them to the restored state, and say so."""
        if self._resume_changes:
            self._apply_resume_changes()

    def _apply_resume_changes(self) -> None:
        """Write this run's lr, schedule, weight decay, betas and eps into the restored optimizer and scheduler.

        The restored state keeps the checkpoint's values (its base learning rates, its param-group settings);
        the schedule's shape (warmup, decay, floor) is a function of this run's settings already, since
        ``LambdaLR`` does not save its functions. The moments and the step count are kept.
        """
        hp, changes = self.hparams, self._resume_changes
        self._resume_changes = []
        optimizer = self.trainer.optimizers[0]
        fresh = parameter_groups(self.model, hp.weight_decay)
        for i, group in enumerate(optimizer.param_groups):
            group["betas"], group["eps"] = tuple(hp.betas), hp.eps
            if len(fresh) == len(optimizer.param_groups):
                group["weight_decay"] = fresh[i]["weight_decay"]
        for config in self.trainer.lr_scheduler_configs[:1]:
            scheduler = config.scheduler
            scheduler.base_lrs = [hp.lr] * len(optimizer.param_groups)
            for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
                group["initial_lr"] = hp.lr
                group["lr"] = hp.lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if self.trainer.is_global_zero:
            told = ", ".join(f"model.{key} {old!r} -> {new!r}" for key, old, new in changes)
            print(f"[sh2] resuming at step {self.global_step} with changed settings, applied to the restored optimizer "
                  f"and schedule: {told}", flush=True)

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
        """Clip the gradient norm to ``grad_clip`` and log it as ``train/grad_norm``; under DeepSpeed the engine
        clips and nothing is logged here. (The ``sh2`` command passes ``grad_clip`` as the trainer's
        ``gradient_clip_val``, which DeepSpeed reads, and refuses a ``trainer.gradient_clip_val`` of its own.)"""
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return
        norm = strategy_contract(self.trainer.strategy).clip_gradients(
            params, clip if clip and clip > 0 else float("inf"))
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
