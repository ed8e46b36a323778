"""Opening data files: compression read from the content, FASTA recognised by its content, and read errors that
name the file.

A compressed file (gzip or bgzip, bzip2, xz) is recognised by its first bytes, so a gzipped FASTA named ``.fa``
is read like one named ``.fa.gz``; a file whose name promises compression it does not have (``.gz`` holding plain
text) is refused rather than guessed at. A damaged file (a truncated download, a corrupt block) fails with a
:class:`DataFileError` that names it, wherever the damage is met: at opening or after gigabytes of streaming.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zlib
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["DataFileError", "compression_of", "is_fasta", "iter_lines", "open_binary", "open_text"]

_MAGIC = {b"\x1f\x8b": "gzip", b"BZ": "bzip2", b"\xfd7": "xz"}
_SUFFIX = {".gz": "gzip", ".bgz": "gzip", ".bz2": "bzip2", ".xz": "xz"}
_OPENERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
# what decompressors and the file system raise on a damaged or truncated file (gzip.BadGzipFile is an OSError)
_DAMAGED = (EOFError, OSError, lzma.LZMAError, zlib.error)


class DataFileError(ValueError):
    """A data file that cannot be read as what it claims to be; the message names the file and the fix."""


def compression_of(path: str | os.PathLike) -> str | None:
    """``gzip`` (also bgzip), ``bzip2`` or ``xz`` from the file's first bytes; None for a plain file."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return _MAGIC.get(head)


def _damaged(path: str | os.PathLike, kind: str | None, err: BaseException) -> DataFileError:
    what = f"{kind}-compressed " if kind else ""
    check = {"gzip": "gzip -t", "bzip2": "bzip2 -t", "xz": "xz -t"}.get(kind or "")
    hint = f" (`{check} {path}` checks it)" if check else ""
    return DataFileError(f"{what}file {path} is truncated or corrupt ({type(err).__name__}: {err}); download or "
                         f"copy it again{hint}")


class _NamedErrors(io.RawIOBase):
    """A read-only file proxy whose read errors name the file (see :func:`open_binary`)."""

    def __init__(self, fh: IO[Any], path: str | os.PathLike, kind: str | None) -> None:
        super().__init__()
        self._fh, self._path, self._kind = fh, path, kind

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._fh.readinto(buffer)
        except _DAMAGED as err:
            raise _damaged(self._path, self._kind, err) from None

    def close(self) -> None:
        self._fh.close()
        super().close()


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """A binary handle on a plain, gzip/bgzip, bzip2 or xz file, decompressed by content.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFileError: the name ends in a compression suffix the content does not have, or (while reading)
            the file is truncated or corrupt; the message names the file.
    """
    kind = compression_of(path)
    suffix = os.path.splitext(str(path))[1].lower()
    named = _SUFFIX.get(suffix)
    if named is not None and kind != named:
        with open(path, "rb") as fh:
            head = fh.read(12)
        raise DataFileError(f"{path} is named {suffix} but is not {named} data (it starts with {head!r}); "
                            f"rename it to what it holds, or compress it")
    raw: IO[bytes] = _OPENERS[kind](path, "rb") if kind else open(path, "rb")
    return io.BufferedReader(_NamedErrors(raw, path, kind))


def open_text(path: str | os.PathLike) -> IO[str]:
    """A UTF-8 text handle on a plain or compressed file (see :func:`open_binary`)."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace")


def iter_lines(path: str | os.PathLike) -> Iterator[bytes]:
    """The lines of a plain or compressed file, as bytes (see :func:`open_binary`)."""
    with open_binary(path) as fh:
        yield from fh


def is_fasta(path: str | os.PathLike) -> bool:
    """Whether the file's first non-blank line is a FASTA header (``>``), whatever its name."""
    with open_binary(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                return line.startswith(b">")
    return False
