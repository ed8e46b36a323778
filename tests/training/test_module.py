"""SH2LightningModule: exact resumption, schedules, NaN guard, FLOP accounting, atomic checkpoints, the model
built and then changed from outside in a fixed order, and init_from errors that name their fix."""

import argparse
import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import LossRecorder, make_data, make_module, make_trainer

from sh2.checkpoints import CheckpointError, CheckpointHint
from sh2.models import SH2Config
from sh2.strategies.contract import LightningStrategyAdapter
from sh2.training.callbacks import (
    AtomicCheckpointIO,
    LastCheckpoint,
    ThroughputReport,
    remove_stale_temporaries,
)
from sh2.training.flops import fft_conv_flops_per_token, flops_breakdown, model_flops_per_token
from sh2.training.module import SH2LightningModule, warmup_cosine


def test_resumed_run_matches_uninterrupted_run_bit_for_bit(tmp_path):
    L.seed_everything(0)
    full = LossRecorder()
    make_trainer(tmp_path / "a", 8, [full]).fit(make_module(), make_data())

    L.seed_everything(0)
    first = LossRecorder()
    trainer = make_trainer(tmp_path / "b", 4, [first])
    trainer.fit(make_module(), make_data())
    ckpt = tmp_path / "b" / "step4.ckpt"
    trainer.save_checkpoint(ckpt)

    L.seed_everything(123)  # the resumed run must not depend on the global seed state
    second = LossRecorder()
    make_trainer(tmp_path / "c", 8, [second]).fit(make_module(), make_data(), ckpt_path=str(ckpt))

    assert sorted(full.losses) == list(range(1, 9))
    for step in range(1, 5):
        assert first.losses[step] == full.losses[step]
    for step in range(5, 9):
        assert second.losses[step] == full.losses[step], step


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_optimizer_groups_and_lr(tmp_path):
    module = make_module(lr=2e-3, weight_decay=0.05)
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, make_data())
    opt = trainer.optimizers[0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_non_finite_loss_stops_with_the_step_number(tmp_path):
    module = make_module()
    original = module._loss_terms

    def poisoned(batch):
        ce, s, w = original(batch)
        if module.global_step == 2:
            s = s * float("nan")
        return ce, s, w

    module._loss_terms = poisoned
    with pytest.raises(RuntimeError, match="non-finite training loss .* at step 2"):
        make_trainer(tmp_path, 5).fit(module, make_data())


def test_bad_module_settings_name_the_field():
    with pytest.raises(ValueError, match="model.lr"):
        make_module(lr=0.0)
    with pytest.raises(ValueError, match="SH2Config.se_groups"):
        make_module(overrides={"se_groups": 3})


def test_flops_accounting_matches_six_n_plus_mixing():
    cfg = SH2Config.from_name("evo2_7b_8k")
    n_matrix = sum(
        (4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.mlp_hidden_size) for _ in cfg.operators)
    per_token = model_flops_per_token(cfg, 8192)
    mixing = 3 * 2 * 8192 * cfg.hidden_size * cfg.operators.count("MHA")  # causal attention, fwd+bwd
    assert per_token > 6 * n_matrix + mixing
    assert per_token < 1.05 * (6 * n_matrix + mixing)
    b = flops_breakdown(cfg, 8192)
    assert b["MR"] / cfg.operators.count("MR") > b["SE"] / cfg.operators.count("SE")
    assert fft_conv_flops_per_token(1024) == pytest.approx((5 * 2048 * 11 + 6 * 1025) / 1024)


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(3)}, path)

    def failing_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_temporaries_of_killed_saves_are_removed_and_live_ones_kept(tmp_path):
    gone = 2**22 + 17  # above the default pid_max: no live process has this id
    stale = [tmp_path / f".last.ckpt.tmp-{gone}", tmp_path / f".adapters.safetensors.tmp-{gone}"]
    kept = [tmp_path / f".last.ckpt.tmp-{os.getppid()}",  # a save in progress in a live process
            tmp_path / "last.ckpt", tmp_path / f".notes.txt.tmp-{gone}"]  # not a file sh2 stages
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


class _FlatScore(L.Callback):
    """Logs a monitored score that never improves after the first validation."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("flat", 1.0)


def test_last_checkpoint_holds_the_newest_step_when_validation_does_not_improve(tmp_path):
    folder = tmp_path / "ckpt"
    checkpoint = LastCheckpoint(dirpath=folder, monitor="flat", mode="min", save_top_k=1, save_last=True,
                                filename="step{step}", auto_insert_metric_name=False)
    trainer = make_trainer(tmp_path, 5, callbacks=[_FlatScore(), checkpoint], enable_checkpointing=True,
                           limit_val_batches=1, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(make_module(), make_data())
    # top-k kept step 2 (step 4 did not improve); last.ckpt followed to step 4, then to the end of training
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step2.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 5


def test_validation_logs_loss_perplexity_bits(tmp_path):
    trainer = make_trainer(tmp_path, 2, limit_val_batches=2, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(make_module(), make_data())
    m = trainer.callback_metrics
    assert {"val/loss", "val/perplexity", "val/bits_per_token", "train/loss"} <= set(m)
    assert float(m["val/perplexity"]) == pytest.approx(math.exp(float(m["val/loss"])), rel=1e-5)
    assert float(m["val/bits_per_token"]) == pytest.approx(float(m["val/loss"]) / math.log(2), rel=1e-5)


def test_test_subcommand_reports_the_validation_loss_as_test_metrics(tmp_path):
    # `sh2 test` (README: fit, validate, test, predict) needs a test_step; it reports the validation metrics.
    module, data = make_module(), make_data()
    trainer = make_trainer(tmp_path, 0, limit_val_batches=2, limit_test_batches=2)
    val = trainer.validate(module, data, verbose=False)[0]
    test = trainer.test(module, data, verbose=False)[0]
    assert set(test) == {"test/loss", "test/perplexity", "test/bits_per_token"}
    assert test["test/loss"] == pytest.approx(val["val/loss"], rel=1e-6)  # the same held-out batches
    assert test["test/perplexity"] == pytest.approx(math.exp(test["test/loss"]), rel=1e-5)


def test_throughput_is_sampled_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    report = ThroughputReport(log_every_n_steps=1)
    make_trainer(tmp_path, 4, [report], accumulate_grad_batches=2).fit(make_module(), make_data())
    # 8 micro-batches end at global steps 0,1,1,2,2,3,3,4: five distinct steps, the first only starts the clock,
    # so 4 samples (7 if every micro-batch were sampled)
    assert len(report.samples) == 4


def test_configure_model_checkpoints_then_compiles_then_hands_the_model_to_the_strategy(monkeypatch):
    import sh2.training.module as module_file

    order = []
    monkeypatch.setattr(module_file, "apply_activation_checkpointing", lambda model: order.append("checkpointing"))
    monkeypatch.setattr(module_file, "apply_compile", lambda model: order.append("compile"))

    class Recording(LightningStrategyAdapter):
        def parallelize_model(self, model):
            order.append("parallelize")
            return model

    module = make_module(activation_checkpointing=True, compile=True)
    module._trainer = SimpleNamespace(strategy=Recording(None))
    module.configure_model()
    assert order == ["checkpointing", "compile", "parallelize"]


def test_checkpointing_and_compile_settings_reach_every_block():
    module = make_module(activation_checkpointing=True, compile=True)
    module.configure_model()  # no trainer: the plain contract, nothing parallelized
    assert all(type(b).__name__ == "CheckpointedSH2Block" for b in module.model.blocks)
    assert all(b._compiled_call_impl is not None for b in module.model.blocks)  # compiled on the first call
    plain = make_module()
    plain.configure_model()
    assert all(type(b).__name__ == "SH2Block" and b._compiled_call_impl is None for b in plain.model.blocks)


def test_init_from_errors_end_with_the_fix_their_raise_site_chose(tmp_path):
    from sh2.models import SH2Model

    wide = tmp_path / "wide.pt"
    torch.save(SH2Model(SH2Config.from_name("tiny", hidden_size=256, num_heads=4)).state_dict(), wide)
    pickled = tmp_path / "pickled.pt"
    torch.save({"embedding.weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, pickled)
    cases = [(wide, {CheckpointHint.MATCH_ARCHITECTURE}, "point model.init_from at a checkpoint whose "
              "architecture matches model.preset / model.overrides (or change those to the checkpoint's "
              "architecture)"),
             (pickled, {CheckpointHint.TRUST_PICKLE}, "set model.init_from_trust_pickle: true if you trust the file"),
             (tmp_path / "missing.pt", set(), "point model.init_from at an existing, complete checkpoint (an sh2 "
              ".ckpt file or folder, a Vortex .pt or a Savanna folder)")]
    for path, hints, fix in cases:
        module = SH2LightningModule(preset="tiny", seq_len=64, init_from=str(path))
        with pytest.raises(CheckpointError) as err:
            module.configure_model()
        assert err.value.hints == hints, path
        assert str(err.value).startswith(f"model.init_from={str(path)!r}: ")
        assert str(err.value).endswith(f"\nFix: {fix}"), str(err.value)
