"""What validation holds out of the training data: whole records, or the tail windows of every record.

Genome corpora come in two shapes. Many records (a collection of phage or bacterial genomes) are split by
record: about ``val_fraction`` of them, chosen by a hash of their content (:func:`is_validation_document`), so the
choice is the same on every run and rank. One genome or a few long records (chromosomes) cannot be split that way:
the hash would hold out none or a large share. Then the tail of every record is held out, in whole windows of
``seq_len + 1`` tokens, and the record's head trains (``data.val_split: within_records``). ``auto`` picks by the
record count. :class:`Holdout` is the decision, used by the training stream (:meth:`Holdout.training_text`) and by
the validation batches (:func:`validation_pieces`) alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from sh2.data.sources import DocumentSource, is_validation_document
from sh2.data.tokenizer import ByteTokenizer

VAL_SPLITS = ("auto", "records", "within_records")
"""How validation is held out of ``data.path`` (``data.val_split``); see :class:`Holdout`."""
AUTO_HELD_OUT_RECORDS = 2
"""``auto`` holds out whole records when at least this many are expected in validation (``val_fraction * records``)."""
AUTO_COUNT_LIMIT = 10_000
"""``auto`` counts at most this many records (then it holds out whole records)."""


def auto_records_needed(val_fraction: float) -> int:
    """Records a source needs for ``data.val_split: auto`` to hold out whole records:
    ``ceil(AUTO_HELD_OUT_RECORDS / val_fraction)``, at most :data:`AUTO_COUNT_LIMIT`."""
    return min(AUTO_COUNT_LIMIT, math.ceil(AUTO_HELD_OUT_RECORDS / val_fraction - 1e-9))


def val_settings_problems(val_split: str, val_path: str | None) -> list[str]:
    """What is wrong with ``data.val_split`` / ``data.val_path`` (empty when nothing is)."""
    if val_split not in VAL_SPLITS:
        return [f"data.val_split must be one of {', '.join(VAL_SPLITS)} (got {val_split!r}): how validation is held "
                "out of data.path; separate validation files go in data.val_path"]
    if val_path is not None and val_split != "auto":
        return [f"data.val_split={val_split!r} holds validation out of data.path, but data.val_path is set (every "
                "document of data.path then trains); leave data.val_split at auto"]
    return []


@dataclass(frozen=True)
class Holdout:
    """Which tokens of ``data.path`` are held out for validation; the rest trains.

    Modes:
        ``records``: whole records, chosen by a hash of their content (:func:`is_validation_document`), about
            ``val_fraction`` of them. Needs many records.
        ``within_records``: the tail of every record, ``floor(val_fraction * n / window)`` whole windows of
            ``window = seq_len + 1`` tokens from the end of a record of ``n`` tokens (its EOD included), so no
            validation window crosses a record boundary or overlaps the record's training part (its first
            ``n - held`` tokens). For one genome or a few long records.
        ``none``: nothing held out (validation disabled, or taken from ``data.val_path``).

    Attributes:
        mode: one of the modes above.
        val_fraction: the fraction held out.
        window: ``seq_len + 1``, the tokens of one validation window.
    """

    mode: str
    val_fraction: float = 0.0
    window: int = 1

    def held_out_tokens(self, num_tokens: int) -> int:
        """Tokens held out at the end of a record of ``num_tokens`` tokens (EOD included), ``within_records``."""
        if self.mode != "within_records":
            return 0
        return math.floor(self.val_fraction * num_tokens / self.window) * self.window

    def training_text(self, text: str) -> str | None:
        """The part of a record that trains: the whole record, None (held out whole), or its head."""
        if self.mode == "records":
            return None if is_validation_document(text, self.val_fraction) else text
        if self.mode != "within_records":
            return text
        n = ByteTokenizer.num_tokens(text) + 1
        held = self.held_out_tokens(n)
        if not held:
            return text
        if text.isascii():
            return text[: n - held]
        # a cut inside a multi-byte character drops that character: a gap, never an overlap
        return text.encode("utf-8")[: n - held].decode("utf-8", errors="ignore")


def resolve_holdout(source: DocumentSource, val_split: str, val_fraction: float, seq_len: int,
                    val_path: str | None) -> Holdout:
    """The :class:`Holdout` of a datamodule's settings; ``auto`` counts the records (at most
    :func:`auto_records_needed` of them) and prints a notice when it holds out within records."""
    if val_path is not None or val_fraction <= 0:
        return Holdout("none")
    mode = val_split
    if mode == "auto":
        needed = auto_records_needed(val_fraction)
        count = sum(1 for _ in zip(range(needed), source.documents(), strict=False))
        mode = "records" if count >= needed else "within_records"
        if mode == "within_records":
            rank_zero_info(
                f"[sh2] data.val_split=auto: {source.description} has {count} records, too few to hold out whole "
                f"ones at data.val_fraction={val_fraction} (that needs {needed}); validation is the last "
                f"{val_fraction:g} of every record, in whole windows of data.seq_len + 1 tokens "
                f"(data.val_split: within_records)")
    return Holdout(mode, val_fraction, seq_len + 1)


@dataclass
class HoldoutStats:
    """What building the validation set saw: records read, records that gave tokens, the longest record held
    out (``within_records``: any record), and the tokens held out."""

    records: int = 0
    held_out: int = 0
    longest: int = 0
    tokens: int = 0


def validation_pieces(source: DocumentSource, holdout: Holdout, tokenizer: ByteTokenizer,
                      stats: HoldoutStats) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token runs and weights that validation packs, in stream order: whole held-out records (``records``), the
    tail of every record (``within_records``) or every document (``none``: ``source`` is ``data.val_path``)."""
    for text in source.documents():
        stats.records += 1
        if holdout.mode == "records" and not is_validation_document(text, holdout.val_fraction):
            continue
        ids, weights = tokenizer.encode_document(text)
        stats.longest = max(stats.longest, len(ids))
        if holdout.mode == "within_records":
            held = holdout.held_out_tokens(len(ids))
            if not held:
                continue
            ids, weights = ids[-held:], weights[-held:]
        stats.held_out += 1
        stats.tokens += len(ids)
        yield ids, weights


def empty_validation_message(holdout: Holdout, stats: HoldoutStats, description: str, *, seq_len: int,
                             val_fraction: float, val_split: str, val_path: str | None) -> str:
    """Why no validation window was found, and what would help in this case (never advice that cannot)."""
    window = seq_len + 1
    if val_path is not None:
        return (f"The validation files data.val_path={val_path!r} hold {stats.tokens} tokens in {stats.records} "
                f"documents, fewer than one window of data.seq_len + 1 = {window} tokens. Lower data.seq_len or add "
                "validation documents.")
    head = f"The validation split of {description} is empty: "
    if holdout.mode == "records":
        advice = ("With this few records, set data.val_split: within_records (the last data.val_fraction of every "
                  "record is held out) or give validation files with data.val_path."
                  if stats.records < auto_records_needed(val_fraction) else
                  "Raise data.val_fraction, lower data.seq_len, set data.val_split: within_records or data.val_path, "
                  "or set data.val_fraction: 0 to disable validation.")
        return head + (f"data.val_split=records held out {stats.held_out} of {stats.records} records (by a hash of "
                       f"their content, data.val_fraction={val_fraction}), fewer than one window of data.seq_len + 1 "
                       f"= {window} tokens. " + advice)
    chosen = " (chosen by data.val_split=auto for so few records)" if val_split == "auto" else ""
    longest = stats.longest
    message = head + (
        f"data.val_split=within_records{chosen} holds out whole windows of data.seq_len + 1 = {window} tokens from "
        f"the last data.val_fraction={val_fraction} of each record, and no record has one: the longest has "
        f"{longest} tokens, and {val_fraction} x {longest} < {window}. ")
    if longest >= window:  # some record holds a window: a larger fraction finds it
        return message + (f"Raise data.val_fraction to at least {window / longest:.3g}, lower data.seq_len, or give "
                          "validation files with data.val_path.")
    return message + (f"Every record is shorter than one window: lower data.seq_len below {longest}, or give "
                      "validation files with data.val_path.")


def empty_training_message(holdout: Holdout, where: str, val_fraction: float, dp_size: int, num_slots: int) -> str:
    """Why a training slot has no documents: whole records held out, or fewer records than readers."""
    if holdout.mode == "records":
        return (f"{where} has no training documents left for it after data.val_split=records held out whole records "
                f"(data.val_fraction={val_fraction}). Lower data.val_fraction, set data.val_split: within_records "
                "(part of every record is held out instead), or lower data.num_workers.")
    return (f"{where} has fewer records (or files) than data-parallel ranks x DataLoader workers ({dp_size} x "
            f"{num_slots}) to share among them. Lower data.num_workers, or add documents.")
