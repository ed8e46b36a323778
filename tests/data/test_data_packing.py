"""Packing: windows tile the EOD-joined stream exactly; RC, shuffle buffer and fast-forward are exact."""

import numpy as np
import pytest

from sh2.data.packing import PackedStream, WindowPacker, pack_windows, reverse_complement, shuffle_buffer
from sh2.data.tokenizer import EOD_ID, ByteTokenizer

SEQ_LEN, BATCH = 16, 3


def random_docs(n, seed=0, lo=1, hi=80):
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTacgtN", np.uint8)
    return [rng.choice(alphabet, size=int(rng.integers(lo, hi))).tobytes().decode() for _ in range(n)]


def stream_of(docs, tok):
    """Independent reference: the documents joined with EOD, as python lists."""
    ids, weights = [], []
    for d in docs:
        i, w = tok.encode_with_weights(d)
        ids += i.tolist() + [EOD_ID]
        weights += w.tolist() + [1.0]
    return ids, weights


def test_windows_tile_the_stream_without_loss_or_duplication():
    tok = ByteTokenizer(uppercase=True, lowercase_loss_weight=0.1)
    docs = random_docs(40)
    packer = WindowPacker(SEQ_LEN, BATCH)
    batches = [b for d in docs for b in packer.add(*tok.encode_document(d))]
    ids, weights = stream_of(docs, tok)
    n_batches = len(ids) // (BATCH * (SEQ_LEN + 1))
    assert len(batches) == n_batches and packer.pending == len(ids) - n_batches * BATCH * (SEQ_LEN + 1)
    rebuilt, rebuilt_w = [], []
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == b["loss_weights"].shape == (BATCH, SEQ_LEN)
        assert b["input_ids"].dtype == np.int64 and b["loss_weights"].dtype == np.float32
        for row in range(BATCH):
            # labels are the inputs shifted by one inside a window of L + 1 tokens
            np.testing.assert_array_equal(b["input_ids"][row, 1:], b["labels"][row, :-1])
            rebuilt += [int(b["input_ids"][row, 0])] + b["labels"][row].tolist()
            rebuilt_w += b["loss_weights"][row].tolist()
    assert rebuilt == ids[: len(rebuilt)]
    # loss weights belong to the label positions: every window's first token is never a label
    expected_w = [w for k, w in enumerate(weights[: len(rebuilt)]) if k % (SEQ_LEN + 1) != 0]
    assert rebuilt_w == pytest.approx(expected_w)


def test_eod_follows_every_document_and_nothing_else():
    docs = random_docs(30, seed=1)
    tok = ByteTokenizer()
    windows = list(pack_windows((tok.encode_document(d) for d in docs), SEQ_LEN))
    flat = np.concatenate([np.concatenate([w["input_ids"][:1], w["labels"]]) for w in windows])
    eod_positions = np.flatnonzero(flat == EOD_ID)
    ends = np.cumsum([len(d) + 1 for d in docs]) - 1
    np.testing.assert_array_equal(eod_positions, ends[ends < len(flat)])


def test_reverse_complement_matches_definition():
    table = {"A": "T", "T": "A", "C": "G", "G": "C", "a": "t", "t": "a", "c": "g", "g": "c"}
    text = "ACGTNacgtnRY-"
    ids = ByteTokenizer.to_bytes(text).copy()
    weights = np.arange(len(text), dtype=np.float32)
    rc_ids, rc_w = reverse_complement(ids, weights)
    expected = "".join(table.get(c, c) for c in reversed(text))
    assert rc_ids.tobytes().decode() == expected == "-YRnacgtNACGT"
    np.testing.assert_array_equal(rc_w, weights[::-1])
    twice, twice_w = reverse_complement(rc_ids, rc_w)
    np.testing.assert_array_equal(twice, ids)
    np.testing.assert_array_equal(twice_w, weights)


def test_reverse_complement_keeps_a_leading_tag_in_front():
    ids = ByteTokenizer.to_bytes("|phage x|AACG").copy()
    rc_ids, _ = reverse_complement(ids, np.ones(len(ids), np.float32))
    assert rc_ids.tobytes() == b"|phage x|CGTT"


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    a = list(shuffle_buffer(items, 16, np.random.default_rng(3)))
    b = list(shuffle_buffer(items, 16, np.random.default_rng(3)))
    c = list(shuffle_buffer(items, 16, np.random.default_rng(4)))
    assert sorted(a) == items and a == b and a != c and a != items
    assert list(shuffle_buffer(items, 1, np.random.default_rng(3))) == items


def make_stream(docs, **kwargs):
    args = dict(tokenizer=ByteTokenizer(uppercase=True, lowercase_loss_weight=0.1), seq_len=SEQ_LEN,
                batch_size=BATCH, seed=7, slot_key=(0, 0), shuffle_buffer=8, rc_prob=0.5)
    args.update(kwargs)
    return PackedStream(documents=lambda epoch: iter(docs), **args)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_stream_is_deterministic_and_reshuffles_each_epoch():
    docs = random_docs(12, seed=2)
    stream = make_stream(docs)
    first, again = take(stream.batches(), 30), take(make_stream(docs).batches(), 30)
    for x, y in zip(first, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    epoch0 = [t for t, _ in stream.epoch_documents(0)]
    epoch1 = [t for t, _ in stream.epoch_documents(1)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(docs) and epoch0 != epoch1


def test_stream_tokens_are_the_epochs_documents_with_rc_applied():
    docs = random_docs(10, seed=5)
    stream = make_stream(docs)
    expected = []
    for epoch in range(3):
        for text, flip in stream.epoch_documents(epoch):
            expected += stream.encode(text, flip)[0].tolist()
    flips = [flip for e in range(3) for _, flip in stream.epoch_documents(e)]
    assert any(flips) and not all(flips)
    got = []
    for b in take(stream.batches(), len(expected) // stream.tokens_per_batch):
        for row in range(BATCH):
            got += [int(b["input_ids"][row, 0])] + b["labels"][row].tolist()
    assert got == expected[: len(got)]


@pytest.mark.parametrize("skip", [1, 4, 9, 23])
def test_fast_forward_equals_consuming(skip):
    docs = random_docs(9, seed=6, hi=200)
    reference = take(make_stream(docs).batches(), skip + 5)[skip:]
    resumed = take(make_stream(docs).batches(skip_batches=skip), 5)
    for x, y in zip(reference, resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_empty_slot_raises_with_cause():
    stream = make_stream([], slot_name="rank 1 worker 0")
    with pytest.raises(RuntimeError, match="rank 1 worker 0 received no training document"):
        next(stream.batches())
