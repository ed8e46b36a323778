"""The ``sh2`` command's help: a short page of sh2's own settings per subcommand (``--help``), the full list of
every setting on demand (``--help-all``), and docstring markup turned into plain text in both.

The short page is built from the parser itself (names, defaults and the first sentence of each setting's
docstring), so it cannot drift from the code; only the handful of Lightning ``Trainer`` settings it shows are
chosen, and described, here.
"""

from __future__ import annotations

import argparse
import re
import textwrap
import types
import typing
from typing import Any

__all__ = ["plain_text", "short_help"]

# Lightning Trainer settings worth a line on the short page, per subcommand, with sh2's one-line description
_TRAINER = {
    "accelerator": "cpu, gpu or auto",
    "devices": "devices per node (auto: every visible GPU)",
    "num_nodes": "nodes (multi-node: configs/launch/torchrun.sh or slurm.sbatch)",
    "precision": "32-true, bf16-mixed, ...",
    "strategy": "how the model is spread over devices (sh2_cp: FSDP2 + context parallelism; docs/context_parallel.md)",
    "max_steps": "optimizer steps to train",
    "val_check_interval": "validate every N steps",
    "limit_val_batches": "validation batches per validation",
    "log_every_n_steps": "log losses, learning rate and throughput every N steps",
    "accumulate_grad_batches": "micro-batches per optimizer step",
    "enable_progress_bar": "show the progress bar",
}
# the checkpoint settings on the short page, with what they do in sh2 (sh2.training.callbacks.LastCheckpoint)
_CHECKPOINT = {
    "dirpath": "folder of the checkpoints (default: the run folder's checkpoints/)",
    "every_n_train_steps": "also save every N optimizer steps",
    "save_top_k": "keep the k best step*.ckpt files by checkpoint.monitor (val/loss)",
    "save_last": "keep last.ckpt, the newest state (rewritten at every validation, periodic save and the end)",
}
_TRAINER_BY_COMMAND = {
    "fit": ["accelerator", "devices", "num_nodes", "precision", "strategy", "max_steps", "val_check_interval",
            "limit_val_batches", "log_every_n_steps", "accumulate_grad_batches", "enable_progress_bar"],
    "validate": ["accelerator", "devices", "precision", "limit_val_batches"],
    "test": ["accelerator", "devices", "precision"],
    "predict": ["accelerator", "devices", "precision"],
}
_MODEL_FOR_WEIGHTS = ("preset", "overrides", "init_from", "init_from_trust_pickle", "allow_random_init", "compile")
_WIDTH = 120
_COLUMN = 38

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|paramref|data|obj|exc|ref):`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def plain_text(text: str) -> str:
    """Docstring markup as plain text: ``:class:`~a.b.C``` -> ``C`` (``:meth:`A.f``` -> ``A.f``), backquotes
    dropped."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if m.group(0).find("`~") >= 0 else m.group(1), text)
    return text.replace("``", "").replace("`", "")


def _first_sentence(text: str) -> str:
    text = " ".join(plain_text(text or "").split())
    cut = re.search(r"(?<!e\.g)(?<!i\.e)(?<=[a-z0-9)\]])\.\s", text)
    return (text[: cut.start() + 1] if cut else text).rstrip(".")


def _metavar(action: argparse.Action) -> str:
    hint = getattr(action, "_typehint", None)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if hint is not None else []
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    names = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (list, tuple) or hint in (list, tuple):
        return "LIST"
    if origin is dict or hint is dict:
        return "DICT"
    return "VALUE"


def _line(option: str, text: str) -> list[str]:
    head = f"  {option}"
    body = textwrap.wrap(text, _WIDTH - _COLUMN) or [""]
    if len(head) >= _COLUMN - 1:
        return [head] + [" " * _COLUMN + b for b in body]
    return [head.ljust(_COLUMN) + body[0]] + [" " * _COLUMN + b for b in body[1:]]


def _default(value: Any) -> str:
    if value is None or value == argparse.SUPPRESS:
        return ""
    return f" (default: {value})"


def short_help(parser: Any, subcommand: str) -> str:
    """The short help page of ``sh2 SUBCOMMAND``: sh2's own settings, a few Trainer settings, and where the rest is.

    Args:
        parser: the subcommand's jsonargparse parser.
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
    """
    actions = {a.dest: a for a in parser._actions}
    try:
        defaults = parser.get_defaults()
    except Exception:  # a default that fails validation still leaves the help readable
        defaults = None

    def default_of(dest: str) -> Any:
        if defaults is not None:
            try:
                return defaults[dest]
            except KeyError:
                pass
        return actions[dest].default

    def options(prefix: str, names: tuple[str, ...] | None = None, own: dict[str, str] | None = None
                ) -> list[str]:
        lines = []
        for dest, action in actions.items():
            if not dest.startswith(prefix + ".") or dest.count(".") != 1 or not action.option_strings:
                continue
            name = dest.split(".", 1)[1]
            if (names is not None and name not in names) or type(action).__name__ == "ActionLink":
                continue
            text = (own or {}).get(name) or _first_sentence(action.help or "")
            lines += _line(f"--{dest} {_metavar(action)}", text + _default(default_of(dest)))
        return lines

    out = [f"usage: sh2 {subcommand} [--config FILE] [--SECTION.SETTING VALUE ...]", "", parser.description or "",
           f"sh2's own settings follow; `sh2 {subcommand} --help-all` lists every setting, including all of "
           "Lightning's Trainer.", "", "Config and run:"]
    out += _line("-c, --config FILE", "a YAML config (configs/*.yaml); flags after it override its values")
    out += _line("--print_config", "print the resolved config (all values, defaults included) and exit")
    if subcommand != "predict":
        what = ("resume this run (its last.ckpt); its architecture and data settings must match"
                if subcommand == "fit" else "the checkpoint to evaluate")
        out += _line("--ckpt_path PATH", what)
    out += _line("--seed_everything INT", "seed of initialisation, dropout and sampling" +
                 _default(default_of("seed_everything")))
    out += _line("--debug", "show the Python traceback of an error (or set SH2_DEBUG=1)")
    sections = [("Model (model.*)", options("model", None if subcommand == "fit" else _MODEL_FOR_WEIGHTS))]
    if subcommand == "predict":
        sections.append(("Prediction (prediction.*)", options("prediction")))
    else:
        sections.append(("Data (data.*)", options("data")))
    if subcommand == "fit":
        sections.append(("Checkpoints (checkpoint.*)", options("checkpoint", tuple(_CHECKPOINT), _CHECKPOINT)))
    trainer = []
    for name in _TRAINER_BY_COMMAND[subcommand]:
        if f"trainer.{name}" in actions:
            trainer += _line(f"--trainer.{name} {_metavar(actions[f'trainer.{name}'])}",
                             _TRAINER[name] + _default(default_of(f"trainer.{name}")))
    if subcommand == "fit":
        trainer += _line("--trainer.logger.init_args.save_dir DIR", "where run folders go: DIR/NAME/version_N")
        trainer += _line("--trainer.logger.init_args.name NAME", "the run's name (its folder under save_dir)")
    sections.append(("Trainer (trainer.*, the most used)", trainer))
    for title, lines in sections:
        if lines:
            out += ["", title + ":", *lines]
    return "\n".join(out) + "\n"
