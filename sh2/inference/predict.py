"""The prediction path of ``sh2 predict``: a sequence file in, per-sequence scores/embeddings/generations out.

Pieces (all configurable from YAML):

- :class:`PredictDataModule`: reads a FASTA (plain or compressed; via :func:`sh2.data.sources.read_fasta`)
  or a text file (one sequence per line) and yields batches ``{"ids", "sequences", "options"}``; the
  options say what to compute (``task``: ``score``, ``embed`` or ``generate``, and their settings).
- :func:`predict_batch`: what ``SH2LightningModule.predict_step`` returns: one JSON-friendly record per
  sequence.
- :class:`PredictionWriter`: a Lightning ``BasePredictionWriter`` writing the records to ``.jsonl`` (one
  line per sequence, written as batches finish) or ``.pt`` (a list of records saved at the end). With
  several processes each rank writes ``NAME.rankR.EXT``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from sh2.inference.generation import generate
from sh2.inference.scoring import score_sequences

TASKS = ("score", "embed", "generate")
_FASTA_SUFFIXES = (".fasta", ".fa", ".fna", ".ffn", ".frn", ".fas", ".fsa")


def read_sequences(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(id, sequence)`` pairs from a FASTA file (by extension, optionally ``.gz/.bz2/.xz``) or a text file
    with one sequence per line (ids ``seq0, seq1, ...``; blank lines skipped)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predict input {path} does not exist")
    bare = path.lower()
    for ext in (".gz", ".bz2", ".xz"):
        bare = bare[: -len(ext)] if bare.endswith(ext) else bare
    if bare.endswith(_FASTA_SUFFIXES):
        from sh2.data.sources import read_fasta

        records = list(read_fasta(path))
    else:
        with open(path) as fh:
            lines = [ln.strip() for ln in fh]
        records = [(f"seq{i}", s) for i, s in enumerate(ln for ln in lines if ln)]
    if not records:
        raise ValueError(f"predict input {path} contains no sequences")
    return records


class SequenceDataset(Dataset):
    """Sequences of a file as ``{"id", "sequence"}`` items (optionally truncated to ``max_length``)."""

    def __init__(self, path: str | os.PathLike, max_length: int | None = None) -> None:
        self.records = [(i, s[:max_length] if max_length else s) for i, s in read_sequences(path)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, str]:
        rid, seq = self.records[idx]
        return {"id": rid, "sequence": seq}


def collate(items: Sequence[dict[str, str]], options: dict[str, Any]) -> dict[str, Any]:
    """A batch: ids, sequences (strings; tokenized on the model's device) and the task options."""
    return {"ids": [it["id"] for it in items], "sequences": [it["sequence"] for it in items], "options": options}


def _tolist(t: torch.Tensor) -> list:
    return t.detach().float().cpu().tolist()


@torch.no_grad()
def predict_batch(model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Records for one batch of :class:`PredictDataModule` (what ``predict_step`` should return).

    ``score``: ``length``, ``logprob_sum``, ``logprob_mean`` (+ ``logprob_sum_rc``, ``token_logprobs``);
    ``embed``: the same plus ``embeddings`` ``{layer: vector or per-token matrix}``; ``generate``:
    ``prompt``, ``generated``, ``logprobs``.
    """
    opts = dict(batch.get("options") or {})
    task = opts.pop("task", "score")
    ids, seqs = batch["ids"], batch["sequences"]
    if task == "generate":
        out = generate(model, seqs, max_new_tokens=opts.get("max_new_tokens", 100),
                       temperature=opts.get("temperature", 1.0), top_k=opts.get("top_k", 0),
                       top_p=opts.get("top_p", 1.0), alphabet=opts.get("alphabet"), seed=opts.get("seed"),
                       uppercase=opts.get("uppercase", True))
        return [{"id": i, "prompt": s, "generated": g, "logprobs": _tolist(lp)}
                for i, s, g, lp in zip(ids, seqs, out.sequences, out.logprobs)]
    layers = (opts.get("layers") or [-1]) if task == "embed" else None
    scores = score_sequences(model, seqs, batch_size=len(seqs),
                             reverse_complement=opts.get("reverse_complement", False),
                             per_token=opts.get("per_token", False), layers=layers,
                             pool=opts.get("pool", "mean"), uppercase=opts.get("uppercase", True))
    records = []
    for rid, sc in zip(ids, scores):
        rec: dict[str, Any] = {"id": rid, "length": sc.length, "logprob_sum": sc.logprob_sum,
                               "logprob_mean": sc.logprob_mean}
        if sc.logprob_sum_rc is not None:
            rec["logprob_sum_forward"], rec["logprob_sum_rc"] = sc.logprob_sum_forward, sc.logprob_sum_rc
        if sc.token_logprobs is not None:
            rec["token_logprobs"] = _tolist(sc.token_logprobs)
        if sc.embeddings:
            rec["embeddings"] = {str(k): v for k, v in sc.embeddings.items()}
        records.append(rec)
    return records


class PredictDataModule(L.LightningDataModule):
    """Sequences to predict on, and what to compute for them.

    Args:
        path: FASTA (``.fa/.fasta/.fna``..., optionally compressed) or text file, one sequence per line.
        output: where ``sh2 predict`` writes the records (``.jsonl`` or ``.pt``, see :class:`PredictionWriter`).
        task: ``score`` (log-probabilities), ``embed`` (scores + hidden states) or ``generate``.
        batch_size: sequences per batch (right-padded for scoring, left-padded for generation).
        max_length: truncate sequences to this many characters.
        uppercase: upper-case sequences before tokenizing (Evo 2 was trained on upper case).
        reverse_complement: score: average with the reverse complement's score.
        per_token: score: also output per-token log-probabilities.
        layers: embed: block indices whose outputs are returned (default ``[-1]``).
        pool: embed: ``mean``, ``last`` or ``none`` (per-token).
        max_new_tokens: generate: tokens per prompt.
        temperature: generate: sampling temperature (0 = greedy).
        top_k: generate: top-k filter (0 = off).
        top_p: generate: nucleus filter (1 = off).
        alphabet: generate: restrict sampling to these characters (e.g. ``ACGT``).
        seed: generate: sampling seed.
        num_workers: DataLoader workers.
    """

    def __init__(self, path: str | None = None, output: str = "predictions.jsonl", task: str = "score",
                 batch_size: int = 8, max_length: int | None = None,
                 uppercase: bool = True, reverse_complement: bool = False, per_token: bool = False,
                 layers: list[int] | None = None, pool: str = "mean", max_new_tokens: int = 100,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, alphabet: str | None = None,
                 seed: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"prediction.task must be one of {TASKS}, got {task!r}")
        if batch_size < 1:
            raise ValueError(f"prediction.batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size, self.max_length, self.num_workers = path, batch_size, max_length, num_workers
        self.output = output
        self.options = dict(task=task, uppercase=uppercase, reverse_complement=reverse_complement,
                            per_token=per_token, layers=layers, pool=pool, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, alphabet=alphabet, seed=seed)

    def predict_dataloader(self) -> DataLoader:
        if self.path is None:
            raise ValueError("prediction.path is not set: name the FASTA or text file of sequences to predict on "
                             "(sh2 predict --config ... --prediction.path seqs.fasta)")
        return predict_dataloader(self.path, self.batch_size, self.max_length, self.num_workers, **self.options)


def predict_dataloader(path: str, batch_size: int = 8, max_length: int | None = None, num_workers: int = 0,
                       **options: Any) -> DataLoader:
    """A DataLoader of :class:`SequenceDataset` batches carrying ``options`` (see :class:`PredictDataModule`)."""
    return DataLoader(SequenceDataset(path, max_length), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=partial(collate, options=options))


class PredictionWriter(BasePredictionWriter):
    """Writes the records of :func:`predict_batch` to ``output`` (``.jsonl`` streamed, or ``.pt``).

    Args:
        output: file to write; ``.jsonl``/``.json`` (one JSON object per line, tensors as lists) or
            ``.pt`` (a list of records, tensors kept). Parent directories are created. With several
            processes, each rank writes ``NAME.rankR.EXT``.
    """

    def __init__(self, output: str) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._records: list[dict[str, Any]] = []
        self._path: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._path = self._target(trainer)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._records = []
        if self._path.suffix != ".pt":
            self._path.write_text("")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        records = list(prediction or [])
        if self._path is None:
            self.on_predict_start(trainer, pl_module)
        if self._path.suffix == ".pt":
            self._records.extend(records)
            return
        with open(self._path, "a") as fh:
            for rec in records:
                fh.write(json.dumps(_jsonable(rec)) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._path is not None and self._path.suffix == ".pt":
            torch.save(self._records, self._path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().cpu().tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    return obj
