"""Variant-effect scoring: reading VCF/TSV, the windows, the deltas of a fixed model, and bad input."""

from __future__ import annotations

import gzip
import random

import lightning as L
import pytest
import torch
from inference_models import PredictWrapper, make_model
from torch.utils.data import DataLoader

from sh2.data.fasta_index import IndexedFasta
from sh2.inference import encode, reverse_complement
from sh2.inference.predict import PredictDataModule, PredictionWriter
from sh2.inference.variants import (
    Variant,
    VariantBatches,
    VariantError,
    check_variant,
    read_variants,
    variant_windows,
)

W = 24  # window width of the scoring tests: small enough for the CPU, long enough for indels


def make_reference(tmp_path, lengths=(200, 90, 15), seed=0):
    rng = random.Random(seed)
    seqs = {f"chr{i + 1}": "".join(rng.choice("ACGT") for _ in range(n)) for i, n in enumerate(lengths)}
    path = tmp_path / "ref.fa"
    path.write_text("".join(f">{k} test\n" + "\n".join(s[i:i + 50] for i in range(0, len(s), 50)) + "\n"
                            for k, s in seqs.items()))
    return path, seqs


def write_vcf(path, rows, gz=False):
    text = "##fileformat=VCFv4.2\n##contig=<ID=chr1>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\ts1\n"
    text += "".join("\t".join(map(str, r)) + "\t.\tPASS\tDP=3\tGT\t0/1\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_vcf_and_tsv_give_one_variant_per_alt_allele(tmp_path):
    vcf = write_vcf(tmp_path / "v.vcf.gz", [("chr1", 5, "rs1", "A", "G,T"), ("chr2", 7, ".", "AC", "A")], gz=True)
    got = [(v.chrom, v.pos, v.id, v.ref, v.alt) for v in read_variants(vcf)]
    assert got == [("chr1", 5, "rs1", "A", "G"), ("chr1", 5, "rs1", "A", "T"), ("chr2", 7, ".", "AC", "A")]
    assert next(iter(read_variants(vcf))).source == f"{vcf} line 4"
    plain = tmp_path / "v.tsv"
    plain.write_text("# comment\nchr1\t5\tA\tG\nchr2\t7\tAC\tA\n")
    assert [(v.chrom, v.pos, v.ref, v.alt, v.id) for v in read_variants(plain)] == [
        ("chr1", 5, "A", "G", "."), ("chr2", 7, "AC", "A", ".")]
    named = tmp_path / "named.tsv"  # a header names the columns, in any order, with an optional id
    named.write_text("#id\tref\talt\tchrom\tpos\nv1\tA\tG\tchr1\t5\n")
    assert [(v.chrom, v.pos, v.ref, v.alt, v.id) for v in read_variants(named)] == [("chr1", 5, "A", "G", "v1")]


def alt_chromosome(seq: str, v: Variant) -> str:
    p = v.pos - 1
    return seq[:p] + v.alt + seq[p + len(v.ref):]


def random_variant(rng: random.Random, name: str, seq: str, near_end: bool = False) -> Variant:
    r, a = rng.choice([(1, 1), (1, 3), (4, 1), (2, 5), (6, 2)])
    lo = max(0, len(seq) - r - 3) if near_end else 0
    p = rng.randrange(lo, len(seq) - r + 1)
    alt = seq[p] + "".join(rng.choice("ACGT") for _ in range(a - 1)) if a > 1 else rng.choice(
        [b for b in "ACGT" if b != seq[p]])
    return Variant(name, p + 1, seq[p:p + r], alt)


def test_windows_cut_the_reference_and_the_mutated_chromosome(tmp_path):
    # Property: the reference window is W bases of the chromosome holding REF; the alternative window is W
    # bases of the *mutated* chromosome holding ALT; away from the chromosome ends both start at the same
    # base (shared left flank) and the longer allele is centred.
    path, seqs = make_reference(tmp_path, lengths=(200, 90, 15))
    fasta, rng = IndexedFasta(path), random.Random(1)
    for trial in range(400):
        name = rng.choice(["chr1", "chr2"])
        seq = seqs[name]
        v = random_variant(rng, name, seq, near_end=trial % 4 == 0)
        check_variant(v, fasta, W)
        win = variant_windows(fasta, v, W)
        p, r, a = v.pos - 1, len(v.ref), len(v.alt)
        assert win.ref == seq[win.start:win.start + W] and win.start <= p and p + r <= win.start + W
        mutated = alt_chromosome(seq, v)
        assert len(win.alt) == W
        t = mutated.find(win.alt, max(0, p + a - W))  # must be a slice of the mutated chromosome
        assert t != -1 and t <= p and p + a <= t + W, (v, win)
        if p - (W - max(r, a)) // 2 >= 0 and p + r + W <= len(seq):  # interior variant
            assert win.start == t == p - (W - max(r, a)) // 2


def test_chromosome_shorter_than_the_window_is_scored_whole(tmp_path):
    path, seqs = make_reference(tmp_path)
    fasta = IndexedFasta(path)
    v = Variant("chr3", 5, seqs["chr3"][4:7], seqs["chr3"][4])  # a 2-base deletion in a 15-base record
    win = variant_windows(fasta, v, W)
    assert win.start == 0 and win.ref == seqs["chr3"] and win.alt == alt_chromosome(seqs["chr3"], v)


def loglik(model, seq: str) -> float:
    """Sum of log p(token | prefix) over tokens 2..n by a direct forward (not the scoring code)."""
    ids = torch.tensor([encode(seq)])
    with torch.no_grad():
        lp = model(ids)[0, :-1].double().log_softmax(-1)
    return float(lp.gather(-1, ids[0, 1:, None]).sum())


def run_predict(module, output, **data):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[PredictionWriter(str(output))])
    trainer.predict(module, datamodule=PredictDataModule(output=str(output), task="variants", **data),
                    return_predictions=False)


def test_deltas_equal_the_difference_of_directly_scored_windows(tmp_path):
    path, seqs = make_reference(tmp_path)
    s = seqs["chr1"]
    rows = [("chr1", 60, "a", s[59], "G" if s[59] != "G" else "T"), ("chr1", 100, "b", s[99], s[99] + "TTG"),
            ("chr1", 140, "c", s[139:144], s[139]), ("chr1", 60, "d", s[59], "C" if s[59] != "C" else "A")]
    vcf = write_vcf(tmp_path / "v.vcf", rows)
    module = PredictWrapper(make_model("SDH*", seed=3))
    run_predict(module, tmp_path / "out" / "deltas.tsv", path=str(vcf), reference=str(path), window_size=W,
                batch_size=3, reverse_complement=True)
    lines = (tmp_path / "out" / "deltas.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:12] == ["chrom", "pos", "id", "ref", "alt", "window_start", "ref_len", "alt_len",
                           "ref_logprob_sum", "alt_logprob_sum", "delta", "delta_mean"]
    got = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    assert [g["id"] for g in got] == ["a", "b", "c", "d"]
    for g, (_, pos, _, ref, alt) in zip(got, rows):
        # independent windows of the interior variants: W bases of the reference and of the mutated
        # chromosome, starting where the longer allele is centred
        p = pos - 1
        start = p - (W - max(len(ref), len(alt))) // 2
        ref_win = s[start:start + W]
        alt_win = (s[:p] + alt + s[p + len(ref):])[start:start + W]
        fwd = loglik(module.model, alt_win) - loglik(module.model, ref_win)
        rc = loglik(module.model, reverse_complement(alt_win)) - loglik(module.model, reverse_complement(ref_win))
        # fp32 forward on windows of 24 tokens: sums agree to ~1e-5; 1e-4 leaves a margin
        assert abs(float(g["delta_forward"]) - fwd) < 1e-4 and abs(float(g["delta_rc"]) - rc) < 1e-4
        assert abs(float(g["delta"]) - 0.5 * (fwd + rc)) < 1e-4
        assert int(g["window_start"]) == start + 1 and g["ref_len"] == g["alt_len"] == str(W)
    assert got[0]["ref_logprob_sum"] == got[3]["ref_logprob_sum"]  # one reference window, scored once

    run_predict(module, tmp_path / "deltas.parquet", path=str(vcf), reference=str(path), window_size=W,
                batch_size=2)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "deltas.parquet")
    assert table.num_rows == 4 and pq.ParquetFile(tmp_path / "deltas.parquet").num_row_groups == 2  # per batch
    for g, delta in zip(got, table.column("delta").to_pylist()):
        assert abs(delta - float(g["delta_forward"])) < 1e-4


def test_batches_split_over_ranks_and_workers_keep_the_file_order(tmp_path):
    path, seqs = make_reference(tmp_path)
    s = seqs["chr1"]
    rows = [("chr1", p, f"v{p}", s[p - 1], "N") for p in range(30, 130, 7)]  # 15 variants
    vcf = write_vcf(tmp_path / "v.vcf", rows)
    ids = [f"v{p}" for p in range(30, 130, 7)]

    def order(ds, workers=0):
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        return [[v["id"] for v in b["variants"]] for b in loader]

    whole = VariantBatches(vcf, path, W, batch_size=4)
    assert len(whole) == 4 and sum(order(whole), []) == ids
    assert order(VariantBatches(vcf, path, W, batch_size=4), workers=2) == order(whole)
    ranks = [VariantBatches(vcf, path, W, batch_size=4, rank=r, world_size=3) for r in range(3)]
    assert [len(d) for d in ranks] == [2, 1, 1]
    assert [order(d) for d in ranks] == [[order(whole)[0], order(whole)[3]], [order(whole)[1]], [order(whole)[2]]]


def test_builtin_sample_variants_match_the_builtin_phage_genomes():
    dm = PredictDataModule(task="variants", window_size=64, batch_size=4, output="v.tsv")
    dm.setup("predict")  # every record checked against the reference
    assert dm._variants.num_variants == 11 and len(dm._variants) == 3


@pytest.mark.parametrize("row, needle", [
    (lambda s: ("chr2", 89, "x", "ACG", "A"),
     r"v\.vcf line 4 \(chr2:89 ACG>A\): position chr2:89-91 is outside the reference record 'chr2' \(length 90\)"),
    (lambda s: ("chr1", 0, "x", "A", "G"), r"line 4 \(chr1:0 A>G\): position chr1:0-0 is outside"),
    (lambda s: ("chr1", 10, "x", "N" * 4, "N"),
     r"v\.vcf line 4 \(chr1:10 NNNN>N\): REF 'NNNN' does not match the reference, which has '[ACGT]{4}' at "
     r"chr1:10-13"),
    (lambda s: ("1", 10, "x", "A", "G"),
     r"line 4 \(1:10 A>G\): chromosome '1' is not in the reference .*ref\.fa \(records: chr1, chr2, chr3\); the "
     r"reference has 'chr1'"),
    (lambda s: ("chrX", 10, "x", "A", "G"),
     r"chromosome 'chrX' is not in the reference .*\(records: chr1, chr2, chr3\)$"),
    (lambda s: ("chr1", "1e3", "x", "A", "G"), r"v\.vcf line 4: POS '1e3' is not an integer \(malformed line\)"),
    (lambda s: ("chr1", 10, "x", s["chr1"][9], "<DEL>"),
     r"line 4 \(chr1:10 \w><DEL>\): ALT '<DEL>' is not a sequence of bases.*bcftools view -v snps,indels"),
    (lambda s: ("chr1", 50, "x", s["chr1"][49], s["chr1"][49] * 13),
     r"line 4 \(chr1:50 \w>\w{13}\): an allele of 13 bases is longer than half the window "
     r"\(prediction.window_size=24\)"),
], ids=["past_end", "pos_zero", "ref_mismatch", "chr_alias", "unknown_chrom", "bad_pos", "symbolic", "too_long"])
def test_bad_variants_stop_before_scoring_naming_file_line_and_variant(tmp_path, row, needle):
    path, seqs = make_reference(tmp_path)
    vcf = write_vcf(tmp_path / "v.vcf", [row(seqs)])
    dm = PredictDataModule(path=str(vcf), reference=str(path), task="variants", window_size=W, output="o.tsv")
    with pytest.raises(VariantError, match=needle):
        dm.setup("predict")  # before any model is built


def test_malformed_lines_are_named(tmp_path):
    path, _ = make_reference(tmp_path)
    vcf = tmp_path / "short.vcf"
    vcf.write_text("##fileformat=VCFv4.2\nchr1\t10\tx\tA\n")
    with pytest.raises(VariantError, match=r"short\.vcf line 2: 4 tab-separated field\(s\), a VCF record needs"):
        VariantBatches(vcf, path, W, 4)
    tsv = tmp_path / "v.tsv"
    tsv.write_text("chr1\t10\tA\n")
    with pytest.raises(VariantError, match=r"v\.tsv line 1: 3 tab-separated field\(s\), expected chrom, pos"):
        VariantBatches(tsv, path, W, 4)


def test_prediction_settings_for_variants_are_named():
    with pytest.raises(ValueError, match=r"prediction\.reference is not set"):
        PredictDataModule(task="variants", path="v.vcf")
    with pytest.raises(ValueError, match=r"prediction\.output='v\.npy': a \.npy holds pooled embeddings"):
        PredictDataModule(task="variants", output="v.npy")


def test_evo2_variants_yaml_in_the_docs_parses(tmp_path):
    from pathlib import Path

    from sh2.cli import SH2CLI
    from sh2.data.datamodule import SH2DataModule
    from sh2.training.module import SH2LightningModule

    class ParseOnly(SH2CLI):
        def instantiate_classes(self) -> None:  # validate types only: the GPU config builds nothing here
            pass

    text = (Path(__file__).resolve().parents[2] / "docs" / "genomics.md").read_text()
    block = text.split("# variants_evo2_7b.yaml\n", 1)[1].split("```", 1)[0]
    cfg = tmp_path / "variants_evo2_7b.yaml"
    cfg.write_text(block)
    cli = ParseOnly(SH2LightningModule, SH2DataModule, run=False, args=["--config", str(cfg)])
    assert cli.config["prediction"]["task"] == "variants" and cli.config["prediction"]["window_size"] == 8192
    assert cli.config["model"]["init_from"] == "arcinstitute/evo2_7b"
