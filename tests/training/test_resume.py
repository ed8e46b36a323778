"""Resuming with --ckpt_path: what conflicts with the checkpoint (architecture, data layout), and optimizer and
schedule settings that change on a resume, applied to the restored state exactly as a fresh schedule would be."""

import lightning as L
import pytest
import torch
from conftest import TINY_OVERRIDES, make_data, make_module, make_trainer

from sh2.checkpoints import CheckpointError
from sh2.training.module import warmup_cosine
from sh2.training.resume import (
    architecture_conflicts,
    data_conflicts,
    finetune_conflicts,
    optimizer_changes,
    read_checkpoint_info,
    resume_conflicts,
)


class GroupsAtStart(L.Callback):
    """The optimizer's param-group settings at the first training batch (after the restore, and after the module's
    on_train_start, which Lightning calls after the callbacks' own)."""

    def __init__(self):
        self.groups = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.groups is None:
            self.groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups]


class LrPerStep(L.Callback):
    def __init__(self):
        self.lr = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two steps of a small run (lr 1e-3, 2 warmup steps, decay over 100), saved with its optimizer state."""
    root = tmp_path_factory.mktemp("resume")
    L.seed_everything(0)
    trainer = make_trainer(root, 2)
    trainer.fit(make_module(), make_data())
    path = root / "step2.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_changed_optimizer_settings_are_applied_to_the_restored_state(checkpoint, tmp_path, capsys):
    new = dict(lr=5e-4, warmup_steps=4, min_lr_ratio=0.2, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    start, lrs = GroupsAtStart(), LrPerStep()
    make_trainer(tmp_path, 4, [start, lrs]).fit(make_module(**new), make_data(), ckpt_path=str(checkpoint))
    # the schedule of a fresh run with the new settings, continued from step 2 (decay_steps 100 as before)
    expected = {step: 5e-4 * warmup_cosine(step, 4, 100, 0.2) for step in (2, 3)}
    assert [g["lr"] for g in start.groups] == [expected[2]] * 2
    assert lrs.lr == pytest.approx(expected, rel=1e-12)
    assert [g["weight_decay"] for g in start.groups] == [0.05, 0.0]  # still none on norms, biases, filters
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["initial_lr"] == 5e-4 for g in start.groups)
    assert "model.lr 0.001 -> 0.0005" in capsys.readouterr().out


def test_an_unchanged_resume_keeps_the_restored_state_untouched(checkpoint, tmp_path, capsys):
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"]
    start = GroupsAtStart()
    make_trainer(tmp_path, 3, [start]).fit(make_module(), make_data(), ckpt_path=str(checkpoint))
    assert [{k: v for k, v in g.items() if k != "params"} for g in saved] == start.groups
    assert "changed settings" not in capsys.readouterr().out


def test_the_checkpoint_info_is_read_without_its_tensors(checkpoint, tmp_path):
    info = read_checkpoint_info(str(checkpoint))
    assert info.global_step == 2 and info.has_training_state
    assert info.hyper_parameters["overrides"] == TINY_OVERRIDES and info.data_hyper_parameters["batch_size"] == 2
    weights_only = tmp_path / "weights.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: state[k] for k in ("state_dict", "hyper_parameters", "global_step")}, weights_only)
    assert not read_checkpoint_info(str(weights_only)).has_training_state
    exported = tmp_path / "exported.pt"
    torch.save({"embedding.weight": torch.zeros(2, 2)}, exported)
    with pytest.raises(CheckpointError, match=rf"--model.init_from {exported} instead"):
        read_checkpoint_info(str(exported))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_info(str(tmp_path / "missing.ckpt"))


def test_the_same_architecture_written_another_way_is_no_conflict():
    saved = {"preset": "tiny", "overrides": None, "vocab_size": 512}
    tiny_width = {"preset": "tiny", "overrides": {"hidden_size": 128}}  # the tiny preset's own width
    assert architecture_conflicts(saved, tiny_width, 512) == []
    lines = architecture_conflicts(saved, {"preset": "tiny", "overrides": {"hidden_size": 64}}, 512)
    assert lines == ["model.overrides: checkpoint None, this run {'hidden_size': 64}",
                     "architecture: hidden_size 128 -> 64"]


def test_conflicts_for_fit_include_the_data_layout_and_only_the_architecture_otherwise(checkpoint):
    info = read_checkpoint_info(str(checkpoint))
    model = {"preset": "tiny", "overrides": TINY_OVERRIDES}
    data = {**info.data_hyper_parameters, "shuffle_buffer": 3, "val_batches": 99, "path": "/elsewhere/x.fa"}
    assert resume_conflicts(info, model, data, 512, fitting=True) == ["data.shuffle_buffer: checkpoint 8, this run 3"]
    assert resume_conflicts(info, model, data, 512, fitting=False) == []
    assert data_conflicts({"num_workers": 0}, {"num_workers": 1}) == []  # both one stream slot
    assert data_conflicts({"num_workers": 2}, {"num_workers": 4}) == [
        "data.num_workers: checkpoint 2, this run 4 (each worker reads its own part of the stream)"]


def test_lora_and_freeze_that_differ_from_the_checkpoint_are_conflicts():
    saved = {"preset": "tiny", "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["w1", "qkv"],
                                        "save_adapters": True}, "freeze": ["embeddings"]}
    same = {"lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": ["qkv", "w1"], "save_adapters": False},
            "freeze": ["embeddings"]}
    assert finetune_conflicts(saved, same, fitting=True) == []  # dropout and saving do not shape the adapters
    assert finetune_conflicts(saved, {**same, "lora": None}, fitting=False) == [
        "model.lora: checkpoint {'rank': 8, 'alpha': 16.0, 'targets': ['qkv', 'w1']}, this run None"]
    assert finetune_conflicts(saved, {**same, "lora": {"rank": 4}}, fitting=False)[0].startswith(
        "model.lora: checkpoint {'rank': 8")
    assert finetune_conflicts(saved, {**same, "freeze": None}, fitting=True) == [
        "model.freeze: checkpoint ['embeddings'], this run None"]
    assert finetune_conflicts(saved, {**same, "freeze": None}, fitting=False) == []  # no optimizer state to load


def test_optimizer_changes_compare_values_not_spellings():
    saved = {"lr": 0.001, "betas": (0.9, 0.95), "warmup_steps": 20, "grad_clip": 1}
    assert optimizer_changes(saved, {"lr": 1e-3, "betas": [0.9, 0.95], "warmup_steps": 20, "grad_clip": 1.0}) == []
    assert optimizer_changes(saved, {**saved, "lr": 3e-4}) == [("lr", 0.001, 3e-4)]
