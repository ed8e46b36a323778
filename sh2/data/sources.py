"""Document sources: every input becomes a streaming ``datasets.IterableDataset`` of documents.

Three kinds of input are accepted (:func:`load_source` decides which):

* a Hugging Face Hub dataset (``path`` is a dataset name, with optional config ``name``, ``split`` and
  ``data_files``), loaded with ``datasets.load_dataset(..., streaming=True)``;
* local text / json / jsonl / csv / parquet files (a file, a directory or a glob; the builder is inferred
  from the extension or given as ``format``), also through ``load_dataset(builder, streaming=True)``;
* FASTA files (plain, ``.gz``, ``.bz2`` or ``.xz``, compression read from the content; multi-line records;
  recognised by extension, or by a first ``>`` line in a text file or a file of unknown extension), read by
  a generator wrapped in ``datasets.IterableDataset.from_generator`` with one shard per file. One record is
  one document in the ``text`` column; the header is dropped or kept as a ``|header|`` tag prefix. A damaged
  file (truncated, corrupt, or named ``.gz`` without being gzip) raises an error naming it
  (:mod:`sh2.data.files`).

Documents are read with ``IterableDataset.iter`` (not ``__iter__``) so that ``datasets`` does not split
the stream again by DataLoader worker: :mod:`sh2.data.datamodule` assigns every (rank, worker) pair its
part with ``split_dataset_by_node`` itself. Every user mistake raises an error that names the
``data.*`` field to fix.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.resources
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.distributed import split_dataset_by_node

from sh2.data.files import is_fasta, open_binary

FASTA_EXTENSIONS = (".fasta", ".fa", ".fna", ".ffn", ".frn", ".fas", ".fsa", ".seq")
COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz")
BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
FORMATS = ("text", "json", "csv", "parquet", "fasta")
DEMO_FASTA = "phage_genomes.fasta.gz"
_GLOB_CHARS = set("*?[")
_VALIDATION_SALT = b"sh2-validation-split"


@dataclass
class DocumentSource:
    """A document stream plus what is needed to read it and explain it in errors.

    Attributes:
        dataset: The streaming dataset (one example per document).
        text_field: The column that holds the document text.
        description: Human-readable origin (used in error messages and resume fingerprints).
    """

    dataset: datasets.IterableDataset
    text_field: str
    description: str
    files: list[str] = field(default_factory=list)

    def documents(self, part: int = 0, num_parts: int = 1, batch_size: int = 64) -> Iterator[str]:
        """Yields the non-empty documents of one part of the stream, in file order.

        Args:
            part: Index of the part (``0 <= part < num_parts``).
            num_parts: Number of disjoint parts the stream is split into (whole shards when the shard
                count is a multiple of ``num_parts``, else every ``num_parts``-th document).
            batch_size: Examples fetched from ``datasets`` at a time.

        Yields:
            Document texts (``str``; ``bytes`` columns are decoded as UTF-8).

        Raises:
            KeyError: The text field is not a column of the records.
            TypeError: The text field holds something other than strings.
        """
        ds = self.dataset
        if num_parts > 1:
            ds = split_dataset_by_node(ds, rank=part, world_size=num_parts)
        for batch in ds.iter(batch_size=batch_size):
            if self.text_field not in batch:
                raise KeyError(_missing_field_message(self.text_field, list(batch), self.description))
            for text in batch[self.text_field]:
                if text is None:
                    continue
                if isinstance(text, bytes | bytearray):
                    text = bytes(text).decode("utf-8", errors="replace")
                if not isinstance(text, str):
                    raise TypeError(
                        f"data.text_field={self.text_field!r} of {self.description} holds "
                        f"{type(text).__name__} values, not strings; point data.text_field at a text column."
                    )
                if text:
                    yield text

    def check(self) -> None:
        """Fails early when the stream is empty or lacks the text field.

        Raises:
            ValueError: The dataset has no non-empty document.
            KeyError: The text field is missing.
        """
        for _ in self.documents():
            return
        raise ValueError(
            f"{self.description} contains no documents (no non-empty {self.text_field!r} values); "
            "check data.path / data.data_files / data.split."
        )


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Decides, from the document's content alone, whether it is held out for validation.

    The decision hashes the UTF-8 text (BLAKE2b with a fixed salt), so it is the same on every run,
    rank and worker, independent of the order of the stream, and exact duplicates land on the same side.

    Args:
        text: The document.
        val_fraction: Expected fraction of documents held out (0 disables validation).

    Returns:
        True when the document belongs to the validation split.
    """
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=_VALIDATION_SALT).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def load_source(
    path: str | None = None,
    name: str | None = None,
    data_files: str | list[str] | dict[str, Any] | None = None,
    format: str | None = None,
    split: str = "train",
    text_field: str = "text",
    fasta_headers: bool = False,
    setting: str = "data.path",
) -> DocumentSource:
    """Opens a document stream (see the module docstring for the accepted inputs).

    Args:
        path: Hub dataset name, local file, directory or glob; None for the built-in phage FASTA.
        name: Hub dataset configuration name.
        data_files: Files for the builder (hub datasets, or local files with an explicit ``format``).
        format: Force the builder: one of ``text, json, csv, parquet, fasta``.
        split: Split of a hub dataset (local files always form the ``train`` split).
        text_field: Column holding the documents (FASTA sources always use ``text``).
        fasta_headers: Keep FASTA headers as a ``|header|`` tag prefix instead of dropping them.
        setting: The setting ``path`` came from, named in descriptions and errors (``data.val_path`` for
            validation files).

    Returns:
        The :class:`DocumentSource`.

    Raises:
        FileNotFoundError: A local path or glob matches no file, or the hub has no such dataset.
        ConnectionError: A hub dataset while the hub cannot be reached (offline).
        ValueError: Unknown format or extension, mixed formats, FASTA without sequences.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"data.format={format!r} is not supported; use one of {', '.join(FORMATS)} or null.")
    if path is None and data_files is None:
        demo = importlib.resources.files("sh2.data") / "samples" / DEMO_FASTA
        return fasta_source([str(demo)], headers=fasta_headers, description=f"the built-in demo {DEMO_FASTA}")

    if path is not None and (format is not None or _looks_local(path)):
        files = resolve_files(path, setting)
        fmt = format or infer_format(files, setting)
        if fmt == "fasta":
            return fasta_source(files, headers=fasta_headers, description=f"{setting}={path!r}")
        return _builder_source(fmt, files, "train", text_field, f"{setting}={path!r} ({fmt})")

    if path is None:  # data_files with a format (or inferable from their extensions)
        listed = data_files if isinstance(data_files, str | list) else None
        fmt = format or (infer_format(resolve_files_list(listed), "data.data_files") if listed is not None else None)
        if fmt is None:
            raise ValueError("data.data_files given as a dict of splits needs data.format (e.g. 'json').")
        if fmt == "fasta":
            return fasta_source(resolve_files_list(listed or []), fasta_headers, f"data.data_files={data_files!r}")
        return _builder_source(fmt, data_files, split, text_field, f"data.data_files={data_files!r} ({fmt})")

    description = f"hub dataset {setting}={path!r}" + (f", data.name={name!r}" if name else "")
    try:
        ds = datasets.load_dataset(path, name, split=split, streaming=True, data_files=data_files)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Could not find {description} (split {split!r}): {err}. Check {setting}/data.name/data.split, "
            "or give a local file path."
        ) from err
    except ConnectionError as err:  # no network, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set
        raise ConnectionError(
            f"Could not reach the Hugging Face Hub for {description} ({err}). Streaming a hub dataset needs "
            f"network access; on an offline machine download the files first and set {setting} to the local "
            "file, directory or glob (FASTA, text, json/jsonl, csv, parquet)."
        ) from err
    return DocumentSource(ds, text_field, f"{description}, split {split!r}")


def _looks_local(path: str) -> bool:
    if os.path.exists(path) or _GLOB_CHARS & set(path):
        return True
    if path.startswith((".", "/", "~")):
        return True
    return _strip_compression(path.lower()).endswith(FASTA_EXTENSIONS + tuple(BUILDER_BY_EXTENSION))


def _strip_compression(path: str) -> str:
    for ext in COMPRESSION_EXTENSIONS:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _format_of(path: str) -> str | None:
    stem = _strip_compression(path.lower())
    if stem.endswith(FASTA_EXTENSIONS):
        return "fasta"
    return BUILDER_BY_EXTENSION.get(os.path.splitext(stem)[1])


def resolve_files(path: str, setting: str = "data.path") -> list[str]:
    """Expands a local file, directory (recursively, known extensions only) or glob into sorted files; errors
    name ``setting``.

    Raises:
        FileNotFoundError: Nothing matches.
    """
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        found = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if _format_of(f) is not None
        )
        if not found:
            raise FileNotFoundError(
                f"{setting}={path!r} is a directory without text/json/jsonl/csv/parquet/FASTA files."
            )
        return found
    if _GLOB_CHARS & set(path):
        found = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not found:
            raise FileNotFoundError(f"{setting}={path!r}: the glob matches no file.")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{setting}={path!r} does not exist; give an existing file, directory or glob.")
    return [path]


def resolve_files_list(files: str | list[str]) -> list[str]:
    """Resolves every entry of ``data_files`` like :func:`resolve_files` and concatenates them."""
    entries = [files] if isinstance(files, str) else list(files)
    return [f for entry in entries for f in resolve_files(entry, "data.data_files")]


def infer_format(files: list[str], setting: str = "data.path") -> str:
    """Infers the single format of ``files`` from their extensions, and from the content where the extension
    says text or nothing: a file whose first line is a ``>`` header is FASTA (``genome.txt``, ``reads.dna``).

    Raises:
        ValueError: An extension is unknown (and the content is not FASTA) or the files mix formats.
    """
    formats = {}
    for f in files:
        fmt = _format_of(f)
        if fmt in (None, "text") and is_fasta(f):
            fmt = "fasta"
        if fmt is None:
            raise ValueError(
                f"Cannot infer the format of {f!r} from its extension; known: "
                f"{', '.join(sorted(set(BUILDER_BY_EXTENSION) | set(FASTA_EXTENSIONS)))} "
                f"(optionally + {', '.join(COMPRESSION_EXTENSIONS)}). Set data.format to one of {', '.join(FORMATS)}."
            )
        formats.setdefault(fmt, f)
    if len(formats) > 1:
        raise ValueError(f"{setting} mixes formats {sorted(formats)}; point it at files of one format.")
    return next(iter(formats))


def _builder_source(
    fmt: str, data_files: Any, split: str, text_field: str, description: str
) -> DocumentSource:
    kwargs: dict[str, Any] = {}
    if fmt == "csv" and isinstance(data_files, list) and all(f.lower().endswith(".tsv") for f in data_files):
        kwargs["sep"] = "\t"
    ds = datasets.load_dataset(fmt, data_files=data_files, split=split, streaming=True, **kwargs)
    files = data_files if isinstance(data_files, list) else []
    source = DocumentSource(ds, text_field, description, files=files)
    if ds.features is not None and text_field not in ds.features:
        raise KeyError(_missing_field_message(text_field, list(ds.features), description))
    return source


def _missing_field_message(text_field: str, columns: list[str], description: str) -> str:
    return (
        f"data.text_field={text_field!r} is not a column of {description}; "
        f"available columns: {columns}. Set data.text_field to one of them."
    )


def fasta_source(files: list[str], headers: bool = False, description: str = "FASTA") -> DocumentSource:
    """Wraps FASTA files as a streaming dataset with one shard per file.

    Args:
        files: FASTA files (plain or compressed).
        headers: Prefix each sequence with its header as a ``|header|`` tag.
        description: Origin for error messages.

    Returns:
        A :class:`DocumentSource` with columns ``id`` and ``text``.

    Raises:
        ValueError: No file contains a sequence line.
    """
    if not any(_fasta_has_sequence(f) for f in files):
        raise ValueError(
            f"{description}: no FASTA sequences found in {files} (a sequence is a non-empty line after a "
            "'>' header). Check that the files are FASTA, or set data.format."
        )
    features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})
    ds = datasets.IterableDataset.from_generator(
        _fasta_examples, features=features, gen_kwargs={"files": list(files), "headers": headers}
    )
    return DocumentSource(ds, "text", description, files=list(files))


def _fasta_has_sequence(path: str) -> bool:
    seen_header = False
    with open_binary(path) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith(b">"):
                seen_header = True
            elif line and seen_header and not line.startswith(b";"):
                return True
    return False


def read_fasta(path: str, headers: bool = False) -> Iterator[tuple[str, str]]:
    """Yields ``(record_id, document)`` for every record with a non-empty sequence.

    Sequence lines are concatenated with whitespace removed; ``;`` comment lines are skipped; case is
    preserved (soft-masking). With ``headers``, the document is ``|header|sequence`` where ``|`` inside
    the header is replaced by ``/`` so the tag stays one span.

    Args:
        path: FASTA file (plain, ``.gz``, ``.bz2`` or ``.xz``).
        headers: Keep the header as a tag prefix.
    """
    header: bytes | None = None
    chunks: list[bytes] = []

    def emit() -> tuple[str, str] | None:
        seq = b"".join(chunks)
        if header is None or not seq:
            return None
        head = header.decode("utf-8", errors="replace")
        text = seq.decode("utf-8", errors="replace")
        record_id = head.split(maxsplit=1)[0] if head.strip() else ""
        return record_id, (f"|{head.replace('|', '/')}|{text}" if headers else text)

    with open_binary(path) as fh:
        for line in fh:
            if line.startswith(b">"):
                if (record := emit()) is not None:
                    yield record
                header, chunks = line[1:].strip(), []
            elif not line.startswith(b";"):
                chunks.append(b"".join(line.split()))
    if (record := emit()) is not None:
        yield record


def _fasta_examples(files: list[str], headers: bool) -> Iterator[dict[str, str]]:
    for path in files:
        for record_id, text in read_fasta(path, headers):
            yield {"id": record_id, "text": text}
