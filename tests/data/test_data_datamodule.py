"""SH2DataModule: batch format, whole-document validation split, rank x worker split, exact resumption."""

import collections
import itertools

import numpy as np
import pytest
import torch

from sh2.data import SH2DataModule, is_validation_document

SEQ_LEN, BATCH = 32, 4


def write_fasta(path, n_docs=40, seed=0, lo=20, hi=300):
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTacgtN", np.uint8)
    docs = [rng.choice(alphabet, size=int(rng.integers(lo, hi))).tobytes().decode() for _ in range(n_docs)]
    path.write_text("".join(f">doc{i}\n{d[:60]}\n{d[60:]}\n" for i, d in enumerate(docs)))
    return docs


def make_dm(path, **kwargs):
    args = dict(path=str(path), seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.2, shuffle_buffer=16,
                seed=3, reverse_complement_prob=0.5)
    args.update(kwargs)
    return SH2DataModule(**args)


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            assert torch.equal(x[k], y[k]), k


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "genomes.fa"
    write_fasta(path)
    return path


def test_demo_batches_have_the_documented_format():
    dm = SH2DataModule(seq_len=64, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "loss_weights"}
    for key, dtype in [("input_ids", torch.int64), ("labels", torch.int64), ("loss_weights", torch.float32)]:
        assert batch[key].shape == (2, 64) and batch[key].dtype == dtype
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert dm.vocab_size == 512 and len(dm.val_batches_list()) > 0


def test_demo_unigram_entropy_matches_direct_count():
    dm = SH2DataModule(seq_len=256, batch_size=4)
    counts = collections.Counter()
    for b in dm.val_batches_list():
        for label, w in zip(b["labels"].flatten().tolist(), b["loss_weights"].flatten().tolist()):
            if w > 0:
                counts[label] += w
    total = sum(counts.values())
    expected = -sum(c / total * np.log(c / total) for c in counts.values())
    assert dm.unigram_entropy() == pytest.approx(expected, rel=1e-9)
    assert 1.2 < expected < np.log(5)  # four bases plus EOD: at most log 5 nats


def test_validation_is_whole_documents_disjoint_from_training_and_stable(fasta):
    dm = make_dm(fasta, val_fraction=0.25)
    docs = list(dm.source.documents())
    val_docs = [d for d in docs if is_validation_document(d, 0.25)]
    assert 0 < len(val_docs) < len(docs)
    train_docs = list(dm.train_batches().slot_documents(0))
    assert not set(train_docs) & set(val_docs) and sorted(train_docs + val_docs) == sorted(docs)
    # validation tokens are exactly the held-out documents (+ EOD) in order, cut into windows
    stream = np.concatenate([dm.tokenizer.encode_document(d)[0] for d in val_docs])
    windows = [w for b in dm.val_batches_list() for w in torch.cat([b["input_ids"][:, :1], b["labels"]], 1)]
    assert np.array_equal(torch.cat(windows).numpy(), stream[: len(windows) * (SEQ_LEN + 1)])
    # same batches from a fresh datamodule, whatever its rank, seed or augmentation
    other = make_dm(fasta, val_fraction=0.25, seed=99, reverse_complement_prob=0.0)
    other.set_data_parallel(1, 2)
    assert_same_batches(dm.val_batches_list(), other.val_batches_list())


@pytest.mark.parametrize("n_files", [1, 4])
def test_ranks_times_workers_cover_training_documents_exactly_once(tmp_path, n_files):
    for f in range(n_files):
        write_fasta(tmp_path / f"part{f}.fa", n_docs=12, seed=f)
    all_train = []
    for rank in range(2):
        dm = make_dm(tmp_path, num_workers=2)
        dm.set_data_parallel(rank, 2)
        ds = dm.train_batches()
        for slot in range(2):
            slot_docs = list(ds.slot_documents(slot))
            assert slot_docs, f"rank {rank} slot {slot} is empty"
            all_train += slot_docs
    docs = list(make_dm(tmp_path).source.documents())
    expected = [d for d in docs if not is_validation_document(d, 0.2)]
    assert collections.Counter(all_train) == collections.Counter(expected)


def test_dataloader_workers_yield_the_reference_stream(fasta):
    dm = make_dm(fasta, num_workers=2)
    reference = take(dm.train_batches().rank_batches(), 7)
    assert_same_batches(take(dm.train_dataloader(), 7), reference)
    # and a different rank sees different data
    other = make_dm(fasta, num_workers=2)
    other.set_data_parallel(1, 2)
    first = next(iter(other.train_dataloader()))
    assert not torch.equal(first["input_ids"], reference[0]["input_ids"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers,dp_rank,consumed", [(0, 0, 5), (2, 1, 5), (2, 0, 6), (3, 1, 4)])
def test_resume_continues_bit_for_bit(fasta, num_workers, dp_rank, consumed):
    def fresh():
        dm = make_dm(fasta, num_workers=num_workers)
        dm.set_data_parallel(dp_rank, 2)
        return dm

    uninterrupted = take(fresh().train_dataloader(), consumed + 4)
    first = fresh()
    assert_same_batches(take(first.train_dataloader(), consumed), uninterrupted[:consumed])
    state = first.state_dict()
    assert state["per_rank"] == {dp_rank: {"batches": consumed}} and state["dp_size"] == 2
    resumed = fresh()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed.train_dataloader(), 4), uninterrupted[consumed:])


def test_resume_past_an_epoch_boundary(tmp_path):
    write_fasta(tmp_path / "small.fa", n_docs=6)
    dm = make_dm(tmp_path / "small.fa", val_fraction=0.0)
    epoch_tokens = sum(len(d) + 1 for d in dm.source.documents())
    skip = epoch_tokens // (BATCH * (SEQ_LEN + 1)) * 2 + 1  # more than two epochs
    uninterrupted = take(dm.train_batches().rank_batches(), skip + 3)
    resumed = make_dm(tmp_path / "small.fa", val_fraction=0.0)
    resumed.load_state_dict({**dm.state_dict(), "per_rank": {0: {"batches": skip}}})
    assert_same_batches(take(resumed.train_dataloader(), 3), uninterrupted[skip:])


def test_resume_rejects_changed_settings(fasta):
    state = make_dm(fasta).state_dict()
    with pytest.raises(ValueError, match="seq_len: checkpoint 32, now 64"):
        make_dm(fasta, seq_len=64).load_state_dict(state)
    dm = make_dm(fasta)
    dm.load_state_dict({**state, "dp_size": 4, "per_rank": {r: {"batches": 1} for r in range(4)}})
    with pytest.raises(ValueError, match="saved with 4 data-parallel ranks, this run has 1"):
        dm.train_dataloader()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seq_len": 1}, "data.seq_len must be >= 2"),
        ({"batch_size": 0}, "data.batch_size must be >= 1"),
        ({"val_fraction": 1.0}, r"data.val_fraction must be in \[0, 1\)"),
        ({"val_batches": 0}, "data.val_batches must be >= 1"),
        ({"reverse_complement_prob": 2.0}, "data.reverse_complement_prob"),
        ({"num_workers": -1}, "data.num_workers"),
    ],
)
def test_bad_settings_fail_at_construction(fasta, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(fasta, **kwargs)


def test_empty_training_stream_fails_before_training(tmp_path):
    docs = write_fasta(tmp_path / "few.fa", n_docs=3)
    fraction = 0.999
    assert all(is_validation_document(d, fraction) for d in docs)
    dm = make_dm(tmp_path / "few.fa", val_fraction=fraction)
    dm.setup("fit")
    with pytest.raises(ValueError, match="training stream .* is empty.*data.val_fraction"):
        dm.train_dataloader()


def test_empty_validation_split_fails_in_setup(tmp_path):
    docs = write_fasta(tmp_path / "few.fa", n_docs=3)
    assert not any(is_validation_document(d, 0.01) for d in docs)
    with pytest.raises(ValueError, match="validation split .* is empty.*data.val_fraction"):
        make_dm(tmp_path / "few.fa", val_fraction=0.01).setup("fit")


def test_source_errors_surface_in_setup(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        make_dm(tmp_path / "missing.fa").setup("fit")
    (tmp_path / "d.jsonl").write_text('{"seq": "ACGT"}\n')
    with pytest.raises(KeyError, match="data.text_field"):
        make_dm(tmp_path / "d.jsonl").setup("fit")


def test_data_parallel_rank_comes_from_the_strategy_first(fasta):
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from sh2.strategies import ContextParallelStrategy

    dm = make_dm(fasta)
    assert dm.data_parallel() == (0, 1)
    # a context-parallel strategy: 4 processes, 2 data-parallel groups; CP peers share the dp rank
    cp = ContextParallelStrategy(cp={"size": 2})
    cp._set_cp_group(None, 1, 2)
    dm.trainer = SimpleNamespace(strategy=cp, global_rank=3, world_size=4)
    assert dm.data_parallel() == (1, 2)
    ddp = DDPStrategy(parallel_devices=[torch.device("cpu")] * 4)  # the distributed sampler's coordinate
    dm.trainer = SimpleNamespace(strategy=ddp, global_rank=0, world_size=4)
    assert dm.data_parallel() == (0, 4)
    dm.trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")), global_rank=0, world_size=1)
    assert dm.data_parallel() == (0, 1)
    dm.set_data_parallel(0, 5)
    assert dm.data_parallel() == (0, 5)
