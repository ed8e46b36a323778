"""Scoring, embeddings and the predict path (dataset, predict_batch, PredictionWriter through a Trainer)."""

from __future__ import annotations

import gzip
import json

import lightning as L
import pytest
import torch
from inference_models import make_model

from sh2.inference import encode, reverse_complement, score_sequences
from sh2.inference.predict import PredictDataModule, PredictionWriter, predict_batch, read_sequences

SEQS = ["ACGTTGCAAGT", "GGA", "TTTACGCGATCGATCGA"]


def manual_logprobs(model, seq: str) -> torch.Tensor:
    ids = torch.tensor([encode(seq)])
    with torch.no_grad():
        lp = model(ids)[0, :-1].log_softmax(-1)
    return lp.gather(-1, ids[0, 1:, None])[:, 0]


def test_padded_batches_score_like_single_sequences():
    model = make_model("SDH*")
    batched = score_sequences(model, SEQS, batch_size=3, per_token=True)
    for seq, got in zip(SEQS, batched):
        ref = manual_logprobs(model, seq)
        assert got.length == len(seq) and got.token_logprobs.shape == (len(seq) - 1,)
        torch.testing.assert_close(got.token_logprobs, ref, rtol=1e-5, atol=1e-5)
        assert abs(got.logprob_sum - float(ref.sum())) < 1e-4
        assert abs(got.logprob_mean - float(ref.mean())) < 1e-5
    assert score_sequences(model, ["A"])[0].logprob_sum == 0.0  # nothing to score without a BOS token


def test_reverse_complement_averaging():
    model = make_model("SDH*")
    assert reverse_complement("ACGTn") == "nACGT"
    got = score_sequences(model, SEQS[:1], reverse_complement=True)[0]
    rc = float(manual_logprobs(model, reverse_complement(SEQS[0])).sum())
    assert abs(got.logprob_sum_rc - rc) < 1e-4
    assert abs(got.logprob_sum - 0.5 * (got.logprob_sum_forward + rc)) < 1e-4


def test_hidden_states_of_any_layer_and_pooling():
    model = make_model("SDH*")
    ids = torch.tensor([encode(SEQS[2])])
    with torch.no_grad():
        _, hidden = model(ids, output_hidden_states=True)
    per_token = score_sequences(model, SEQS, layers=[0, -1], pool="none")[2].embeddings
    torch.testing.assert_close(per_token[0], hidden[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_token[-1], hidden[4][0], rtol=1e-5, atol=1e-5)
    mean = score_sequences(model, SEQS, layers=[-1], pool="mean")[2].embeddings[-1]
    torch.testing.assert_close(mean, hidden[4][0].mean(0), rtol=1e-5, atol=1e-5)


class _Wrapper(L.LightningModule):
    """Stands in for SH2LightningModule: predict_step is the one-liner the lead wires."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return predict_batch(self.model, batch)


def test_predict_writes_jsonl_and_pt(tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a first\nACGT\nTTGA\n>b\nGGCATG\n>c\nTTTT\n")
    assert read_sequences(fasta) == [("a", "ACGTTTGA"), ("b", "GGCATG"), ("c", "TTTT")]
    (tmp_path / "in.txt").write_text("ACGT\n\nGGA\n")
    assert read_sequences(tmp_path / "in.txt") == [("seq0", "ACGT"), ("seq1", "GGA")]
    module = _Wrapper(make_model("SDH*"))

    def run(output, **data):
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, callbacks=[PredictionWriter(str(output))])
        trainer.predict(module, datamodule=PredictDataModule(str(fasta), batch_size=2, **data),
                        return_predictions=False)

    run(tmp_path / "out" / "scores.jsonl", reverse_complement=True)
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[0]["length"] == 8
    expected = score_sequences(module.model, ["ACGTTTGA"], reverse_complement=True)[0]
    assert abs(rows[0]["logprob_sum"] - expected.logprob_sum) < 1e-4
    run(tmp_path / "emb.pt", task="embed", layers=[1, -1])
    records = torch.load(tmp_path / "emb.pt")
    assert records[1]["embeddings"]["-1"].shape == (32,) and set(records[1]["embeddings"]) == {"1", "-1"}
    run(tmp_path / "gen.jsonl", task="generate", max_new_tokens=5, alphabet="ACGT", seed=0, temperature=0.5)
    gen = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(gen) == 3 and all(len(r["generated"]) == 5 and set(r["generated"]) <= set("ACGT") for r in gen)


def test_the_api_upper_cases_by_default_like_sh2_predict():
    # Evo 2 and sh2's training data are upper case: a soft-masked (lowercase) stretch must score as its bases
    model = make_model("SDH*")
    masked, upper = "ACGTtgcaagtACG", "ACGTTGCAAGTACG"
    default = score_sequences(model, [masked])[0]
    assert default.logprob_sum == score_sequences(model, [upper], uppercase=False)[0].logprob_sum
    assert score_sequences(model, [masked], uppercase=False)[0].logprob_sum != default.logprob_sum
    batch = {"ids": ["m"], "sequences": [masked], "options": {"task": "score"}}
    assert predict_batch(model, batch)[0]["logprob_sum"] == default.logprob_sum


def test_predict_reads_fasta_by_content_whatever_the_name(tmp_path):
    seq = tmp_path / "reads.seq"
    seq.write_text(">a desc\nACGT\nTT\n>b\nGGCA\n")
    assert read_sequences(seq) == [("a", "ACGTTT"), ("b", "GGCA")]  # not four lines, headers included
    lines = tmp_path / "lines.fasta"
    lines.write_text("ACGT\nGGCA\n")
    assert read_sequences(lines) == [("seq0", "ACGT"), ("seq1", "GGCA")]
    packed = tmp_path / "packed.txt"
    packed.write_bytes(gzip.compress(b">z\nAC\n"))
    assert read_sequences(packed) == [("z", "AC")]


def test_embedding_layers_outside_the_model_are_named():
    model = make_model("SDH*")
    batch = {"ids": ["a"], "sequences": ["ACGT"], "options": {"task": "embed", "layers": [-1, 4]}}
    with pytest.raises(ValueError, match=r"prediction.layers=\[-1, 4\]: block 4 does not exist in a model of 4"):
        predict_batch(model, batch)
