"""The ``sh2`` command: a LightningCLI with fit, validate, test and predict.

Examples:
    sh2 fit --config configs/tiny.yaml
    sh2 fit --config configs/evo2_7b_8k.yaml --trainer.max_steps 1000
    sh2 fit --config configs/finetune.yaml --model.init_from runs/tiny/version_0/checkpoints/last.ckpt
    sh2 fit --config configs/tiny.yaml --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt   # resume
    sh2 fit --config configs/tiny.yaml --print_config
    sh2 predict --config configs/predict.yaml --model.init_from CKPT --prediction.path seqs.fasta

What the command promises (tests/training/test_cli.py holds it to it):

- A user error (config, data, checkpoint, prediction input) ends with one short message naming what is wrong,
  the setting or file, and the fix, and a non-zero exit; the traceback only with ``--debug`` or ``SH2_DEBUG=1``.
- A failed command changes nothing that existed: the run's ``config.yaml`` is written once training starts (after
  every resume check), prediction outputs appear by a rename at the end, a run folder that a failure left
  without a training step is removed, and temporary files of killed checkpoint saves are cleaned up.
- No silent random weights: ``validate``, ``test``, ``predict`` and the finetune configs need weights
  (``--ckpt_path`` or ``model.init_from``) unless ``model.allow_random_init: true``.
- A resume (``--ckpt_path``) refuses settings that conflict with the checkpoint (architecture, data layout), and
  applies changed optimizer and schedule settings with a notice (:mod:`sh2.training.resume`).
- One name per setting: ``model.grad_clip`` clips (``trainer.gradient_clip_val`` is refused), the trainer's
  ``log_every_n_steps`` paces throughput sampling, ``seed_everything`` seeds generation.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import sh2
import sh2.strategies  # noqa: F401  (registers the strategy names sh2_cp, sh2_deepspeed_stage_2, ...)
from sh2.checkpoints.files import CheckpointError, CheckpointHint
from sh2.cli_help import plain_text, short_help
from sh2.data.datamodule import SH2DataModule
from sh2.data.tokenizer import VOCAB_SIZE
from sh2.inference.predict import PredictDataModule, PredictionWriter
from sh2.strategies.cp_ops import MOVED_STRATEGY_KEYS, moved_strategy_key_message
from sh2.training.callbacks import (
    AtomicCheckpointIO,
    LastCheckpoint,
    MemoryReport,
    ThroughputReport,
    ValidationReport,
    remove_stale_temporaries,
)
from sh2.training.module import SH2LightningModule
from sh2.training.resume import CheckpointInfo, read_checkpoint_info, resume_conflicts

REMOVED_SETTINGS = {
    "model.log_every_n_steps": "model 'log_every_n_steps' moved: use trainer.log_every_n_steps (it also paces the "
                               "throughput samples)",
    "throughput.log_every_n_steps": "throughput.log_every_n_steps is not a setting: throughput is sampled every "
                                    "trainer.log_every_n_steps steps; set that",
    "prediction.seed": "prediction.seed is not a setting: sampling is seeded by seed_everything "
                       "(--seed_everything N)",
}
"""Settings that are not accepted, by their full name, and what to write instead (added to the parser's error)."""

SUBCOMMANDS = {
    "fit": "Train a model: a new one, one started from weights (model.init_from), or a resumed run (--ckpt_path).",
    "validate": "Evaluate a checkpoint on the held-out validation documents (nothing is written).",
    "test": "Evaluate a checkpoint on the held-out documents, reported as test/*.",
    "predict": "Score, embed or generate sequences, or score variants, with trained weights.",
}
_DEBUG_HINT = "add --debug (or set SH2_DEBUG=1) to see the traceback"
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # Lightning resolves these names itself


def debug_enabled() -> bool:
    """Whether errors show their traceback: ``SH2_DEBUG`` set to anything but ``0`` (``--debug`` sets it)."""
    return os.environ.get("SH2_DEBUG", "0") not in ("", "0")


class _HelpAll(argparse.Action):
    """``--help-all``: the full help, every setting of every section (Lightning's Trainer included)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parser.full_help = True
        parser.print_help()
        parser.exit()


class SH2ArgumentParser(LightningArgumentParser):
    """The CLI's parser: short errors that name the setting and its replacement, and a short help.

    An error is one line (jsonargparse's own prints the whole usage first) plus a pointer to ``--help``. An
    unknown setting that moved or was removed gets what to write instead: jsonargparse names it as ``Option
    'NAME'`` / ``Key 'NAME'`` (inside a ``class_path`` or a config file) or ``--SECTION.NAME`` (the command line).
    ``--help`` of a subcommand lists sh2's own settings (:func:`sh2.cli_help.short_help`); ``--help-all`` lists
    every setting.
    """

    _UNKNOWN = re.compile(r"--([\w.]+)|[Oo]ption '([\w.]+)'|[Kk]ey '([\w.]+)'")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no abbreviations: argparse would take --trainer.max_step for --trainer.max_steps, and a typo that
        # happens to be a prefix of a setting would silently set it
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.sh2_subcommand: str | None = None  # set on the parsers of fit, validate, test and predict
        self.full_help = False

    def _hints(self, message: str, parser: argparse.ArgumentParser) -> list[str]:
        names = {n for group in self._UNKNOWN.findall(message) for n in group if n}
        known = [a.dest for a in parser._actions if "." in a.dest and not a.dest.endswith(".help")]
        hints = []
        for key in sorted(names):
            short = key.rsplit(".", 1)[-1]
            if key in REMOVED_SETTINGS:
                hints.append(REMOVED_SETTINGS[key])
            elif short in MOVED_STRATEGY_KEYS and "strategy" in message:
                hints.append(moved_strategy_key_message(short))
            elif f"model.{short}" in REMOVED_SETTINGS and "model" in message:  # named without its section
                hints.append(REMOVED_SETTINGS[f"model.{short}"])
            elif known and key not in known:
                hints.extend(self._did_you_mean(key, known, message))
        return list(dict.fromkeys(hints))

    @staticmethod
    def _did_you_mean(key: str, known: list[str], message: str) -> list[str]:
        """``Did you mean --model.lr?`` for a mistyped setting: settings of the same section whose last part is
        close to, or a prefix of, the one given; else such settings of any section (a key in the wrong section
        or without one)."""
        section, _, short = key.rpartition(".")

        def close(names: list[str], cutoff: float) -> list[str]:
            shorts: dict[str, list[str]] = {}
            for n in names:
                shorts.setdefault(n.rsplit(".", 1)[-1], []).append(n)
            hits = difflib.get_close_matches(short, list(shorts), n=3, cutoff=cutoff)
            hits += [s for s in shorts if len(s) > 1 and (short.startswith(s) or s.startswith(short))]
            return [n for s in dict.fromkeys(hits) for n in shorts[s]]

        elsewhere = [k for k in known if k.rsplit(".", 1)[-1] == short]  # the right name in another section
        found = close([k for k in known if k.rpartition(".")[0] == section], 0.6) if section else []
        found = list(dict.fromkeys(elsewhere + found)) or close(known, 0.8)
        if not found:
            return []
        dash = "--" if f"--{key}" in message else ""
        return [f"Did you mean {' or '.join(dash + c for c in found[:3])}?"]

    @staticmethod
    def _condense(message: str) -> str:
        """jsonargparse's report of a bad ``class_path`` argument (every Union subtype tried, the value's repr)
        cut to the key, the class and the problem."""
        nested = re.search(r"Expected a dot import path string: (\w+).*NestedArg\(key='([\w.]+)'", message, re.S)
        if nested and nested.group(1) in sh2.strategies.STRATEGY_ALIASES:
            name, setting = nested.groups()
            class_path = sh2.strategies.STRATEGY_ALIASES[name][0]
            return (f"trainer.strategy: the name {name} takes no settings such as {setting}; in the config write "
                    f"the strategy as `class_path: {class_path}` with `init_args: {{...}}`, or give "
                    f"--trainer.strategy {name} on the command line before its settings")
        key = re.match(r'Parser key "([\w.]+)":', message)
        problem = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.+)", message)
        if key and problem:
            return f"{key.group(1)}: {problem.group(1)}: {problem.group(2).strip()}"
        return message.strip()

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        message = "\n".join([self._condense(message), *self._hints(message, parser)])
        if not self.exit_on_error or debug_enabled():
            super().error(message, ex)
        prog = parser.prog.replace(" [options]", "")
        more = (f"`{prog} --help` for sh2's settings, `{prog} --help-all` for every setting" if
                getattr(parser, "sh2_subcommand", None) else f"`{prog} --help`")
        sys.stderr.write(f"{prog}: error: {plain_text(message)}\nSee {more}.\n")
        self.exit(2)

    def format_help(self, formatter: Any = None) -> str:
        if self.sh2_subcommand is not None and not self.full_help:
            return short_help(self, self.sh2_subcommand)
        return plain_text(super().format_help() if formatter is None else super().format_help(formatter))


class SH2SaveConfigCallback(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run folder when training starts.

    Not at setup, as Lightning does: by the start of training every resume check has passed (the checkpoint's
    data position was restored), so a run that fails to start, or a resume into the run's own folder that is
    refused, leaves the folder's ``config.yaml`` as it was. The file is written under a temporary name and
    renamed. Without a logger (``trainer.logger: false``, as in ``configs/predict.yaml``) there is no run folder
    and nothing is written: Lightning's ``trainer.log_dir`` would be the working directory.
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Nothing yet (see :meth:`on_train_start`)."""

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        if self.already_saved or trainer.logger is None or not self.save_to_log_dir:
            return
        log_dir = trainer.log_dir  # broadcast: every rank takes part
        if trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(self.parser.dump(self.config, skip_none=False))
            os.replace(tmp, path)
            self.save_config(trainer, pl_module, "fit")
        self.already_saved = True


class SH2CLI(LightningCLI):
    """LightningCLI for sh2: links sequence length and vocabulary between data and model, adds the checkpoint,
    validation-report, throughput and memory-estimate callbacks, TensorBoard logging (``fit`` only) and atomic
    checkpoint writes, and checks the weights and a resumed checkpoint before anything is built (see the module
    docstring)."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = SH2ArgumentParser,
                 **kwargs: Any) -> None:
        self.checkpoint_info: CheckpointInfo | None = None
        super().__init__(*args, parser_class=parser_class, **kwargs)

    # ----------------------------------------------------------------- parser
    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
                     ) -> None:
        main_kwargs = {"prog": "sh2", "description": "sh2 trains and runs StripedHyena 2 models (Evo 2 "
                       "architecture). `sh2 SUBCOMMAND --help` lists a subcommand's settings.", **main_kwargs}
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        import lightning
        import torch

        self.parser.add_argument("--version", action="version",
                                 version=f"sh2 {sh2.__version__} (torch {torch.__version__}, lightning "
                                         f"{lightning.__version__})")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """The four subcommands, each described in sh2's words (Lightning's describe its Trainer methods)."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            sub_kwargs = {"description": SUBCOMMANDS[subcommand], **kwargs.get(subcommand, {})}
            sub_parser = self._prepare_subcommand_parser(self.trainer_class, subcommand, **sub_kwargs)
            self._subcommand_parsers[subcommand] = sub_parser
            subcommands.add_subcommand(subcommand, sub_parser, help=SUBCOMMANDS[subcommand])

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.sh2_subcommand = subcommand
        parser.add_argument("--help-all", action=_HelpAll, help="show every setting (Lightning's included) and exit")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data", "model.vocab_size", compute_fn=lambda data: data.vocab_size,
                              apply_on="instantiate")
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1,
                             "checkpoint.monitor": "val/loss", "checkpoint.mode": "min",
                             "checkpoint.filename": "step{step:07d}-val{val/loss:.4f}",
                             "checkpoint.auto_insert_metric_name": False})
        # `sh2 predict` reads its sequences and options from this group (scoring, embeddings, generation); the
        # sampling seed is seed_everything, so PredictDataModule's own seed is not a second setting
        parser.add_class_arguments(PredictDataModule, "prediction", instantiate=True, sub_configs=True,
                                   skip={"seed"})

    # ----------------------------------------------------------------- checks before anything is built
    def _parse_ckpt_path(self) -> None:
        """Check the run's settings against the weights it uses, before any class is instantiated.

        Replaces Lightning's version, which copies a ``--ckpt_path`` checkpoint's module settings over the
        command's, so that an architecture or optimizer flag given on a resume was silently dropped.
        """
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        _refuse_duplicate_settings(cfg)
        if subcommand is None:
            return
        _batch_limits_as_counts(cfg)
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in _CKPT_KEYWORDS:
            self.checkpoint_info = _checked_checkpoint(str(ckpt_path), subcommand, cfg)
        elif not cfg["model"]["init_from"]:
            _refuse_random_weights(subcommand, cfg["model"].get("allow_random_init"))

    # ----------------------------------------------------------------- instantiation
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # sh2's one clipping setting is model.grad_clip; the trainer carries it for DeepSpeed, which clips inside
        # its engine from the trainer's value. Only fit keeps a run folder: the other commands log to the console.
        # Checkpoints are written by fit alone (a ModelCheckpoint of another command only restores stale state).
        kwargs.setdefault("gradient_clip_val", self.model.hparams.grad_clip)
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if self.subcommand in ("validate", "test", "predict"):
            kwargs.setdefault("logger", False)
            kwargs.setdefault("enable_checkpointing", False)
            extra = [cb for cb in extra if not isinstance(cb, ModelCheckpoint)]
            # ...so Lightning's remark that the checkpoint was written with a ModelCheckpoint is moot here
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to")
        extra += [ValidationReport(), ThroughputReport(), MemoryReport()]
        settings = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        try:
            trainer = self._instantiate_trainer(settings, extra)
        except MisconfigurationException as err:  # Lightning names no setting (e.g. "No supported gpu backend")
            if not re.search(r"gpu|cuda|mps|tpu|accelerator|device|backend", str(err), re.IGNORECASE):
                raise
            chosen = ", ".join(f"trainer.{k}={settings.get(k)!r}" for k in ("accelerator", "devices", "precision"))
            raise ValueError(f"{err} ({chosen}): set the trainer for this machine, e.g. --trainer.accelerator cpu "
                             f"where there is no GPU") from err
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: other formats are left alone
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    # ----------------------------------------------------------------- running
    def before_predict(self) -> None:
        """Predict on ``prediction.path`` and write the records to ``prediction.output``."""
        predict = self.config_init[self.subcommand]["prediction"]
        self.datamodule = predict
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter(predict.output))

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; say where the run and its weights are, and undo a run folder that a failure left
        before the first training step."""
        trainer = self.trainer
        # (rank 0 only: another rank could list the folders after rank 0 created its own, and name the next one)
        run_dir = _run_folder(trainer) if subcommand == "fit" and trainer.is_global_zero else None
        created = [p for p in (run_dir, *run_dir.parents) if not p.exists()] if run_dir is not None else []
        if trainer.is_global_zero:
            if run_dir is not None:
                print(f"[sh2] run folder: {run_dir} (config.yaml, TensorBoard events, checkpoints/)", flush=True)
            print(f"[sh2] weights: {self._weights_origin()}", flush=True)
            if subcommand == "fit":
                self._remove_stale_temporaries(run_dir)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created and trainer.is_global_zero and trainer.global_step == 0:
                _remove_unused_run_folder(created)
            raise

    def _weights_origin(self) -> str:
        info, init_from = self.checkpoint_info, self.model.hparams.init_from
        if info is not None:
            step = f" (step {info.global_step})" if info.global_step is not None else ""
            return f"{'resuming ' if self.subcommand == 'fit' else ''}{info.path}{step}"
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path:
            return str(ckpt_path)
        return f"model.init_from={init_from}" if init_from else "random initialisation (a new model)"

    def _remove_stale_temporaries(self, run_dir: Path | None) -> None:
        folders = []
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint):
            default = run_dir / "checkpoints" if run_dir is not None else None
            folders.append(Path(callback.dirpath) if callback.dirpath else default)
        if self.checkpoint_info is not None and Path(self.checkpoint_info.path).is_file():
            folders.append(Path(self.checkpoint_info.path).parent)
        for folder in dict.fromkeys(f for f in folders if f is not None):
            for path in remove_stale_temporaries(folder):
                print(f"[sh2] removed {path}: the temporary file of a checkpoint save that was killed", flush=True)


def _refuse_duplicate_settings(cfg: Any) -> None:
    """Lightning's clipping settings duplicate ``model.grad_clip``: refuse them, naming the one to use."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    if trainer.get("gradient_clip_val") is not None:
        raise ValueError(f"trainer.gradient_clip_val={trainer['gradient_clip_val']} is not an sh2 setting: set "
                         f"model.grad_clip instead (gradient-norm clipping; 0 disables; the norm is logged as "
                         f"train/grad_norm)")
    if trainer.get("gradient_clip_algorithm") not in (None, "norm"):
        raise ValueError(f"trainer.gradient_clip_algorithm={trainer['gradient_clip_algorithm']!r}: sh2 clips the "
                         f"gradient norm (model.grad_clip); remove trainer.gradient_clip_algorithm")


def _refuse_random_weights(subcommand: str, allow: bool | None) -> None:
    """Refuse a run that would use random weights without being asked to (see ``model.allow_random_init``)."""
    if allow or (allow is None and subcommand == "fit"):
        return
    if subcommand == "fit":
        raise ValueError("model.init_from is not set, and this config sets model.allow_random_init: false (a "
                         "finetuning config needs weights to start from). Set --model.init_from PATH (an sh2 "
                         "checkpoint, Evo 2 weights or a Hugging Face repo id), or --model.allow_random_init true "
                         "to train from random weights on purpose")
    source = "--model.init_from PATH" + ("" if subcommand == "predict" else " or --ckpt_path CKPT")
    raise ValueError(f"sh2 {subcommand} has no weights: neither model.init_from nor --ckpt_path is set, so the "
                     f"model would be random. Set {source} (a checkpoint of sh2 fit, Evo 2 weights or a Hugging "
                     f"Face repo id), or --model.allow_random_init true to run with random weights on purpose")


_BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _batch_limits_as_counts(cfg: Any) -> None:
    """Whole numbers in ``trainer.limit_*_batches`` are batch counts, as sh2's help says: the parser reads
    ``--trainer.limit_val_batches 1`` as ``1.0``, which Lightning takes for 100% of the batches."""
    trainer = cfg.get("trainer")
    for key in _BATCH_LIMITS:
        value = trainer.get(key) if trainer is not None else None
        if isinstance(value, float) and value.is_integer() and value >= 1:
            trainer[key] = int(value)


def _checked_checkpoint(ckpt_path: str, subcommand: str, cfg: Any) -> CheckpointInfo:
    """Read ``--ckpt_path``'s saved settings and refuse conflicting ones, naming the file (before Lightning does)."""
    trust = cfg.get("weights_only") is False
    try:
        info = read_checkpoint_info(ckpt_path, trust_pickle=trust)
    except CheckpointError as err:
        fix = ("if you trust the file, add --weights_only false" if CheckpointHint.TRUST_PICKLE in err.hints else
               "pick another checkpoint (the step*.ckpt files beside last.ckpt are older ones)")
        raise CheckpointError(f"--ckpt_path: {err}\nFix: {fix}", err.hints) from None
    if subcommand == "fit" and not info.has_training_state:
        raise CheckpointError(f"--ckpt_path {ckpt_path} holds weights only (no optimizer or loop state: saved with "
                              f"checkpoint.save_weights_only?), so the run cannot be resumed. Start a new run from "
                              f"its weights with --model.init_from {ckpt_path}")
    max_steps = cfg["trainer"].get("max_steps") if cfg.get("trainer") is not None else None
    if subcommand == "fit" and info.global_step is not None and max_steps is not None and 0 <= max_steps <= \
            info.global_step:
        raise ValueError(f"--ckpt_path {ckpt_path} is at step {info.global_step}, and trainer.max_steps={max_steps}: "
                         f"the run is finished, there is nothing to resume.\nFix: raise --trainer.max_steps above "
                         f"{info.global_step} to train on (the cosine decay then follows the new max_steps unless "
                         f"model.decay_steps is set)")
    model, data = cfg["model"].as_dict(), cfg["data"].as_dict() if cfg.get("data") else {}
    conflicts = resume_conflicts(info, model, data, VOCAB_SIZE, fitting=subcommand == "fit")
    if conflicts:
        own = Path(ckpt_path).resolve().parent.parent / "config.yaml"
        use = f"its config ({own})" if own.is_file() else "the settings it was trained with"
        what = "a resume continues the checkpoint's run" if subcommand == "fit" else "the model must be the " \
               "checkpoint's architecture"
        if subcommand == "fit":
            fix = (f"run with {use}; or start a new run from its weights with --model.init_from {ckpt_path} (a new "
                   f"optimizer and data stream)")
        elif all(c.startswith(("model.lora", "model.freeze")) for c in conflicts):
            fix = (f"run with {use}; or give it as weights, --model.init_from {ckpt_path} instead of --ckpt_path "
                   f"(its LoRA adapters are merged into the weights)")
        else:
            fix = f"run with {use}"
        raise ValueError(f"--ckpt_path {ckpt_path} does not fit this run's settings ({what}):\n  "
                         + "\n  ".join(conflicts) + f"\nFix: {fix}")
    return info


def _run_folder(trainer: Trainer) -> Path | None:
    """The folder the logger will write to, computed without creating it (None without a logger)."""
    if trainer.logger is None:
        return None
    log_dir = getattr(trainer.logger, "log_dir", None)
    return Path(log_dir) if log_dir else None


def _remove_unused_run_folder(created: list[Path]) -> None:
    """Delete the run folder this command created (``created[0]``) and the parents it created, once empty.

    Called only when the command failed before its first training step: the folder holds no result then, and
    leaving it would make the next run ``version_N+1`` for nothing.
    """
    run_dir, parents = created[0], created[1:]
    if run_dir.is_dir() and not any(run_dir.glob("checkpoints/*")):
        shutil.rmtree(run_dir, ignore_errors=True)
    for parent in parents:
        try:
            parent.rmdir()
        except OSError:
            break


# ----------------------------------------------------------------------------- the command
_QUIET = ("💡 Tip:", "TPU available", "HPU available")


class _DropNoise(logging.Filter):
    """Drops Lightning's advertising tips and accelerator lines that never concern an sh2 user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    # Lightning's own pytree helper trips a torch deprecation on every run; nothing a user can change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # validate, test and predict run without a logger on purpose (metrics go to the console)
    warnings.filterwarnings("ignore", message=r"You called `self.log\(.*but have no logger configured")
    # a resume goes to a new run folder, whose checkpoint callback starts its own top-k list: as intended
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* won't be reloaded")
    # data.val_fraction: 0 turns validation off with an empty list of batches, which Lightning remarks on
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")


def _error_text(err: BaseException) -> str:
    """The message of an error, without the traceback a DataLoader worker embeds in it."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if "Original Traceback" in text:  # torch re-raises a worker's error with its traceback as the message
        last = [i for i, line in enumerate(text.splitlines()) if re.match(r"^[\w.]+(Error|Exception): ", line)]
        if last:
            lines = text.splitlines()[last[-1]:]
            text = "\n".join([lines[0].split(": ", 1)[1], *lines[1:]])
    return text.strip() or type(err).__name__


# errors that describe something the user gave (a setting, a file, an input), not a fault of sh2
_USER_ERRORS = (ValueError, KeyError, OSError, EOFError, ImportError)


def error_report(err: BaseException, subcommand: str | None) -> str:
    """What the command prints for an error that ended it: the message, and how to see the traceback."""
    prog = f"sh2 {subcommand}" if subcommand else "sh2"
    if isinstance(err, (*_USER_ERRORS, MisconfigurationException)) or (
            isinstance(err, RuntimeError) and str(err).startswith("non-finite training loss")):
        return f"{prog}: error: {_error_text(err)}\n({_DEBUG_HINT})\n"
    return (f"{prog}: error: {type(err).__name__}: {_error_text(err)}\n"
            f"This may be a bug in sh2 or a library it uses: {_DEBUG_HINT}, and report it.\n")


def expand_strategy_alias(argv: list[str]) -> list[str]:
    """``--trainer.strategy sh2_cp --trainer.strategy.cp.size 2``: a registered name is a plain string to the
    parser, which cannot take settings, so when settings of the strategy follow on the command line the name is
    replaced by its class and arguments (:data:`sh2.strategies.STRATEGY_ALIASES`), which they then update."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, at = None, None
        if arg == "--trainer.strategy" and i + 1 < len(out):
            name, at = out[i + 1], i + 1
        elif arg.startswith("--trainer.strategy="):
            name, at = arg.split("=", 1)[1], i
        if name not in sh2.strategies.STRATEGY_ALIASES or at is None:
            continue
        if not any(a.startswith("--trainer.strategy.") for a in out[at + 1:]):
            continue
        class_path, init_args, _ = sh2.strategies.STRATEGY_ALIASES[name]
        value = json.dumps({"class_path": class_path, "init_args": init_args})
        out[at] = value if at == i + 1 else f"--trainer.strategy={value}"
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sh2`` console script and ``python -m sh2``."""
    argv = sys.argv[1:] if args is None else list(args)
    if "--debug" in argv:
        os.environ["SH2_DEBUG"] = "1"
        argv = [a for a in argv if a != "--debug"]
    argv = expand_strategy_alias(argv)
    if args is None:
        sys.argv[1:] = argv
    _quiet_lightning()
    subcommand = next((a for a in argv if a in LightningCLI.subcommands()), None)
    try:
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
            args=None if args is None else argv,
            auto_configure_optimizers=False,
        )
    except KeyboardInterrupt:
        sys.stderr.write("sh2: interrupted\n")
        sys.exit(130)
    except Exception as err:
        if debug_enabled():
            raise
        sys.stderr.write(error_report(err, subcommand))
        sys.exit(1)


if __name__ == "__main__":
    main()
