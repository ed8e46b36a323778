"""Data files read by content (compression, FASTA), damaged files named in the error wherever the damage is, and
a warning for data shorter than one training window."""

import bz2
import gzip
import warnings

import pytest

from sh2.data.files import DataFileError, is_fasta, open_text
from sh2.data.sources import infer_format, load_source, read_fasta

RECORDS = "".join(f">r{i} record {i}\n{'ACGT' * 50}\nTTGCA\n" for i in range(200))


def test_a_truncated_gzip_fasta_names_the_file_when_the_stream_reaches_the_damage(tmp_path):
    whole = gzip.compress(RECORDS.encode())
    path = tmp_path / "genomes.fasta.gz"
    path.write_bytes(whole[: len(whole) // 2])
    source = load_source(str(path))  # the first records are intact: opening succeeds
    with pytest.raises(DataFileError, match=rf"gzip-compressed file {path} is truncated or corrupt.*gzip -t"):
        list(source.documents())


def test_a_plain_file_named_gz_is_refused_naming_it(tmp_path):
    path = tmp_path / "genomes.fa.gz"
    path.write_text(">a\nACGT\n")
    with pytest.raises(DataFileError, match=rf"{path} is named .gz but is not gzip data .*starts with b'>a\\nACGT"):
        load_source(str(path))


def test_compression_is_read_from_the_content_not_the_name(tmp_path):
    gz, bz = tmp_path / "a.fa", tmp_path / "b.fasta"
    gz.write_bytes(gzip.compress(b">a\nACGT\n>b\nGG\n"))
    bz.write_bytes(bz2.compress(b">c\nTTTT\n"))
    assert list(read_fasta(str(gz))) == [("a", "ACGT"), ("b", "GG")]
    assert list(read_fasta(str(bz))) == [("c", "TTTT")]
    with open_text(gz) as fh:
        assert fh.read() == ">a\nACGT\n>b\nGG\n"


@pytest.mark.parametrize("name", ["genome.txt", "genome.dna", "genome"])
def test_fasta_content_with_a_text_or_unknown_extension_is_read_as_fasta(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n>chr1 first\nACGT\nAC\n>chr2\nGG\n")
    assert is_fasta(path)
    assert infer_format([str(path)]) == "fasta"
    assert list(load_source(str(path)).documents()) == ["ACGTAC", "GG"]


def test_plain_text_keeps_its_format_and_an_unknown_extension_still_needs_data_format(tmp_path):
    text, other = tmp_path / "lines.txt", tmp_path / "lines.dna"
    text.write_text("ACGT\nGGCC\n")
    other.write_text("ACGT\n")
    assert not is_fasta(text)
    assert infer_format([str(text)]) == "text"
    with pytest.raises(ValueError, match="Set data.format"):
        infer_format([str(other)])


def test_a_window_longer_than_the_whole_training_data_warns(tmp_path):
    from sh2.data.datamodule import SH2DataModule

    path = tmp_path / "two.fa"
    path.write_text(">a\nACGTACGTAC\n>b\nGGGCCC\n")  # 10 + 1 and 6 + 1 tokens with their end-of-document tokens
    with pytest.warns(UserWarning, match=r"data.seq_len=64 is longer than the training data of .*two.fa.*: 2 "
                                         r"documents, 18 tokens .* lower data.seq_len below 18"):
        SH2DataModule(path=str(path), seq_len=64, val_fraction=0.0).train_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SH2DataModule(path=str(path), seq_len=16, val_fraction=0.0).train_batches()  # 18 tokens: one window fits
