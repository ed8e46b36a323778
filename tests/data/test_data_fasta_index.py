"""The .fai index (samtools' format) and random access to reference FASTA files."""

from __future__ import annotations

import gzip
import os
import random

import pytest

from sh2.data import fasta_index
from sh2.data.fasta_index import FastaIndexError, IndexedFasta, build_fai, read_fai

# Three records: 10-base lines; 7-base lines with CRLF endings; one line only (a short last line each).
RECORDS = {"chr1": "ACGTACGTAC" * 3 + "GGC", "chr2": "TTTAAAC" * 4 + "ac", "chrM": "GATTACA"}


def write_fasta(path, line_bases=(10, 7, 60), crlf=("chr2",)):
    with open(path, "wb") as fh:
        for (name, seq), width in zip(RECORDS.items(), line_bases):
            end = b"\r\n" if name in crlf else b"\n"
            fh.write(f">{name} description words".encode() + end)
            for i in range(0, len(seq), width):
                fh.write(seq[i:i + width].encode() + end)
    return path


def expected_fai(path) -> str:
    """The index computed by hand from the file's bytes (what `samtools faidx` writes)."""
    data = path.read_bytes()
    lines = []
    for name, seq in RECORDS.items():
        offset = data.index(b"\n", data.index(f">{name}".encode())) + 1
        first = data[offset:data.index(b"\n", offset) + 1]
        linebases = len(first.rstrip(b"\r\n"))
        lines.append(f"{name}\t{len(seq)}\t{offset}\t{linebases}\t{len(first)}\n")
    return "".join(lines)


def test_index_matches_samtools_format_and_every_range_reads_back(tmp_path):
    fasta = write_fasta(tmp_path / "ref.fa")
    ref = IndexedFasta(fasta)
    assert (tmp_path / "ref.fa.fai").read_text() == expected_fai(fasta)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ref.fa.fai").stat().st_mode & 0o777 == 0o666 & ~umask  # shared like its FASTA
    assert ref.names == list(RECORDS) and ref.length("chr2") == len(RECORDS["chr2"])
    for name, seq in RECORDS.items():  # every range, including empty ones and line boundaries
        for start in range(len(seq) + 1):
            for end in range(start, len(seq) + 1):
                assert ref.fetch(name, start, end) == seq[start:end], (name, start, end)
    with pytest.raises(FastaIndexError, match=r"outside record 'chrM' \(length 7\)"):
        ref.fetch("chrM", 3, 8)


def test_existing_index_is_reused_and_rebuilt_when_older_than_the_fasta(tmp_path):
    fasta = write_fasta(tmp_path / "ref.fa")
    fai = tmp_path / "ref.fa.fai"
    fai.write_text(expected_fai(fasta))  # as samtools would have written it
    os.utime(fai, (fasta.stat().st_mtime + 10,) * 2)
    before = fai.stat().st_mtime
    assert IndexedFasta(fasta).fetch("chr1", 8, 12) == RECORDS["chr1"][8:12]
    assert fai.stat().st_mtime == before  # read, not rewritten
    fai.write_text("chr1\t1\t2\t3\t4\n")  # stale content, and older than the FASTA
    os.utime(fai, (fasta.stat().st_mtime - 10,) * 2)
    assert IndexedFasta(fasta).fetch("chr1", 8, 12) == RECORDS["chr1"][8:12]
    assert fai.read_text() == expected_fai(fasta)


def test_read_only_folder_puts_the_index_in_the_cache(tmp_path, monkeypatch):
    # the tests may run as root, for whom chmod cannot make a folder read-only: stand in for os.access
    fasta = write_fasta(tmp_path / "ref.fa")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fasta_index.os, "access", lambda path, mode: False)
    ref = IndexedFasta(fasta)
    assert not (tmp_path / "ref.fa.fai").exists()
    assert ref.index_path.parent == tmp_path / "cache" / "sh2" / "fai"
    assert ref.index_path.read_text() == expected_fai(fasta)
    assert ref.fetch("chr2", 5, 16) == RECORDS["chr2"][5:16]


def test_small_gzip_reference_is_read_into_memory_and_large_one_refused(tmp_path, monkeypatch):
    plain = write_fasta(tmp_path / "ref.fa")
    gz = tmp_path / "ref.fa.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ref = IndexedFasta(gz)
    assert ref.index_path is None and not (tmp_path / "ref.fa.gz.fai").exists()
    rng = random.Random(0)
    for name, seq in RECORDS.items():
        for _ in range(20):
            a = rng.randrange(len(seq) + 1)
            b = rng.randrange(a, len(seq) + 1)
            assert ref.fetch(name, a, b) == seq[a:b]
    monkeypatch.setattr(fasta_index, "MAX_IN_MEMORY_COMPRESSED", 10)
    with pytest.raises(FastaIndexError, match=r"gzip-compressed.*gunzip -c ref\.fa\.gz > ref\.fa.*samtools faidx"):
        IndexedFasta(gz)


def test_the_builtin_phage_genomes_index_like_their_decompressed_copy(tmp_path):
    from importlib.resources import files

    gz = files("sh2.data") / "samples" / "phage_genomes.fasta.gz"
    plain = tmp_path / "phage.fa"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    a, b = IndexedFasta(str(gz)), IndexedFasta(plain)
    assert a.names == b.names and len(a.names) == 56
    assert [e.name for e in read_fai(tmp_path / "phage.fa.fai")] == b.names
    for name in a.names[::7]:
        n = a.length(name)
        assert n == b.length(name) and a.fetch(name, 0, n) == b.fetch(name, 0, n)


@pytest.mark.parametrize("text, needle", [
    (">a\nACGTACGT\nACG\nACGTACGT\n", r"line 3: record 'a' has lines of uneven length"),
    (">a\nACGT\nACGTACGT\n", r"line 3: record 'a' has lines of uneven length \(8 bases"),
    (">a\nACGT\n\nACGT\n", r"line 3: record 'a' has lines of uneven length \(or a blank line\)"),
    (">a\nACGT\n>b x\nAC\n>a\nAC\n", r"line 5: record name 'a' appears twice"),
    ("ACGT\n>a\nAC\n", r"line 1: sequence before the first '>' header"),
])
def test_unindexable_fasta_is_refused_naming_the_line(tmp_path, text, needle):
    fasta = tmp_path / "bad.fa"
    fasta.write_text(text)
    with pytest.raises(FastaIndexError, match=needle):
        build_fai(fasta)
