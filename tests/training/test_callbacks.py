"""The reporting callbacks: throughput and MFU from the tokens a rank processed, the memory estimate per strategy."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from conftest import make_data, make_module, make_trainer

import sh2.training.callbacks as callbacks
from sh2.strategies import ContextParallelStrategy
from sh2.training.callbacks import MemoryReport, ThroughputReport
from sh2.training.flops import model_flops_per_token
from sh2.training.memory import memory_report


def _fake_clock(monkeypatch, step_s: float) -> None:
    ticks = itertools.count()
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * step_s))


def test_throughput_and_mfu_are_the_tokens_of_the_interval_over_its_time(tmp_path, monkeypatch, capsys):
    _fake_clock(monkeypatch, 0.5)  # CPU: the clock is read once per sample
    monkeypatch.setattr(callbacks, "measure_bf16_peak_flops", lambda device: 2e12)
    report = ThroughputReport(log_every_n_steps=2)
    module = make_module()
    trainer = make_trainer(tmp_path, 8, [report])
    trainer.fit(module, make_data())

    tokens = 2 * 2 * 64  # two steps of 2 sequences of 64 tokens between samples, 0.5 s apart
    mfu = tokens / 0.5 * model_flops_per_token(module.config, 64) / 2e12
    # batches end at global steps 1..8: samples at steps 4, 6, 8; the one at step 2 starts the clock
    assert [round(t, 6) for t, _ in report.samples] == [tokens / 0.5] * 3
    assert [m for _, m in report.samples] == pytest.approx([mfu] * 3, rel=1e-12)
    metrics = trainer.callback_metrics
    assert float(metrics["perf/tokens_per_s"]) == tokens / 0.5
    assert float(metrics["perf/mfu"]) == pytest.approx(mfu, rel=1e-6)
    assert "perf/peak_mem_gib" not in metrics  # GPUs only
    out = capsys.readouterr().out
    assert f"[sh2] throughput: {tokens / 0.5:,.0f} tokens/s over 1 device(s), MFU {mfu:.1%}" in out
    assert "measured bf16 peak 2 TFLOP/s per device" in out


def test_throughput_counts_the_tokens_of_every_rank_that_holds_distinct_tokens(monkeypatch):
    # dp 3 x cp 2: each rank holds 1/2 of its sequences, so the run processes 6 x the tokens one rank sees
    _fake_clock(monkeypatch, 1.0)
    monkeypatch.setattr(callbacks, "measure_bf16_peak_flops", lambda device: None)  # no peak known: no MFU
    strategy = ContextParallelStrategy(cp={"size": 2})
    strategy._set_cp_group(None, 0, 3)
    logged: dict[str, float] = {}
    module = make_module()
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    trainer = SimpleNamespace(strategy=strategy, global_step=0, log_every_n_steps=1)
    report = ThroughputReport()  # the trainer's interval
    report.on_train_start(trainer, module)
    shard = {"input_ids": torch.zeros(2, 32, dtype=torch.long)}  # 2 sequences of 64 tokens, half of each here
    for step in range(3):
        trainer.global_step = step
        report.on_train_batch_end(trainer, module, None, shard, step)
    assert logged == {"perf/tokens_per_s": 64 * 6}
    assert report.samples == [(64 * 6, None), (64 * 6, None)]


def test_bad_interval_names_the_setting():
    with pytest.raises(ValueError, match="throughput.log_every_n_steps must be >= 1"):
        ThroughputReport(log_every_n_steps=0)


def test_memory_report_reads_the_strategy_through_its_contract():
    module = make_module(activation_checkpointing=True)
    # one process (no trainer strategy): no CP, no data parallelism, parameters neither sharded nor cast
    msg, over = MemoryReport.report(module, None, 80.0, micro_batch_size=4)
    assert (msg, over) == memory_report(module.config, 64, 80.0, cp=1, dp=1, batch=4, activation_checkpointing=True,
                                        sharded=False, mixed_precision=None)
    strategy = ContextParallelStrategy(cp={"size": 2}, mixed_precision="bf16")
    strategy._set_cp_group(None, 0, 4)
    assert MemoryReport.report(module, strategy, 80.0) == memory_report(
        module.config, 64, 80.0, cp=2, dp=4, batch=1, activation_checkpointing=True, sharded=True,
        mixed_precision="bf16")
