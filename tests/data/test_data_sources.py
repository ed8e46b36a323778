"""Document sources: FASTA parsing, local datasets builders, the packaged demo, and errors naming the fix."""

import gzip
import importlib.resources
import json

import pytest

from sh2.data.sources import DEMO_FASTA, is_validation_document, load_source, read_fasta

FASTA = """>seq1 first record
ACGTacgt
NNAC
; a comment line
>seq2|with|pipes second
GGGG

TTTT
>empty_record
>seq3
acgu
"""


def write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def test_demo_fasta_is_packaged_and_is_the_default():
    demo = importlib.resources.files("sh2.data") / "samples" / DEMO_FASTA
    assert demo.is_file()
    docs = list(load_source().documents())
    assert len(docs) == 56
    assert all(set(d) <= set("ACGTNacgtnRYKMSWBDHV.") for d in docs)


@pytest.mark.parametrize("gz", [False, True])
def test_fasta_multiline_records_one_document_each(tmp_path, gz):
    path = write(tmp_path / ("x.fa.gz" if gz else "x.fa"), FASTA, gz=gz)
    assert list(read_fasta(str(path))) == [("seq1", "ACGTacgtNNAC"), ("seq2|with|pipes", "GGGGTTTT"),
                                           ("seq3", "acgu")]
    assert list(load_source(str(path)).documents()) == ["ACGTacgtNNAC", "GGGGTTTT", "acgu"]


def test_fasta_headers_become_a_single_tag(tmp_path):
    path = write(tmp_path / "x.fasta", FASTA)
    docs = list(load_source(str(path), fasta_headers=True).documents())
    assert docs[0] == "|seq1 first record|ACGTacgtNNAC"
    assert docs[1] == "|seq2/with/pipes second|GGGGTTTT"


def test_fasta_glob_and_directory_read_files_in_sorted_order(tmp_path):
    write(tmp_path / "b.fa", ">b\nCCCC\n")
    write(tmp_path / "a.fa", ">a\nAAAA\n")
    assert list(load_source(str(tmp_path / "*.fa")).documents()) == ["AAAA", "CCCC"]
    source = load_source(str(tmp_path))
    assert list(source.documents()) == ["AAAA", "CCCC"] and source.dataset.num_shards == 2


def test_jsonl_text_csv_parquet_with_text_field(tmp_path):
    rows = [{"seq": "ACGT", "n": 1}, {"seq": "", "n": 2}, {"seq": "GGCC", "n": 3}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert list(load_source(str(jl), text_field="seq").documents()) == ["ACGT", "GGCC"]
    txt = write(tmp_path / "d.txt", "ACGT\nGGCC\n")
    assert list(load_source(str(txt)).documents()) == ["ACGT", "GGCC"]
    csv = write(tmp_path / "d.csv", "seq,n\nACGT,1\nGGCC,3\n")
    assert list(load_source(str(csv), text_field="seq").documents()) == ["ACGT", "GGCC"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"seq": ["ACGT", "TTAA"]}), tmp_path / "d.parquet")
    assert list(load_source(str(tmp_path / "d.parquet"), text_field="seq").documents()) == ["ACGT", "TTAA"]
    # an explicit format overrides the extension
    odd = write(tmp_path / "d.dat", json.dumps({"text": "AC"}))
    assert list(load_source(str(odd), format="json").documents()) == ["AC"]


def test_split_into_parts_covers_every_document_once(tmp_path):
    write(tmp_path / "x.fa", "".join(f">s{i}\n{'ACGT'[i % 4] * (i + 1)}\n" for i in range(11)))
    source = load_source(str(tmp_path / "x.fa"))
    parts = [list(source.documents(p, 3)) for p in range(3)]
    assert sorted(sum(parts, [])) == sorted(source.documents()) and all(parts)


def test_validation_choice_is_a_stable_content_hash():
    docs = [f"ACGT{i}" for i in range(2000)]
    chosen = [d for d in docs if is_validation_document(d, 0.1)]
    assert chosen == [d for d in docs if is_validation_document(d, 0.1)]
    assert 150 < len(chosen) < 250
    assert not any(is_validation_document(d, 0.0) for d in docs)
    assert is_validation_document("ACGT7", 0.1) == is_validation_document("ACGT7", 0.1)


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path=.*does not exist"):
        load_source(str(tmp_path / "nope.fasta"))


def test_glob_matching_nothing_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path=.*glob matches no file"):
        load_source(str(tmp_path / "*.fa"))


def test_unknown_extension_asks_for_format(tmp_path):
    path = write(tmp_path / "genome.xyz", "ACGT")
    with pytest.raises(ValueError, match="data.format"):
        load_source(str(path))
    with pytest.raises(ValueError, match="data.format='bam' is not supported"):
        load_source(str(path), format="bam")


def test_fasta_without_sequences_is_rejected(tmp_path):
    path = write(tmp_path / "headers_only.fa", ">a\n>b\n\n")
    with pytest.raises(ValueError, match="no FASTA sequences"):
        load_source(str(path))


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_missing_text_field_lists_columns(tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        path.write_text(json.dumps({"sequence": "ACGT"}))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"sequence": ["ACGT"]}), path)
    with pytest.raises(KeyError, match=r"data.text_field='text'.*\['sequence'\]"):
        load_source(str(path)).check()


def test_empty_dataset_is_rejected(tmp_path):
    path = write(tmp_path / "empty.jsonl", json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="contains no documents"):
        load_source(str(path)).check()


def test_hub_dataset_branch_streams_the_named_split(monkeypatch):
    # no network here: the hub call is replaced by a local stream, the arguments sh2 passes are checked
    import datasets

    import sh2.data.sources as sources

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_dict({"seq": ["ACGT", "GGCC"]}).to_iterable_dataset()

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    src = load_source("arcinstitute/opengenome2", name="eukaryote", split="validation", text_field="seq")
    assert calls == [("arcinstitute/opengenome2", "eukaryote",
                      {"split": "validation", "streaming": True, "data_files": None})]
    assert list(src.documents()) == ["ACGT", "GGCC"]
    assert "hub dataset data.path='arcinstitute/opengenome2'" in src.description


def test_hub_dataset_offline_says_what_to_do(monkeypatch):
    import sh2.data.sources as sources

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/genomes' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(sources.datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="set data.path to the local file"):
        load_source("org/genomes")
