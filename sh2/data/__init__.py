"""Byte-level data for sh2: tokenizer, document sources, EOD packing and the LightningDataModule."""

from sh2.data.datamodule import SH2DataModule
from sh2.data.packing import PackedStream, WindowPacker, pack_windows, reverse_complement, shuffle_buffer
from sh2.data.sources import DocumentSource, is_validation_document, load_source, read_fasta
from sh2.data.tokenizer import EOD_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "EOD_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "DocumentSource",
    "PackedStream",
    "SH2DataModule",
    "WindowPacker",
    "is_validation_document",
    "load_source",
    "pack_windows",
    "read_fasta",
    "reverse_complement",
    "shuffle_buffer",
]
