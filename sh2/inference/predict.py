"""The prediction path of ``sh2 predict``: a sequence or variant file in, one record per item out.

Pieces (all configurable from YAML):

- :class:`PredictDataModule`: reads a FASTA (plain or compressed; via :func:`sh2.data.sources.read_fasta`)
  or a text file (one sequence per line), told apart by content, and yields batches ``{"ids", "sequences",
  "options"}``; the options say what to compute (``task``: ``score``, ``embed``, ``generate`` or ``variants``, and their
  settings). For ``variants`` it reads a VCF or TSV plus a reference FASTA instead
  (:class:`sh2.inference.variants.VariantBatches`).
- :func:`predict_batch`: what ``SH2LightningModule.predict_step`` returns: one record per sequence or
  variant.
- :class:`PredictionWriter`: a Lightning ``BasePredictionWriter`` that writes the records batch by batch
  in the format of the output's suffix (``.jsonl``, ``.tsv``, ``.parquet``, ``.npy``, ``.safetensors``, or
  ``.pt`` kept in memory until the end; see :mod:`sh2.inference.outputs`) to a staging file that replaces the
  output only when every record is written, and prints the path at the end.
  With several processes each rank writes ``NAME.rankR.EXT``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from sh2.inference.generation import generate
from sh2.inference.outputs import check_output, open_sink
from sh2.inference.scoring import score_sequences

TASKS = ("score", "embed", "generate", "variants")
POOLS = ("mean", "last", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_VARIANTS = "phage_variants.vcf"  # with the built-in phage genomes as reference


def read_sequences(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(id, sequence)`` pairs from a FASTA file or a text file with one sequence per line (ids ``seq0, seq1,
    ...``; blank lines skipped). The format and the compression (gzip, bzip2, xz) are read from the content, not
    the name: a file whose first line is a ``>`` header is FASTA, as in training (:mod:`sh2.data.files`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no sequence, or is damaged (the message names it).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prediction.path={path!r} does not exist; give a FASTA or text file of sequences")
    from sh2.data.files import is_fasta, iter_lines
    from sh2.data.sources import read_fasta

    if is_fasta(path):
        records = list(read_fasta(path))
    else:
        lines = (ln.decode("utf-8", errors="replace").strip() for ln in iter_lines(path))
        records = [(f"seq{i}", s) for i, s in enumerate(ln for ln in lines if ln)]
    if not records:
        raise ValueError(f"prediction.path={path!r} contains no sequences (a FASTA record with sequence lines, or "
                         f"one sequence per line)")
    return records


# IUPAC nucleotide codes (U for RNA, N and the ambiguity letters) and alignment gaps, either case
_NUCLEOTIDE_CODES = b"ACGTUNRYKMSWBDHV-.acgtunrykmswbdhv"


def non_nucleotide_records(records: Sequence[tuple[str, str]], min_fraction: float = 0.9) -> list[str]:
    """Ids of the records whose characters are less than ``min_fraction`` nucleotide codes (protein, text)."""
    out = []
    for rid, seq in records:
        data = seq.encode("utf-8", errors="replace")
        other = len(data.translate(None, _NUCLEOTIDE_CODES))  # one pass: the bytes left after deleting the codes
        if data and other > (1 - min_fraction) * len(data):
            out.append(rid)
    return out


def nucleotide_notice(records: Sequence[tuple[str, str]], setting: str = "prediction.path") -> str | None:
    """A one-line notice when some sequences are not DNA or RNA: sh2 scores any bytes, and a model trained on
    DNA (Evo 2) gives protein or text scores that say little. None when every record is nucleotides."""
    odd = non_nucleotide_records(records)
    if not odd:
        return None
    first = dict(records)[odd[0]]
    sample = first[:24] + ("..." if len(first) > 24 else "")
    return (f"note: {len(odd)} of {len(records)} sequences of {setting} are not nucleotide sequences (e.g. "
            f"{odd[0]}: {sample!r}); they are scored as bytes, which means little for a model trained on DNA "
            f"such as Evo 2")


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

    ``score``: ``length``, ``logprob_sum``, ``logprob_mean`` (+ ``logprob_sum_rc``, ``token_logprobs``
    ``[n - 1]`` float32 tensor); ``embed``: the same plus ``embeddings`` ``{layer: [D] or per-token [n, D]
    tensor}`` in the ``dtype`` option; ``generate``: ``prompt``, ``generated``, ``logprobs``; ``variants``:
    the rows of :func:`sh2.inference.variants.score_variant_batch`.
    """
    opts = dict(batch.get("options") or {})
    task = opts.pop("task", "score")
    if task == "variants":
        from sh2.inference.variants import score_variant_batch

        return score_variant_batch(model, batch)
    ids, seqs = batch["ids"], batch["sequences"]
    if task == "generate":
        out = generate(model, seqs, max_new_tokens=opts.get("max_new_tokens", 100),
                       temperature=opts.get("temperature", 1.0), top_k=opts.get("top_k", 0),
                       top_p=opts.get("top_p", 1.0), alphabet=opts.get("alphabet"), seed=opts.get("seed"),
                       uppercase=opts.get("uppercase", True))
        return [{"id": i, "prompt": s, "generated": g, "logprobs": _tolist(lp)}
                for i, s, g, lp in zip(ids, seqs, out.sequences, out.logprobs)]
    layers = (opts.get("layers") or [-1]) if task == "embed" else None
    n_blocks = len(model.blocks)
    for i in layers or []:
        if not -n_blocks <= int(i) < n_blocks:
            raise ValueError(f"prediction.layers={list(layers)}: block {i} does not exist in a model of {n_blocks} "
                             f"blocks; use 0..{n_blocks - 1}, or negative indices from the end (-1: the last block)")
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
            rec["token_logprobs"] = sc.token_logprobs.float()
        if sc.embeddings:
            dtype = DTYPES[opts.get("dtype") or "float32"]
            rec["embeddings"] = {str(k): v.to(dtype) for k, v in sc.embeddings.items()}
        records.append(rec)
    return records


def _check_options(*, task: str, batch_size: int, max_length: int | None, pool: str, dtype: str,
                   max_new_tokens: int, temperature: float, top_k: int, top_p: float, alphabet: str | None,
                   window_size: int, num_workers: int) -> None:
    """Refuse every impossible prediction setting up front, naming it, before any model or file is touched."""
    problems = []
    if task not in TASKS:
        problems.append(f"prediction.task must be one of {TASKS}, got {task!r}")
    if batch_size < 1:
        problems.append(f"prediction.batch_size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        problems.append(f"prediction.max_length must be >= 1 or null (no truncation), got {max_length}")
    if pool not in POOLS:
        problems.append(f"prediction.pool must be one of {POOLS}, got {pool!r}")
    if dtype not in DTYPES:
        problems.append(f"prediction.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if max_new_tokens < 1:
        problems.append(f"prediction.max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"prediction.temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        problems.append(f"prediction.top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"prediction.top_p must be in (0, 1] (1 = off), got {top_p}")
    if alphabet is not None and not alphabet:
        problems.append("prediction.alphabet must name at least one character, or be null (no restriction)")
    if window_size < 2:
        problems.append(f"prediction.window_size must be >= 2 bases, got {window_size}")
    if num_workers < 0:
        problems.append(f"prediction.num_workers must be >= 0, got {num_workers}")
    if problems:
        raise ValueError("; ".join(problems))


class PredictDataModule(L.LightningDataModule):
    """Sequences (or variants) to predict on, and what to compute for them.

    Args:
        path: FASTA (optionally compressed) or text file, one sequence per line (told apart by content); for
            ``task: variants``, a VCF (plain, ``.gz`` or bgzip) or TSV ``chrom, pos, ref, alt``.
        output: where ``sh2 predict`` writes the records; the suffix picks the format (``.jsonl``, ``.tsv``,
            ``.parquet``, ``.npy``, ``.safetensors``, ``.pt``; see :mod:`sh2.inference.outputs`).
        task: ``score`` (log-probabilities), ``embed`` (scores + hidden states), ``generate`` or ``variants``
            (log-likelihood change of each variant in its window of the reference).
        batch_size: sequences (variants) per batch (right-padded for scoring, left-padded for generation).
        max_length: truncate sequences to this many characters.
        uppercase: upper-case sequences before tokenizing (Evo 2 was trained on upper case).
        reverse_complement: score, variants: average with the reverse complement's score.
        per_token: score: also output per-token log-probabilities.
        layers: embed: block indices whose outputs are returned (default ``[-1]``).
        pool: embed: ``mean``, ``last`` or ``none`` (per-token).
        dtype: embed: ``float32``, ``float16`` or ``bfloat16`` for the embeddings written.
        max_new_tokens: generate: tokens per prompt.
        temperature: generate: sampling temperature (0 = greedy).
        top_k: generate: top-k filter (0 = off).
        top_p: generate: nucleus filter (1 = off).
        alphabet: generate: restrict sampling to these characters (e.g. ``ACGT``).
        seed: generate: seed of the sampling generator (default: torch's global generator). ``sh2 predict``
            does not take it: there, ``seed_everything`` seeds the sampling.
        reference: variants: the reference FASTA (indexed on first use, see
            :class:`sh2.data.fasta_index.IndexedFasta`). With ``path`` and ``reference`` both unset, the
            built-in sample variants on the built-in phage genomes are scored.
        window_size: variants: bases per scored window (centred on the variant).
        num_workers: DataLoader workers.
    """

    def __init__(self, path: str | None = None, output: str = "predictions.jsonl", task: str = "score",
                 batch_size: int = 8, max_length: int | None = None,
                 uppercase: bool = True, reverse_complement: bool = False, per_token: bool = False,
                 layers: list[int] | None = None, pool: str = "mean", dtype: str = "float32",
                 max_new_tokens: int = 100, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 alphabet: str | None = None, seed: int | None = None, reference: str | None = None,
                 window_size: int = 8192, num_workers: int = 0) -> None:
        super().__init__()
        _check_options(task=task, batch_size=batch_size, max_length=max_length, pool=pool, dtype=dtype,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       alphabet=alphabet, window_size=window_size, num_workers=num_workers)
        check_output(output, task, pool, dtype, per_token)
        if task == "variants" and (path is None) != (reference is None):
            missing = "reference" if reference is None else "path"
            raise ValueError(f"prediction.{missing} is not set: task variants needs both the variant file "
                             f"(prediction.path: VCF or TSV) and the reference FASTA (prediction.reference); "
                             f"leave both unset for the built-in phage example")
        self.path, self.batch_size, self.max_length, self.num_workers = path, batch_size, max_length, num_workers
        self.output, self.task, self.reference, self.window_size = output, task, reference, window_size
        self.options = dict(task=task, uppercase=uppercase, reverse_complement=reverse_complement,
                            per_token=per_token, layers=layers, pool=pool, dtype=dtype,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            alphabet=alphabet, seed=seed)
        self._variants: Any = None

    def setup(self, stage: str) -> None:
        """For ``variants``: index the reference and check every record now, before the model is loaded."""
        if self.task == "variants" and self._variants is None:
            self._variants = self._variant_batches()

    def _variant_batches(self) -> Any:
        from sh2.inference.variants import VariantBatches

        path, reference = self.path, self.reference
        if path is None:
            import importlib.resources

            from sh2.data.sources import DEMO_FASTA

            samples = importlib.resources.files("sh2.data") / "samples"
            path, reference = str(samples / SAMPLE_VARIANTS), str(samples / DEMO_FASTA)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return VariantBatches(path, reference, self.window_size, self.batch_size, self.options, rank, world)

    def predict_dataloader(self) -> DataLoader:
        if self.task == "variants":
            self.setup("predict")
            # VariantBatches splits its batches over workers itself (so its length is exact), and the writer
            # needs no batch indices: Lightning's warnings about both do not apply
            warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
            warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices")
            return DataLoader(self._variants, batch_size=None, num_workers=self.num_workers)
        if self.path is None:
            raise ValueError("prediction.path is not set: name the FASTA or text file of sequences to predict on "
                             "(sh2 predict --config ... --prediction.path seqs.fasta)")
        loader = predict_dataloader(self.path, self.batch_size, self.max_length, self.num_workers, **self.options)
        notice = nucleotide_notice(loader.dataset.records)
        if notice and (self.trainer is None or self.trainer.is_global_zero):
            from sh2.training.callbacks import say

            say(notice)
        return loader


def predict_dataloader(path: str, batch_size: int = 8, max_length: int | None = None, num_workers: int = 0,
                       **options: Any) -> DataLoader:
    """A DataLoader of :class:`SequenceDataset` batches carrying ``options`` (see :class:`PredictDataModule`)."""
    return DataLoader(SequenceDataset(path, max_length), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=partial(collate, options=options))


def _records_expected(trainer: L.Trainer) -> int | None:
    """Records this process will predict on (the length of its predict sampler), when known."""
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if loader is None:
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    try:
        return len(sampler) if sampler is not None else len(loader.dataset)
    except TypeError:
        return None


class PredictionWriter(BasePredictionWriter):
    """Writes the records of :func:`predict_batch` to ``output`` as batches finish, and prints where.

    Args:
        output: file to write; its suffix picks the format (see :mod:`sh2.inference.outputs`): ``.jsonl``/
            ``.json`` (one JSON object per line, tensors as lists), ``.tsv``, ``.parquet``, ``.npy`` (pooled
            embeddings, scalars in ``NAME.tsv``), ``.safetensors``, or ``.pt`` (a list of records, tensors
            kept; held in memory until the end). Parent directories are created. With several processes,
            each rank writes ``NAME.rankR.EXT``.
    """

    def __init__(self, output: str) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._sink: Any = None
        self._path: Path | None = None

    def _target(self, trainer: L.Trainer) -> Path:
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._path = self._target(trainer)
        expected = _records_expected(trainer) if self._path.suffix.lower() == ".npy" else None
        self._sink = open_sink(self._path, expected)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if self._sink is None:
            self.on_predict_start(trainer, pl_module)
        self._sink.write(list(prediction or []))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sink is None:
            return
        sink, self._sink = self._sink, None
        paths = sink.close()
        where = ", ".join(str(p.resolve()) for p in paths)
        sys.stdout.write(f"[sh2] predictions: {sink.count} records written to {where}\n")  # one write per rank
        sys.stdout.flush()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
