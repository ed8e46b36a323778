"""SH2DataModule inside Lightning: the consumed-batch count survives a checkpoint, and resumed training sees
exactly the batches an uninterrupted run sees; the state of every data-parallel rank is gathered; the strategy
is told the data layout and gives the data-parallel rank."""

import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from sh2.data import SH2DataModule

SEQ_LEN, BATCH = 32, 4


def write_fasta(path, n_docs=30, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTacgtN", np.uint8)
    with open(path, "w") as fh:
        for i in range(n_docs):
            fh.write(f">d{i}\n{rng.choice(alphabet, size=int(rng.integers(20, 300))).tobytes().decode()}\n")
    return path


class TinyLM(pl.LightningModule):
    """Bigram model with the weighted cross-entropy the real module uses; records the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(512, 512)
        self.trained_on: list[torch.Tensor] = []
        self.val_batches = 0

    def loss(self, batch):
        logits = self.table(batch["input_ids"])
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        w = batch["loss_weights"].flatten()
        return (ce * w).sum() / w.sum()

    def training_step(self, batch, batch_idx):
        self.trained_on.append(batch["input_ids"].clone())
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(datamodule, max_steps, tmp_path, ckpt_path=None):
    model = TinyLM()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=3, check_val_every_n_epoch=None,
        limit_val_batches=2, num_sanity_val_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_fit_trains_on_the_uninterrupted_batches(tmp_path, num_workers):
    path = write_fasta(tmp_path / "g.fa")

    def dm():
        return SH2DataModule(path=str(path), seq_len=SEQ_LEN, batch_size=BATCH, num_workers=num_workers,
                             val_fraction=0.2, shuffle_buffer=8, reverse_complement_prob=0.5)

    full, _ = fit(dm(), 7, tmp_path / "full")
    assert len(full.trained_on) == 7 and full.val_batches > 0
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=3.ckpt"
    (key,) = dm().layout.per_rank_state_keys  # the entry the strategy is told to save once per rank
    saved = torch.load(ckpt, weights_only=False)[key]
    assert saved["per_rank"] == {0: {"batches": 3}}, "prefetched batches must not count as consumed"

    resumed, trainer = fit(dm(), 7, tmp_path / "resumed", ckpt_path=ckpt)
    assert trainer.global_step == 7 and len(resumed.trained_on) == 4
    for a, b in zip(resumed.trained_on, full.trained_on[3:]):
        assert torch.equal(a, b)


def _gather_worker(rank, world_size, init_file, path, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    dm = SH2DataModule(path=path, seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.2)
    dm.set_data_parallel(rank, world_size)
    it = iter(dm.train_dataloader())
    for _ in range(2 + 3 * rank):  # ranks consume different numbers of batches
        next(it)
    state = dm.state_dict()  # a collective: every rank calls it, as in Lightning's checkpoint dump
    if rank == 0:
        torch.save(state, out)
    dist.destroy_process_group()


def test_state_dict_gathers_every_rank_and_each_rank_resumes_its_own(tmp_path):
    path = str(write_fasta(tmp_path / "g.fa"))
    out = str(tmp_path / "state.pt")
    torch.multiprocessing.start_processes(
        _gather_worker, args=(2, str(tmp_path / "init"), path, out), nprocs=2, start_method="fork"
    )
    state = torch.load(out, weights_only=True)
    assert state["per_rank"] == {0: {"batches": 2}, 1: {"batches": 5}} and state["dp_size"] == 2
    for rank, consumed in [(0, 2), (1, 5)]:
        reference = SH2DataModule(path=path, seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.2)
        reference.set_data_parallel(rank, 2)
        expected = next(iter(reference.train_batches().rank_batches(consumed)))
        resumed = SH2DataModule(path=path, seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.2)
        resumed.set_data_parallel(rank, 2)
        resumed.load_state_dict(state)
        got = next(iter(resumed.train_dataloader()))
        assert all(torch.equal(got[k], expected[k]) for k in got), f"rank {rank}"
    assert os.path.exists(out)


def test_lightning_cli_builds_the_datamodule_from_config_fields(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    (tmp_path / "d.jsonl").write_text('{"seq": "ACGTACGT"}\n')
    cli = LightningCLI(
        TinyLM, SH2DataModule, run=False,
        args=[f"--data.data_files=[{tmp_path / 'd.jsonl'}]", "--data.format=json", "--data.text_field=seq",
              "--data.seq_len=4", "--data.val_fraction=0", "--trainer.logger=false"],
    )
    dm = cli.datamodule
    assert dm.seq_len == 4 and dm.source_args["format"] == "json" and dm.val_dataloader() == []
    batch = next(iter(dm.train_dataloader()))
    assert dm.tokenizer.decode(batch["input_ids"][0]) == "ACGT"


def test_fit_without_validation(tmp_path):
    path = write_fasta(tmp_path / "g.fa")
    dm = SH2DataModule(path=str(path), seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.0)
    model, trainer = fit(dm, 4, tmp_path)
    assert trainer.global_step == 4 and model.val_batches == 0


def test_setup_tells_the_strategy_the_layout_and_the_ranks_come_from_the_strategy(tmp_path):
    from types import SimpleNamespace

    from sh2.strategies import ContextParallelStrategy
    from sh2.strategies.contract import DataLayout

    strategy = ContextParallelStrategy(cp={"size": 2})
    strategy._set_cp_group(None, 1, 2)  # data-parallel rank 1 of 2 (what setup_environment sets)
    dm = SH2DataModule(path=str(write_fasta(tmp_path / "g.fa")), seq_len=SEQ_LEN, batch_size=BATCH,
                       val_fraction=0.2)
    dm.trainer = SimpleNamespace(strategy=strategy)
    dm.setup("fit")
    assert strategy._data_layout == DataLayout(seq_len=SEQ_LEN, micro_batch_size=BATCH,
                                               per_rank_state_keys=("SH2DataModule",))
    assert dm.data_parallel() == (1, 2)
    reference = SH2DataModule(path=str(tmp_path / "g.fa"), seq_len=SEQ_LEN, batch_size=BATCH, val_fraction=0.2)
    reference.set_data_parallel(1, 2)
    got, expected = next(iter(dm.train_dataloader())), next(reference.train_batches().rank_batches())
    assert all(torch.equal(got[k], expected[k]) for k in expected)
