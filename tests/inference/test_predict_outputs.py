"""Output formats of sh2 predict: .tsv, .parquet, .npy and .safetensors written batch by batch, in a chosen
dtype, each holding exactly what the scoring code computes."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from inference_models import PredictWrapper, make_model

from sh2.inference import score_sequences
from sh2.inference.outputs import check_output, open_sink, staging_path
from sh2.inference.predict import PredictDataModule, PredictionWriter

SEQS = {"a": "ACGTTGCAAGTACGT", "b": "GGA", "c": "TTTACGCGATCGATCGAAC", "d": "ACCA", "e": "GATTACAGATTACA"}


@pytest.fixture(scope="module")
def module():
    return PredictWrapper(make_model("SDH*", seed=5))


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">{k} desc\n{v}\n" for k, v in SEQS.items()))
    return path


def run(module, fasta, output, callbacks=(), **data):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[PredictionWriter(str(output)), *callbacks])
    trainer.predict(module, datamodule=PredictDataModule(str(fasta), output=str(output), batch_size=2, **data),
                    return_predictions=False)


def reference(module, layers=None, pool="mean", per_token=False):
    """What the scoring code computes, in the batches the predict runs use (so results are bit-identical)."""
    return score_sequences(module.model, list(SEQS.values()), batch_size=2, layers=layers, pool=pool,
                           per_token=per_token, uppercase=True)


def test_safetensors_per_token_embeddings_in_bfloat16(module, fasta, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "emb" / "tokens.safetensors"
    run(module, fasta, out, task="embed", layers=[0, -1], pool="none", per_token=True, dtype="bfloat16")
    assert f"[sh2] predictions: 5 records written to {out.resolve()}" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["tokens.safetensors"]  # temporary files removed
    expected = reference(module, layers=[0, -1], pool="none", per_token=True)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ids"]) == list(SEQS)
        offsets = f.get_tensor("offsets")
        assert offsets.tolist() == np.cumsum([0] + [len(s) for s in SEQS.values()]).tolist()
        for layer in ("0", "-1"):
            emb = f.get_tensor(f"embeddings.{layer}")
            assert emb.dtype == torch.bfloat16 and emb.shape == (offsets[-1], 32)
            for i, sc in enumerate(expected):  # the bf16 cast of the fp32 embeddings, exactly
                torch.testing.assert_close(emb[offsets[i]:offsets[i + 1]], sc.embeddings[int(layer)].bfloat16(),
                                           rtol=0, atol=0)
        lp = f.get_tensor("token_logprobs")
        for i, sc in enumerate(expected):  # aligned with the token rows: NaN where nothing is predicted
            row = lp[offsets[i]:offsets[i + 1]]
            assert math.isnan(row[0]) and torch.equal(row[1:], sc.token_logprobs)
        torch.testing.assert_close(f.get_tensor("logprob_sum"),
                                   torch.tensor([sc.logprob_sum for sc in expected], dtype=torch.float64))


def test_npy_pooled_embeddings_fill_a_preallocated_array(module, fasta, tmp_path):
    out = tmp_path / "pooled.npy"
    run(module, fasta, out, task="embed", layers=[1, -1], pool="last", dtype="float16")
    arr = np.load(out)
    assert arr.shape == (5, 2, 32) and arr.dtype == np.float16
    expected = reference(module, layers=[1, -1], pool="last")
    for i, sc in enumerate(expected):
        np.testing.assert_array_equal(arr[i, 0], sc.embeddings[1].half().numpy())
        np.testing.assert_array_equal(arr[i, 1], sc.embeddings[-1].half().numpy())
    rows = [line.split("\t") for line in (tmp_path / "pooled.tsv").read_text().splitlines()]
    assert rows[0] == ["id", "length", "logprob_sum", "logprob_mean"]
    assert [r[0] for r in rows[1:]] == list(SEQS) and float(rows[2][2]) == expected[1].logprob_sum


def test_parquet_has_one_row_group_per_batch_and_exact_values(module, fasta, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "tokens.parquet"
    run(module, fasta, out, task="embed", layers=[-1], pool="none", per_token=True, dtype="float16")
    assert pq.ParquetFile(out).num_row_groups == 3  # 5 records in batches of 2, written as they finish
    table = pq.read_table(out)
    expected = reference(module, layers=[-1], pool="none", per_token=True)
    assert table.column("id").to_pylist() == list(SEQS)
    for i, sc in enumerate(expected):
        got = np.array(table.column("embedding_-1")[i].as_py(), dtype=np.float16)
        np.testing.assert_array_equal(got, sc.embeddings[-1].half().numpy())
        np.testing.assert_array_equal(np.array(table.column("token_logprobs")[i].as_py(), dtype=np.float32),
                                      sc.token_logprobs.numpy())
    pooled = tmp_path / "pooled.parquet"
    run(module, fasta, pooled, task="embed", layers=[-1])
    col = pq.read_table(pooled).column("embedding_-1")
    assert str(col.type) == "fixed_size_list<element: float>[32]"
    np.testing.assert_array_equal(np.array(col[2].as_py(), dtype=np.float32),
                                  reference(module, layers=[-1])[2].embeddings[-1].numpy())


class _Peek(L.Callback):
    """Reads the staging file when the last batch starts: the earlier batches must already be there, and the
    output itself must not exist yet (it appears whole, by a rename, at the end)."""

    def __init__(self, path):
        self.path, self.seen, self.output_existed = path, None, None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 2:
            self.seen = staging_path(self.path).read_text().splitlines()
            self.output_existed = self.path.exists()


def test_tsv_scores_are_written_as_batches_finish(module, fasta, tmp_path):
    out = tmp_path / "scores.tsv"
    peek = _Peek(out)
    run(module, fasta, out, callbacks=[peek], reverse_complement=True)
    assert len(peek.seen) == 1 + 4  # header + the two batches before the last
    assert peek.output_existed is False and not staging_path(out).exists()
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["id", "length", "logprob_sum", "logprob_mean", "logprob_sum_forward", "logprob_sum_rc"]
    expected = score_sequences(module.model, list(SEQS.values()), batch_size=2, reverse_complement=True,
                               uppercase=True)
    assert [float(r[2]) for r in rows[1:]] == [sc.logprob_sum for sc in expected]  # repr round-trips floats


def test_ranks_write_their_own_files(tmp_path):
    writer = PredictionWriter(str(tmp_path / "out.safetensors"))
    assert writer._target(SimpleNamespace(world_size=2, global_rank=1)).name == "out.rank1.safetensors"
    assert writer._target(SimpleNamespace(world_size=1, global_rank=0)).name == "out.safetensors"


@pytest.mark.parametrize("output, task, pool, dtype, per_token, needle", [
    ("x.csv", "score", "mean", "float32", False, r"unknown format '\.csv'"),
    ("x.tsv", "embed", "mean", "float32", False, r"a \.tsv holds scalar columns only"),
    ("x.tsv", "score", "mean", "float32", True, r"a \.tsv holds scalar columns only"),
    ("x.npy", "embed", "none", "float32", False, r"a \.npy holds pooled embeddings"),
    ("x.npy", "score", "mean", "float32", False, r"a \.npy holds pooled embeddings"),
    ("x.npy", "embed", "mean", "bfloat16", False, r"\.npy has no bfloat16 type; set prediction\.dtype"),
    ("x.parquet", "embed", "none", "bfloat16", False, r"\.parquet has no bfloat16 type"),
    ("x.safetensors", "generate", "mean", "float32", False, r"\.safetensors holds embeddings and scores"),
])
def test_output_formats_that_cannot_hold_the_task_are_refused_at_once(output, task, pool, dtype, per_token,
                                                                        needle):
    with pytest.raises(ValueError, match=rf"prediction\.output='{output}': " + needle.lstrip("^")):
        check_output(output, task, pool, dtype, per_token)
    with pytest.raises(ValueError, match=r"prediction\.output"):
        PredictDataModule(output=output, task=task, pool=pool, dtype=dtype, per_token=per_token)


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match=r"prediction\.dtype must be one of \('float32', 'float16', 'bfloat16'\)"):
        PredictDataModule(dtype="fp8")


@pytest.mark.parametrize("setting,value,needle", [
    ("max_new_tokens", -5, "prediction.max_new_tokens must be >= 1, got -5"),
    ("temperature", -1.0, "prediction.temperature must be >= 0"),
    ("top_k", -2, "prediction.top_k must be >= 0"),
    ("top_p", 0.0, "prediction.top_p must be in (0, 1]"),
    ("max_length", 0, "prediction.max_length must be >= 1 or null"),
    ("pool", "max", "prediction.pool must be one of"),
    ("alphabet", "", "prediction.alphabet must name at least one character"),
    ("num_workers", -1, "prediction.num_workers must be >= 0"),
])
def test_impossible_prediction_settings_are_refused_naming_them(setting, value, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        PredictDataModule(task="generate", output="out.jsonl", **{setting: value})


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv", ".parquet", ".safetensors", ".pt"])
def test_an_interrupted_prediction_leaves_the_existing_output_byte_for_byte(module, fasta, tmp_path, suffix):
    out = tmp_path / f"scores{suffix}"
    out.write_bytes(b"results of an earlier run")

    class Interrupt(L.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 2:  # two batches are already written (to the staging file)
                raise KeyboardInterrupt

    with pytest.raises(SystemExit):  # Lightning turns the interrupt into exit(1) after its graceful shutdown
        run(module, fasta, out, callbacks=[Interrupt()])
    assert out.read_bytes() == b"results of an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["scores" + suffix, fasta.name])  # no leftovers
    run(module, fasta, out)  # a complete run replaces it
    assert out.read_bytes() != b"results of an earlier run"


def test_npy_output_and_its_table_appear_together_at_the_end(module, fasta, tmp_path):
    out = tmp_path / "emb.npy"
    sink = open_sink(out, num_records=1)
    sink.write([{"id": "a", "length": 3, "logprob_sum": -1.0, "logprob_mean": -0.5,
                 "embeddings": {"-1": torch.ones(4)}}])
    assert not out.exists() and not out.with_suffix(".tsv").exists()
    assert sink.close() == [out, out.with_suffix(".tsv")]
    assert np.load(out).shape == (1, 4) and out.with_suffix(".tsv").read_text().startswith("id\t")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


_DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import lightning as L
from inference_models import PredictWrapper, make_model
from sh2.inference.predict import PredictDataModule, PredictionWriter

if __name__ == "__main__":
    for out, kw in [({out!r} + "/v.tsv", dict(task="variants", window_size=64, batch_size=2)),
                    ({out!r} + "/e.npy", dict(task="embed", path={fasta!r}, max_length=40, batch_size=4))]:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, callbacks=[PredictionWriter(out)])
        trainer.predict(PredictWrapper(make_model("SDH*")), datamodule=PredictDataModule(output=out, **kw),
                        return_predictions=False)
"""


@pytest.mark.slow
def test_two_processes_write_rank_files_that_together_hold_every_record(tmp_path):
    from importlib.resources import files

    fasta = str(files("sh2.data") / "samples" / "phage_genomes.fasta.gz")
    script = tmp_path / "ddp_predict.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path), fasta=fasta))
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("\t") for r in (0, 1) for line in (tmp_path / f"v.rank{r}.tsv").read_text().splitlines()[1:]]
    assert sorted((r[2], r[4]) for r in rows) == sorted([("snv1", "T"), ("snv2", "G"), ("snv3", "G"), ("snv4", "T"),
                                                         ("ins1", "TTTA"), ("del1", "A"), ("multi1", "A"),
                                                         ("multi1", "C"), ("multi1", "T"), ("del_end", "T"),
                                                         ("snv5", "C")])
    arrays = [np.load(tmp_path / f"e.rank{r}.npy") for r in (0, 1)]
    ids = [line.split("\t")[0] for r in (0, 1) for line in (tmp_path / f"e.rank{r}.tsv").read_text().splitlines()[1:]]
    assert [a.shape for a in arrays] == [(28, 32), (28, 32)] and len(set(ids)) == 56
    assert "records written to" in res.stdout and "e.rank1.npy" in res.stdout


def test_sequences_that_are_not_nucleotides_get_one_notice(tmp_path, capsys):
    from sh2.inference.predict import PredictDataModule, non_nucleotide_records

    records = [("dna", "ACGTNNacgtRYKM-"), ("rna", "ACGUACGU"), ("protein", "MKTAYIAKQRQISFVKSHFSRQLEE"),
               ("text", "the quick brown fox"), ("empty", "")]
    assert non_nucleotide_records(records) == ["protein", "text"]
    path = tmp_path / "mixed.fa"
    path.write_text("".join(f">{rid}\n{seq or 'A'}\n" for rid, seq in records))
    PredictDataModule(path=str(path), output=str(tmp_path / "out.jsonl")).predict_dataloader()
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "2 of 5 sequences of prediction.path are not nucleotide" in out
    assert "protein: 'MKTAYIAKQRQISFVKSHFSRQLE...'" in out  # the first 24 characters
    dna = tmp_path / "dna.fa"
    dna.write_text(">a\nACGT\n>b\nNNNN\n")
    PredictDataModule(path=str(dna), output=str(tmp_path / "out.jsonl")).predict_dataloader()
    assert "note:" not in capsys.readouterr().out
