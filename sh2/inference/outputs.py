"""Where ``sh2 predict`` writes its records: one sink per file format, each written batch by batch.

==========  ===================================================  ==========================================
suffix      holds                                                memory
==========  ===================================================  ==========================================
``.jsonl``  any record, one JSON object per line                 one batch
``.tsv``    records of scalars (scores, variant rows)            one batch
``.parquet`` any record; vectors as list columns, one row group  one batch
            per batch
``.npy``    pooled embeddings ``[N, D]`` (``[N, layers, D]`` for  one batch (a preallocated memory map sized
            several layers), scalars in ``NAME.tsv`` beside it   from the record count)
``.safetensors`` embeddings (pooled ``[N, D]`` or per token,     one batch (tensors stream to temporary
            concatenated ``[T, D]`` with ``offsets [N + 1]``),   files, joined into the file at the end)
            scores, per-token log-probabilities ``[T]``
``.pt``     a list of the records (``torch.save``)              every record (kept until the end)
==========  ===================================================  ==========================================

Records are the dicts of :func:`sh2.inference.predict.predict_batch` (``id``, ``length``, ``logprob_sum``...,
``token_logprobs`` and ``embeddings`` ``{layer: tensor}``) or the flat rows of variant scoring.

Every sink writes to a hidden staging file beside the output (``.NAME.tmp-PID``) and renames it into place in
``close()``; ``abort()`` deletes it. A prediction that fails, or is interrupted, therefore leaves an existing
output file byte for byte as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["OUTPUT_SUFFIXES", "RecordSink", "check_output", "open_sink"]

OUTPUT_SUFFIXES = (".jsonl", ".json", ".tsv", ".parquet", ".npy", ".safetensors", ".pt")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64"}


def check_output(output: str, task: str, pool: str, dtype: str, per_token: bool) -> None:
    """Raise ``ValueError`` (naming ``prediction.output`` and the fix) when ``output``'s format cannot hold
    what ``task`` produces."""
    suffix = Path(output).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"prediction.output={output!r}: unknown format {suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(OUTPUT_SUFFIXES)}")
    if suffix == ".tsv" and (task in ("embed", "generate") or per_token):
        raise ValueError(f"prediction.output={output!r}: a .tsv holds scalar columns only; write embeddings, "
                         f"per-token values and generations to .parquet, .safetensors, .npy or .jsonl")
    if suffix == ".npy" and (task != "embed" or pool == "none"):
        raise ValueError(f"prediction.output={output!r}: a .npy holds pooled embeddings (prediction.task: embed, "
                         f"pool: mean or last); use .safetensors or .parquet for per-token embeddings and .tsv or "
                         f".parquet for scores")
    if suffix == ".safetensors" and task in ("generate", "variants"):
        raise ValueError(f"prediction.output={output!r}: .safetensors holds embeddings and scores; write "
                         f"{task} results to .tsv, .parquet or .jsonl")
    if dtype == "bfloat16" and suffix in (".npy", ".parquet"):
        raise ValueError(f"prediction.output={output!r}: {suffix} has no bfloat16 type; set prediction.dtype to "
                         f"float16 or float32, or write .safetensors")


def staging_path(path: Path) -> Path:
    """The hidden file beside ``path`` that a sink writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class RecordSink:
    """Base class: ``write(records)`` per batch, ``close()`` at the end, ``abort()`` on failure.

    Subclasses write to :attr:`staging` and implement :meth:`finish`; ``close`` renames the staging file to
    :attr:`path`, so the output appears whole or not at all.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.staging = staging_path(path)
        self.count = 0

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Complete the staging file (flush buffers, write footers)."""

    def close(self) -> list[Path]:
        """Finish the file(s) and move them into place; returns the paths written."""
        self.finish()
        os.replace(self.staging, self.path)
        return [self.path]

    def abort(self) -> None:
        """Delete the staging file after an error; an existing output file is left as it was."""
        self.staging.unlink(missing_ok=True)


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors as (float) lists and NaN as None."""
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().float().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None  # NaN is not JSON
    return obj


class JsonlSink(RecordSink):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.staging.write_text("")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        with open(self.staging, "a") as fh:
            for rec in records:
                fh.write(json.dumps(jsonable(rec)) + "\n")
        self.count += len(records)


class PtSink(RecordSink):
    """Keeps every record until the end (``torch.save`` writes one object); use another format at scale."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.records: list[dict[str, Any]] = []

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.records.extend(records)
        self.count += len(records)

    def finish(self) -> None:
        torch.save(self.records, self.staging)


def _scalars(rec: dict[str, Any], where: Path) -> dict[str, Any]:
    out = {}
    for key, value in rec.items():
        if isinstance(value, (dict, list, tuple, torch.Tensor)):
            raise ValueError(f"{where}: field {key!r} is not a scalar; a .tsv holds scalar columns only (write "
                             f".parquet, .safetensors or .jsonl)")
        out[key] = value
    return out


def _tsv_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NA"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace("\t", " ").replace("\n", " ")


class TsvSink(RecordSink):
    """Tab-separated, a header line of the first record's keys; scalar fields only."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.columns: list[str] | None = None
        self.staging.write_text("")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        lines = []
        for rec in records:
            rec = _scalars(rec, self.path)
            if self.columns is None:
                self.columns = list(rec)
                lines.append("\t".join(self.columns))
            lines.append("\t".join(_tsv_cell(rec.get(c)) for c in self.columns))
        with open(self.staging, "a") as fh:
            fh.write("".join(line + "\n" for line in lines))
        self.count += len(records)


def _flatten(rec: dict[str, Any]) -> dict[str, Any]:
    """Embeddings ``{layer: tensor}`` as ``embedding_<layer>`` columns."""
    out = {k: v for k, v in rec.items() if k != "embeddings"}
    for layer, tensor in (rec.get("embeddings") or {}).items():
        out[f"embedding_{layer}"] = tensor
    return out


class ParquetSink(RecordSink):
    """One row group per batch. Vectors become list columns (pooled embedding: ``D`` values; per-token
    embedding: ``n`` lists of ``D``; per-token log-probabilities: ``n - 1`` values)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writer: Any = None
        self.schema: Any = None

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not records:
            return
        rows = [_flatten(r) for r in records]
        columns = {}
        for key in rows[0]:
            values = [r.get(key) for r in rows]
            columns[key] = (_tensor_column(pa, values, fixed=key.startswith("embedding_"))
                            if isinstance(values[0], torch.Tensor) else values)
        table = pa.table(columns) if self.schema is None else pa.table(columns, schema=self.schema)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(str(self.staging), self.schema)
        self.writer.write_table(table)
        self.count += len(records)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        else:  # no record at all: an empty file with no columns
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), str(self.staging))

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        super().abort()


def _tensor_column(pa: Any, tensors: list[torch.Tensor], fixed: bool) -> Any:
    """An Arrow column of per-record tensors (float16 stays float16, everything else becomes float32):
    ``[D]`` with ``fixed`` (a pooled embedding) -> fixed_size_list<D>; ``[n]`` -> large_list;
    ``[n, D]`` -> large_list<fixed_size_list<D>>."""
    np_dtype = np.float16 if tensors[0].dtype == torch.float16 else np.float32
    flat = pa.array(np.concatenate([t.detach().cpu().to(torch.float32).numpy().astype(np_dtype).reshape(-1)
                                    for t in tensors]))
    if tensors[0].dim() == 1 and fixed:
        return pa.FixedSizeListArray.from_arrays(flat, tensors[0].numel())
    if tensors[0].dim() == 2:
        flat = pa.FixedSizeListArray.from_arrays(flat, int(tensors[0].shape[-1]))
    offsets = np.cumsum([0] + [t.shape[0] for t in tensors]).astype(np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat)


class NpySink(RecordSink):
    """Pooled embeddings in a preallocated ``.npy`` memory map, scalar fields in ``NAME.tsv`` beside it.

    Args:
        path: the ``.npy`` file.
        num_records: rows to allocate (this process's record count).
    """

    def __init__(self, path: Path, num_records: int) -> None:
        super().__init__(path)
        self.num_records = num_records
        self.array: np.memmap | None = None
        self.layers: list[str] | None = None
        self.table = TsvSink(path.with_suffix(".tsv"))

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for rec in records:
            emb = rec.get("embeddings") or {}
            if not emb or any(v.dim() != 1 for v in emb.values()):
                raise ValueError(f"{self.path}: a .npy holds pooled embeddings (prediction.task: embed with pool "
                                 f"mean or last); write per-token embeddings to .safetensors or .parquet")
            if self.array is None:
                self.layers = list(emb)
                first = emb[self.layers[0]]
                dtype = np.float16 if first.dtype == torch.float16 else np.float32
                shape = (self.num_records, first.numel()) if len(emb) == 1 else \
                    (self.num_records, len(emb), first.numel())
                self.array = np.lib.format.open_memmap(self.staging, mode="w+", dtype=dtype, shape=shape)
            if self.count >= self.num_records:
                raise RuntimeError(f"{self.path}: more records than the {self.num_records} allocated")
            rows = [emb[k].to(torch.float32).numpy() for k in self.layers]
            self.array[self.count] = rows[0] if len(rows) == 1 else np.stack(rows)
            self.count += 1
        self.table.write([{k: v for k, v in rec.items() if k not in ("embeddings", "token_logprobs")}
                          for rec in records])

    def close(self) -> list[Path]:
        if self.array is not None:
            self.array.flush()
            del self.array
            self.array = None
        if self.count != self.num_records:
            raise RuntimeError(f"{self.path}: {self.count} records written into an array allocated for "
                               f"{self.num_records}")
        if self.staging.exists():
            os.replace(self.staging, self.path)
        return [self.path, *self.table.close()]

    def abort(self) -> None:
        self.array = None
        super().abort()
        self.table.abort()


class SafetensorsSink(RecordSink):
    """Embeddings and scores as one ``.safetensors`` file, streamed through temporary files.

    Tensors: ``embeddings.<layer>`` (``[N, D]`` pooled, or ``[T, D]`` per token with the records
    concatenated), ``offsets`` ``[N + 1]`` (record ``i`` is rows ``offsets[i]:offsets[i + 1]``; present for
    per-token output), ``length`` ``[N]``, ``logprob_sum``/``logprob_mean`` ``[N]`` (float64), and with
    per-token scores ``token_logprobs`` ``[T]`` (float32, aligned with the per-token rows: NaN at each
    record's first token, which has no prediction). Metadata: ``ids`` (a JSON list) and ``format``.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        self.parts: dict[str, tuple[Any, torch.dtype, tuple[int, ...], int]] = {}  # name: (fh, dtype, tail, rows)
        self.ids: list[str] = []
        self.tokens = 0
        self.per_token: bool | None = None

    def _append(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        if name not in self.parts:
            fh = open(self.tmpdir / f"{len(self.parts)}.bin", "wb")
            self.parts[name] = (fh, t.dtype, tuple(t.shape[1:]), 0)
        fh, dtype, tail, rows = self.parts[name]
        if t.dtype != dtype or tuple(t.shape[1:]) != tail:
            raise ValueError(f"{self.path}: {name} changes from {dtype} {list(tail)} to {t.dtype} "
                             f"{list(t.shape[1:])} between records")
        fh.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self.parts[name] = (fh, dtype, tail, rows + t.shape[0])

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        for rec in records:
            if "length" not in rec:
                raise ValueError(f"{self.path}: .safetensors holds embeddings and scores, not {sorted(rec)}")
            emb = rec.get("embeddings") or {}
            per_token = any(v.dim() == 2 for v in emb.values()) or rec.get("token_logprobs") is not None
            if self.per_token is None:
                self.per_token = per_token
                if per_token:
                    self._append("offsets", torch.zeros(1, dtype=torch.int64))
            n = int(rec["length"])
            for layer, tensor in emb.items():
                self._append(f"embeddings.{layer}", tensor if tensor.dim() == 2 else tensor[None])
            if rec.get("token_logprobs") is not None:
                lp = torch.as_tensor(rec["token_logprobs"], dtype=torch.float32).reshape(-1)
                self._append("token_logprobs", torch.cat([torch.full((1,), float("nan")), lp]))
            if self.per_token:
                self.tokens += n
                self._append("offsets", torch.tensor([self.tokens], dtype=torch.int64))
            self._append("length", torch.tensor([n], dtype=torch.int64))
            for key in ("logprob_sum", "logprob_mean"):
                self._append(key, torch.tensor([float(rec[key])], dtype=torch.float64))
            self.ids.append(str(rec.get("id", self.count)))
            self.count += 1

    def finish(self) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "ids": json.dumps(self.ids),
                                                   "producer": "sh2 predict"}}
        begin = 0
        for name, (fh, dtype, tail, rows) in self.parts.items():
            fh.close()
            size = Path(fh.name).stat().st_size
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": [rows, *tail], "data_offsets": [begin, begin + size]}
            begin += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        with open(self.staging, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for fh, *_ in self.parts.values():
                with open(fh.name, "rb") as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def abort(self) -> None:
        for fh, *_ in self.parts.values():
            fh.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        super().abort()


def open_sink(path: str | os.PathLike, num_records: int | None = None) -> RecordSink:
    """The sink for ``path``'s suffix (see the module docstring); parent folders are created.

    Args:
        path: output file.
        num_records: records this process will write (needed by ``.npy``, which preallocates).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return JsonlSink(path)
    if suffix == ".tsv":
        return TsvSink(path)
    if suffix == ".parquet":
        return ParquetSink(path)
    if suffix == ".safetensors":
        return SafetensorsSink(path)
    if suffix == ".npy":
        if num_records is None:
            raise ValueError(f"{path}: a .npy output needs the record count up front")
        return NpySink(path, num_records)
    if suffix == ".pt":
        return PtSink(path)
    raise ValueError(f"prediction.output={str(path)!r}: unknown format {suffix!r}; use one of "
                     f"{', '.join(OUTPUT_SUFFIXES)}")
