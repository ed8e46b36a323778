"""Random access to reference genomes: a samtools-compatible ``.fai`` index and :class:`IndexedFasta`.

A ``.fai`` file has one tab-separated line per record: ``name, length, offset, linebases, linewidth``
(the record's name is the first word of its header; ``offset`` is the byte where its sequence starts;
every sequence line but the last holds ``linebases`` bases in ``linewidth`` bytes, newline included). With
it, bases ``[start, end)`` of a record are one ``seek`` and one ``read`` away, whatever the genome's size.

:class:`IndexedFasta` reads an existing ``REF.fai`` (written by ``samtools faidx`` or by sh2) or builds it
in one streaming pass: beside the FASTA when that folder is writable, else in a cache folder
(``$XDG_CACHE_HOME/sh2/fai``, default ``~/.cache/sh2/fai``). An index older than its FASTA is rebuilt.

Compressed references (``.gz``, including bgzip, ``.bz2``, ``.xz``) cannot be indexed this way. Small ones
(at most :data:`MAX_IN_MEMORY_COMPRESSED` bytes on disk, e.g. the built-in phage genomes or a bacterial
genome) are read into memory once; larger ones are refused with the commands that make them indexable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sh2.checkpoints.files import give_default_permissions
from sh2.data.files import compression_of, open_text

__all__ = ["FaiEntry", "FastaIndexError", "IndexedFasta", "build_fai", "read_fai", "write_fai",
           "MAX_IN_MEMORY_COMPRESSED"]

MAX_IN_MEMORY_COMPRESSED = 64 * 2**20  # bytes on disk: about 250 MB of sequence for DNA


class FastaIndexError(ValueError):
    """A reference FASTA that cannot be indexed or read; the message names the file, record and fix."""


@dataclass(frozen=True)
class FaiEntry:
    """One line of a ``.fai`` index (samtools' five columns)."""

    name: str
    length: int
    offset: int
    linebases: int
    linewidth: int

    def byte_of(self, pos: int) -> int:
        """File offset of 0-based base ``pos`` (``pos == length`` is the end of the sequence)."""
        if self.linebases == 0:
            return self.offset
        return self.offset + pos // self.linebases * self.linewidth + pos % self.linebases


def build_fai(path: str | os.PathLike) -> list[FaiEntry]:
    """Index a plain FASTA in one streaming pass (constant memory).

    Raises:
        FastaIndexError: a record whose lines have uneven lengths (samtools refuses those too), a blank
            line inside a record, sequence before the first header, a duplicate name, or no record.
    """
    path = Path(path)
    entries: list[FaiEntry] = []
    seen: set[str] = set()
    name: str | None = None
    offset = length = linebases = linewidth = 0
    short_line: int | None = None  # line number of a line shorter than linebases (must be the record's last)
    blank_line: int | None = None

    def finish() -> None:
        if name is not None:
            entries.append(FaiEntry(name, length, offset, linebases, linewidth))

    pos = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            size = len(line)
            if line.startswith(b">"):
                finish()
                header = line[1:].decode("utf-8", errors="replace").strip()
                name = header.split(maxsplit=1)[0] if header else ""
                if not name:
                    raise FastaIndexError(f"{path} line {lineno}: a '>' header without a name")
                if name in seen:
                    raise FastaIndexError(f"{path} line {lineno}: record name {name!r} appears twice; names (the "
                                          f"first word of each header) must be unique for random access")
                seen.add(name)
                offset, length, linebases, linewidth = pos + size, 0, 0, 0
                short_line = blank_line = None
            else:
                bases = len(line.rstrip(b"\r\n"))
                if name is None:
                    if bases:
                        raise FastaIndexError(f"{path} line {lineno}: sequence before the first '>' header; "
                                              f"is this a FASTA file?")
                elif bases == 0:
                    blank_line = lineno if blank_line is None else blank_line
                else:
                    if blank_line is not None or short_line is not None:
                        bad = blank_line if blank_line is not None else short_line
                        raise FastaIndexError(
                            f"{path} line {bad}: record {name!r} has lines of uneven length (or a blank line) "
                            f"inside its sequence, so it cannot be indexed for random access. Rewrap it with "
                            f"fixed-width lines, e.g. `seqkit seq -w 60 {path.name}` or `samtools faidx` after "
                            f"`fold -w 60`")
                    if linebases == 0:
                        linebases, linewidth = bases, size
                    elif bases > linebases or (bases == linebases and size != linewidth):
                        raise FastaIndexError(
                            f"{path} line {lineno}: record {name!r} has lines of uneven length ({bases} bases, "
                            f"the record's first line has {linebases}); rewrap it with fixed-width lines (e.g. "
                            f"`seqkit seq -w 60`)")
                    elif bases < linebases:
                        short_line = lineno
                    length += bases
            pos += size
    finish()
    if not entries:
        raise FastaIndexError(f"{path} has no '>' record; pass a FASTA reference")
    return entries


def write_fai(entries: list[FaiEntry], path: str | os.PathLike) -> None:
    """Write ``entries`` as a ``.fai`` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    text = "".join(f"{e.name}\t{e.length}\t{e.offset}\t{e.linebases}\t{e.linewidth}\n" for e in entries)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        give_default_permissions(tmp)  # mkstemp makes the file private; an index is shared like its FASTA
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_fai(path: str | os.PathLike) -> list[FaiEntry]:
    """Entries of a ``.fai`` file (samtools' FASTA index; five columns per line).

    Raises:
        FastaIndexError: a line that is not five tab-separated fields with integer columns 2-5.
    """
    entries = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.rstrip("\n").split("\t")
            try:
                if len(fields) != 5:
                    raise ValueError
                entries.append(FaiEntry(fields[0], *(int(f) for f in fields[1:])))
            except ValueError:
                raise FastaIndexError(f"{path} line {lineno}: not a FASTA .fai line (name, length, offset, "
                                      f"linebases, linewidth); delete the file and sh2 rebuilds it") from None
    return entries


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sh2" / "fai"


def fai_location(fasta: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the index of ``fasta`` lives: ``FASTA.fai`` beside it when that exists or the folder is writable,
    else a file in the cache folder named after a hash of the FASTA's absolute path."""
    beside = fasta.with_name(fasta.name + ".fai")
    if beside.is_file() or os.access(fasta.parent, os.W_OK):
        return beside
    key = hashlib.sha1(str(fasta.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir or _cache_dir()) / f"{key}-{fasta.name}.fai"


class IndexedFasta:
    """Bases of any record of a reference FASTA by position, without reading the whole file.

    Example:
        >>> ref = IndexedFasta("GRCh38.fa")        # builds GRCh38.fa.fai on first use
        >>> ref.fetch("chr17", 43_044_294, 43_044_304)   # 0-based, end excluded
        >>> ref.length("chr17"), "chrM" in ref

    Args:
        path: plain FASTA (any line width, uniform within a record), or a small compressed one (see the
            module docstring).
        cache_dir: where to write the index when the FASTA's folder is read-only (default
            ``$XDG_CACHE_HOME/sh2/fai``).
    """

    def __init__(self, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"reference FASTA {self.path} does not exist")
        self._fh: IO[bytes] | None = None
        self._memory: dict[str, str] | None = None
        kind = compression_of(self.path)
        if kind is not None:
            self._memory = self._read_compressed(kind)
            self.index_path: Path | None = None
            self._lengths = {name: len(seq) for name, seq in self._memory.items()}
            return
        self.index_path = fai_location(self.path, cache_dir)
        entries = self._load_or_build_index()
        self._entries = {e.name: e for e in entries}
        self._lengths = {e.name: e.length for e in entries}

    def _read_compressed(self, kind: str) -> dict[str, str]:
        size = self.path.stat().st_size
        if size > MAX_IN_MEMORY_COMPRESSED:
            plain = self.path.with_suffix("") if self.path.suffix in (".gz", ".bgz", ".bz2", ".xz") else self.path
            raise FastaIndexError(
                f"reference {self.path} is {kind}-compressed and {size / 2**20:.0f} MiB: sh2 reads compressed "
                f"references into memory only up to {MAX_IN_MEMORY_COMPRESSED // 2**20} MiB and indexes plain "
                f"FASTA files for random access. Decompress it once (e.g. `gunzip -c {self.path.name} > "
                f"{plain.name}`, or `bgzip -d -k` for bgzip) and pass {plain.name}; sh2 writes {plain.name}.fai "
                f"(the same index as `samtools faidx {plain.name}`)")
        records: dict[str, str] = {}
        name: str | None = None
        chunks: list[str] = []
        with open_text(self.path) as fh:
            for line in fh:
                if line.startswith(">"):
                    if name is not None:
                        records[name] = "".join(chunks)
                    name, chunks = (line[1:].split(maxsplit=1) or [""])[0], []
                    if not name or name in records:
                        raise FastaIndexError(f"{self.path}: record name {name!r} is empty or appears twice; "
                                              f"names (the first word of each header) must be unique")
                elif name is not None and not line.startswith(";"):
                    chunks.append(line.strip())
        if name is not None:
            records[name] = "".join(chunks)
        if not records:
            raise FastaIndexError(f"{self.path} has no '>' record with sequence; pass a FASTA reference")
        return records

    def _load_or_build_index(self) -> list[FaiEntry]:
        fai = self.index_path
        assert fai is not None
        if fai.is_file() and fai.stat().st_mtime >= self.path.stat().st_mtime:
            return read_fai(fai)
        entries = build_fai(self.path)
        try:
            fai.parent.mkdir(parents=True, exist_ok=True)
            write_fai(entries, fai)
        except OSError:
            pass  # an unwritable index location costs a re-scan next time, nothing else
        return entries

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        """Record names in file order."""
        return list(self._lengths)

    def __contains__(self, name: object) -> bool:
        return name in self._lengths

    def length(self, name: str) -> int:
        """Bases in record ``name`` (KeyError if there is none)."""
        return self._lengths[name]

    def fetch(self, name: str, start: int, end: int) -> str:
        """Bases ``[start, end)`` (0-based) of record ``name``, as stored (case kept).

        Raises:
            KeyError: no such record.
            FastaIndexError: a range outside the record, or an index that no longer matches the file.
        """
        n = self._lengths[name]
        if not 0 <= start <= end <= n:
            raise FastaIndexError(f"{self.path}: range [{start}, {end}) is outside record {name!r} (length {n})")
        if self._memory is not None:
            return self._memory[name][start:end]
        entry = self._entries[name]
        if self._fh is None:
            self._fh = open(self.path, "rb")
        first, last = entry.byte_of(start), entry.byte_of(end)
        self._fh.seek(first)
        raw = self._fh.read(last - first)
        seq = raw.replace(b"\n", b"").replace(b"\r", b"").decode("ascii", errors="replace")
        if len(seq) != end - start or ">" in seq:
            raise FastaIndexError(f"{self.index_path} does not match {self.path} (record {name!r}): the FASTA "
                                  f"changed after it was indexed; delete {self.index_path} and sh2 rebuilds it")
        return seq

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict:  # DataLoader workers: each process opens its own file handle
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def __iter__(self) -> Iterator[str]:
        return iter(self._lengths)
