"""Validation for one genome or a few long records: the tail windows of every record (no overlap with training),
auto-chosen for few records with a notice, separate validation files, exact resume, and advice that fits the case."""

import itertools
import logging

import numpy as np
import pytest
import torch

from sh2.data import SH2DataModule, is_validation_document
from sh2.data.holdout import Holdout

SEQ_LEN, BATCH = 32, 4
W = SEQ_LEN + 1


def write_records(path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.choice(np.frombuffer(b"ACGTacgt", np.uint8), size=n).tobytes().decode() for n in lengths]
    path.write_text("".join(f">chr{i}\n{d}\n" for i, d in enumerate(docs)))
    return docs


def make_dm(path, **kwargs):
    args = dict(path=str(path), seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.1, shuffle_buffer=4, seed=3,
                reverse_complement_prob=0.5, val_batches=None)
    args.update(kwargs)
    return SH2DataModule(**args)


def windows_of(batches):
    """The token windows ``[L + 1]`` of a list of batches (inputs plus the last label)."""
    return [w for b in batches for w in torch.cat([b["input_ids"][:, :1], b["labels"]], 1)]


def test_one_genome_holds_out_whole_tail_windows_that_never_overlap_training(tmp_path):
    (genome,) = write_records(tmp_path / "genome.fa", [3000])
    dm = make_dm(tmp_path / "genome.fa", val_split="within_records")
    tokens = dm.tokenizer.encode_document(genome)[0]  # 3001 tokens with the EOD
    held = int(0.1 * 3001) // W * W  # 9 windows of 33 tokens: 297
    assert held == 297 and dm.holdout.held_out_tokens(3001) == held
    windows = windows_of(dm.val_batches_list())
    assert len(windows) == 9
    assert np.array_equal(torch.cat(windows).numpy(), tokens[-held:])  # the record's last 297 tokens, its EOD last
    (train,) = dm.train_batches().slot_documents(0)
    assert train == genome[: 3001 - held]  # the first 2704 bases train: the two parts meet, never overlap
    assert len(train) + held == len(tokens)


def test_a_few_records_each_give_their_tail_and_short_ones_train_whole(tmp_path):
    docs = write_records(tmp_path / "few.fa", [1000, 200, 700])
    dm = make_dm(tmp_path / "few.fa", val_split="within_records", val_fraction=0.2)
    expected = []
    for doc in docs:
        tokens = dm.tokenizer.encode_document(doc)[0]
        held = int(0.2 * len(tokens) / W) * W  # 1001 -> 6 windows, 201 -> 1, 701 -> 4
        expected.append(tokens[len(tokens) - held:])
    assert [len(e) // W for e in expected] == [6, 1, 4]
    windows = windows_of(dm.val_batches_list())
    assert np.array_equal(torch.cat(windows).numpy(), np.concatenate(expected))  # no window crosses records
    assert list(dm.train_batches().slot_documents(0)) == [d[: len(d) + 1 - len(e)] for d, e in zip(docs, expected)]
    short = write_records(tmp_path / "short.fa", [1000, 100])
    dm = make_dm(tmp_path / "short.fa", val_split="within_records")
    assert list(dm.train_batches().slot_documents(0))[1] == short[1]  # 0.1 x 101 tokens: no window, trains whole


def test_auto_holds_out_within_records_only_when_records_are_few(tmp_path, caplog):
    write_records(tmp_path / "few.fa", [800] * 19)
    with caplog.at_level(logging.INFO):
        dm = make_dm(tmp_path / "few.fa")
        assert dm.holdout.mode == "within_records"
    assert "data.val_split=auto: data.path=" in caplog.text and "has 19 records, too few" in caplog.text
    assert "(that needs 20)" in caplog.text
    write_records(tmp_path / "many.fa", [800] * 20)
    assert make_dm(tmp_path / "many.fa").holdout.mode == "records"  # 0.1 x 20 = 2 records expected in validation
    assert make_dm(tmp_path / "few.fa", val_split="records").holdout.mode == "records"
    assert make_dm(tmp_path / "few.fa", val_fraction=0.0).holdout.mode == "none"


def test_the_default_stream_of_many_records_is_the_records_split(tmp_path):
    docs = write_records(tmp_path / "many.fa", [int(n) for n in np.random.default_rng(1).integers(20, 300, 40)])
    auto, records = make_dm(tmp_path / "many.fa", val_fraction=0.2), make_dm(tmp_path / "many.fa",
                                                                              val_fraction=0.2, val_split="records")
    assert auto.holdout == records.holdout == Holdout("records", 0.2, W)
    assert list(auto.train_batches().slot_documents(0)) == [d for d in docs if not is_validation_document(d, 0.2)]
    for a, b in zip(itertools.islice(auto.train_batches().rank_batches(), 5),
                    itertools.islice(records.train_batches().rank_batches(), 5)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert auto._fingerprint() == records._fingerprint() and "val_split" not in auto._fingerprint()


def test_separate_validation_files(tmp_path):
    train_docs = write_records(tmp_path / "train.fa", [500, 400], seed=1)
    val_docs = write_records(tmp_path / "val.fa", [100, 60], seed=2)
    dm = make_dm(tmp_path / "train.fa", val_path=str(tmp_path / "val.fa"), val_fraction=0.0)
    assert dm.has_validation and dm.holdout.mode == "none"
    assert list(dm.train_batches().slot_documents(0)) == train_docs  # nothing of data.path is held out
    stream = np.concatenate([dm.tokenizer.encode_document(d)[0] for d in val_docs])
    windows = windows_of(dm.val_batches_list())
    assert np.array_equal(torch.cat(windows).numpy(), stream[: len(windows) * W]) and len(windows) == len(stream) // W
    assert dm._fingerprint()["val_path"] == str(tmp_path / "val.fa")
    write_records(tmp_path / "tiny_val.fa", [10])
    with pytest.raises(ValueError, match=r"data.val_path=.*tiny_val.fa' hold 11 tokens in 1 documents, fewer than "
                                         r"one window of data.seq_len \+ 1 = 33 tokens. Lower data.seq_len"):
        make_dm(tmp_path / "train.fa", val_path=str(tmp_path / "tiny_val.fa")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"^data.val_path=.*missing.fa' does not exist"):
        make_dm(tmp_path / "train.fa", val_path=str(tmp_path / "missing.fa")).setup("fit")
    with pytest.raises(ValueError, match="data.val_path is set .* leave data.val_split at auto"):
        make_dm(tmp_path / "train.fa", val_path=str(tmp_path / "val.fa"), val_split="records")
    with pytest.raises(ValueError, match="data.val_split must be one of auto, records, within_records"):
        make_dm(tmp_path / "train.fa", val_split="validation")


def test_advice_fits_the_case(tmp_path):
    write_records(tmp_path / "short.fa", [20, 25])  # every record shorter than a window of 33 tokens
    with pytest.raises(ValueError) as err:
        make_dm(tmp_path / "short.fa").setup("fit")
    msg = str(err.value)
    assert "data.val_split=within_records (chosen by data.val_split=auto for so few records)" in msg
    assert "Every record is shorter than one window: lower data.seq_len below 26" in msg
    assert "Raise data.val_fraction" not in msg  # no fraction below 1 can hold out a window here

    write_records(tmp_path / "genome.fa", [200])  # 201 tokens: 0.1 x 201 < 33, but 0.165 x 201 >= 33
    with pytest.raises(ValueError, match=r"the longest has 201 tokens, and 0.1 x 201 < 33. Raise data.val_fraction "
                                         r"to at least 0.164"):
        make_dm(tmp_path / "genome.fa").setup("fit")
    assert len(make_dm(tmp_path / "genome.fa", val_fraction=0.165).val_batches_list()) == 1  # the advice works

    docs = write_records(tmp_path / "three.fa", [300, 300, 300], seed=5)
    assert not any(is_validation_document(d, 0.1) for d in docs)
    with pytest.raises(ValueError) as err:  # whole records of only three: the hash held none out
        make_dm(tmp_path / "three.fa", val_split="records").setup("fit")
    msg = str(err.value)
    assert "data.val_split=records held out 0 of 3 records" in msg
    assert "With this few records, set data.val_split: within_records" in msg and "Raise" not in msg
    one = write_records(tmp_path / "one.fa", [300])
    fraction = 0.5
    assert is_validation_document(one[0], fraction)
    dm = make_dm(tmp_path / "one.fa", val_split="records", val_fraction=fraction)
    with pytest.raises(ValueError, match="held out whole records .* set data.val_split: within_records"):
        dm.train_dataloader()
    dm = make_dm(tmp_path / "one.fa", val_split="within_records", num_workers=2)
    with pytest.raises(ValueError, match=r"has fewer records \(or files\) than data-parallel ranks x DataLoader "
                                         r"workers \(1 x 2\)") as err:
        dm.train_dataloader()
    assert "val_fraction" not in str(err.value)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers,consumed", [(0, 5), (2, 3)])
def test_within_records_resumes_bit_for_bit(tmp_path, num_workers, consumed):
    write_records(tmp_path / "chroms.fa", [2500, 1800, 3100])

    def fresh(**kw):
        return make_dm(tmp_path / "chroms.fa", num_workers=num_workers, **kw)

    uninterrupted = list(itertools.islice(fresh().train_dataloader(), consumed + 3))
    first = fresh()
    list(itertools.islice(first.train_dataloader(), consumed))
    state = first.state_dict()
    assert state["fingerprint"]["val_split"] == "within_records"
    resumed = fresh()
    resumed.load_state_dict(state)
    for a, b in zip(itertools.islice(resumed.train_dataloader(), 3), uninterrupted[consumed:]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="val_split: checkpoint 'within_records', now None"):
        fresh(val_split="records").load_state_dict(state)


def test_a_cut_inside_a_multibyte_character_leaves_a_gap_not_an_overlap():
    holdout = Holdout("within_records", 0.5, 4)
    text = "AAAAé" + "C" * 9  # 15 bytes + EOD = 16 tokens: the last 8 are held out, the first 8 bytes train
    head = holdout.training_text(text)
    assert len(text.encode()) + 1 == 16 and holdout.held_out_tokens(16) == 8
    assert head == "AAAAé" + "C" * 2 and len(head.encode()) == 8
    cut = "A" * 7 + "é" + "C" * 6  # é is bytes 7-8: the cut after byte 8 splits it, and é leaves the head
    assert len(cut.encode()) + 1 == 16
    assert holdout.training_text(cut) == "A" * 7


def test_auto_falls_back_to_tail_windows_when_the_hash_holds_out_no_record(tmp_path, caplog):
    # 20 records are enough for whole-record validation at val_fraction 0.1, but choose 20 that the content
    # hash keeps in training: auto must not stop on an empty validation set
    rng = np.random.default_rng(5)
    docs = []
    while len(docs) < 20:
        doc = rng.choice(np.frombuffer(b"ACGT", np.uint8), size=600).tobytes().decode()
        if not is_validation_document(doc, 0.1):
            docs.append(doc)
    (tmp_path / "few.fa").write_text("".join(f">r{i}\n{d}\n" for i, d in enumerate(docs)))
    dm = make_dm(tmp_path / "few.fa")
    assert dm.holdout.mode == "records"
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert dm.holdout.mode == "within_records" and dm.val_batches_list()
    assert "none of the 20 records" in caplog.text
    with pytest.raises(ValueError, match="held out 0 of 20 records"):
        make_dm(tmp_path / "few.fa", val_split="records").setup("fit")  # asked for by name: no fallback
