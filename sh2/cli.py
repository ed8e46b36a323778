"""The ``sh2`` command: a LightningCLI with fit, validate, test and predict.

Examples:
    sh2 fit --config configs/tiny.yaml
    sh2 fit --config configs/evo2_7b_8k.yaml --trainer.max_steps 1000
    sh2 fit --config configs/finetune.yaml --model.init_from runs/tiny/version_0/checkpoints/last.ckpt
    sh2 fit --config configs/tiny.yaml --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt   # resume
    sh2 fit --config configs/tiny.yaml --print_config
    sh2 predict --config configs/predict.yaml --model.init_from CKPT --prediction.path seqs.fasta
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import sh2.strategies  # noqa: F401  (registers the strategy names sh2_cp, sh2_deepspeed_stage_2, ...)
from sh2.data.datamodule import SH2DataModule
from sh2.inference.predict import PredictDataModule, PredictionWriter
from sh2.strategies.cp_ops import MOVED_STRATEGY_KEYS, moved_strategy_key_message
from sh2.training.callbacks import AtomicCheckpointIO, MemoryReport, ThroughputReport, ValidationReport
from sh2.training.module import SH2LightningModule

MOVED_MODULE_KEYS = {"log_every_n_steps": "model 'log_every_n_steps' moved: use throughput.log_every_n_steps "
                                          "(default: trainer.log_every_n_steps)"}
"""Arguments of the LightningModule that moved elsewhere: old name -> what to write instead."""


class SH2ArgumentParser(LightningArgumentParser):
    """The CLI's parser: a setting that moved gets a message naming its new key.

    jsonargparse names an unknown setting as ``Option 'NAME' is not accepted`` (inside a ``class_path`` such as
    the strategy's), ``Group 'model' does not accept option 'NAME'`` (a config file) or ``unrecognized
    arguments: --model.NAME`` (the command line); the new key is added to that error. Hyper-parameters of
    single-file checkpoints written before a setting moved, which Lightning parses for ``--ckpt_path``, are
    accepted: their moved module keys are dropped.
    """

    _UNKNOWN = re.compile(r"[Oo]ption '(\w+)'|--(?:model|trainer\.strategy\.init_args)\.(\w+)")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        for key in dict.fromkeys(k for pair in self._UNKNOWN.findall(message) for k in pair if k):
            if key in MOVED_STRATEGY_KEYS and "strategy" in message:
                message += "\n" + moved_strategy_key_message(key)
            elif key in MOVED_MODULE_KEYS and "model" in message:
                message += "\n" + MOVED_MODULE_KEYS[key]
        super().error(message, ex)

    def parse_object(self, obj: Any, namespace: Any = None, *args: Any, **kwargs: Any) -> Any:
        # the shape LightningCLI gives checkpoint hyper-parameters: {subcommand: {"model": hparams}}
        if isinstance(obj, dict) and len(obj) == 1:
            (section,) = obj.values()
            if isinstance(section, dict) and list(section) == ["model"] and isinstance(section["model"], dict):
                for key in MOVED_MODULE_KEYS:
                    section["model"].pop(key, None)
        return super().parse_object(obj, namespace, *args, **kwargs)


class SH2SaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's log directory.

    Without a logger (``trainer.logger: false``, as in ``configs/predict.yaml``) there is no run directory:
    Lightning's ``trainer.log_dir`` is then the working directory, and saving would overwrite any
    ``config.yaml`` there. Nothing is written in that case (``--print_config`` shows the resolved config).
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class SH2CLI(LightningCLI):
    """LightningCLI for sh2: links sequence length and vocabulary between data and model, adds the
    checkpoint, validation-report, throughput and memory-estimate callbacks, TensorBoard logging and atomic
    checkpoint writes; settings that moved are named in errors (:class:`SH2ArgumentParser`)."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = SH2ArgumentParser,
                 **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data", "model.vocab_size", compute_fn=lambda data: data.vocab_size,
                              apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1,
                             "checkpoint.monitor": "val/loss", "checkpoint.mode": "min",
                             "checkpoint.filename": "step{step:07d}-val{val/loss:.4f}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(ValidationReport, "report")
        parser.add_lightning_class_args(ThroughputReport, "throughput")
        parser.add_lightning_class_args(MemoryReport, "memory")
        # `sh2 predict` reads its sequences and options from this group (scoring, embeddings, generation).
        parser.add_class_arguments(PredictDataModule, "prediction", instantiate=True, sub_configs=True)

    def before_predict(self) -> None:
        """Predict on ``prediction.path`` and write the records to ``prediction.output``."""
        predict = self.config_init[self.subcommand]["prediction"]
        self.datamodule = predict
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter(predict.output))

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: other formats are left alone
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sh2`` console script and ``python -m sh2``."""
    SH2CLI(
        SH2LightningModule,
        SH2DataModule,
        seed_everything_default=1234,
        save_config_callback=SH2SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "sh2"}},
            "max_steps": 1000,
            "gradient_clip_val": None,
        },
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
