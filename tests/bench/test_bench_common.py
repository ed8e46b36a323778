"""bench/common.py: budgets, memory extrapolation, ceilings on the CPU, and the model seams with their fallbacks."""

from __future__ import annotations

import importlib
import math
import time

import pytest
import torch

from bench import common
from sh2.models import SH2Config, SH2Model
from sh2.models.seqops import LOCAL_OPS
from sh2.strategies.cp_comm import CPGroup

parallelize = importlib.import_module("sh2.strategies.parallelize")  # the module (the package exports a function)


def tiny_model() -> SH2Model:
    torch.manual_seed(0)
    return SH2Model(SH2Config.from_name("tiny"))


def test_budget_phases_end_with_their_parent() -> None:
    unlimited = common.Budget(None)
    assert unlimited.left() == math.inf and unlimited.allows(1e9)
    parent = common.Budget(10.0)
    assert parent.phase(100.0).deadline == parent.deadline  # a phase never outlives its parent
    short = parent.phase(0.05)
    assert short.deadline < parent.deadline and short.allows(0.01)
    time.sleep(0.06)
    assert not short.allows(0.0) and parent.allows(5.0)


def test_peak_memory_is_extrapolated_linearly_in_tokens() -> None:
    # two points: the line through them; one point: from the static part through that point
    assert common.predict_peak_gib([(1000, 12.0), (2000, 14.0)], 4000, static_gib=10.0) == pytest.approx(18.0)
    assert common.predict_peak_gib([(1000, 12.0)], 3000, static_gib=10.0) == pytest.approx(16.0)
    assert common.predict_peak_gib([], 3000, static_gib=10.0) is None
    assert common.static_training_gib(2**30) == pytest.approx(16.0)  # fp32 weights, grads, two AdamW moments


def test_byte_floor_counts_every_tensor_once() -> None:
    # 4 bf16 tensors of 1M x 1K elements = 8 GiB, at a copy rate that moves 8 GiB in 2 ms
    assert common.byte_floor_ms(4, 1 << 20, 1 << 10, copy_gbps=2**33 / 1e9 / 2e-3) == pytest.approx(2.0)
    assert common.byte_floor_ms(11, 8192, 4096, 1000.0) == pytest.approx(11 * 8192 * 4096 * 2 / 1e12 * 1e3)


def test_ceilings_and_timer_run_on_the_cpu() -> None:
    ceil = common.measure_ceilings(torch.device("cpu"), copy_bytes=1 << 20, matmul_size=64)
    assert ceil["copy_GBps"] > 0 and ceil["matmul_bf16_TFLOPs"] > 0 and "CPU" in ceil["method"]
    assert common.bench_ms(lambda: time.sleep(0.002), torch.device("cpu"), cpu_reps=3) >= 2.0


def test_worst_counts_nan_as_infinite_and_fmt_marks_missing_values() -> None:
    assert common.worst([1e-3, float("nan"), 2e-3]) == math.inf
    assert common.rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert [common.fmt(x) for x in (None, float("nan"), True, False, 0.12345)] == ["-", "-", "yes", "no", "0.123"]


def test_li_algorithm_is_set_only_where_the_config_has_the_field() -> None:
    cfg = SH2Config.from_name("tiny")
    if "li_algorithm" in {f.name for f in cfg.__dataclass_fields__.values()}:
        assert common.li_algorithm_of(common.with_li_algorithm(cfg, "fft")) == "fft"
        assert common.li_algorithm_of(common.with_li_algorithm(cfg, "modal")) == "modal"
    else:
        assert common.li_algorithm_of(cfg) == "fft" and common.with_li_algorithm(cfg, "fft") is cfg
        with pytest.raises(ValueError, match="li_algorithm"):
            common.with_li_algorithm(cfg, "modal")
    assert common.with_li_algorithm(cfg, None) is cfg


def test_remove_context_parallel_restores_the_local_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    parallelize.apply_context_parallel(model, CPGroup(group=None, rank=0, size=1, global_ranks=[0]))
    assert all(block.mixer.ops is not LOCAL_OPS for block in model.blocks)
    monkeypatch.delattr(parallelize, "remove_context_parallel", raising=False)  # the fallback
    common.remove_context_parallel(model)
    assert all(block.mixer.ops is LOCAL_OPS for block in model.blocks)
    calls = []
    monkeypatch.setattr(parallelize, "remove_context_parallel", calls.append, raising=False)
    common.remove_context_parallel(model)
    assert calls == [model]  # the tree's own function, where it exists


def test_apply_compile_compiles_every_block_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    blocks = list(model.blocks)
    monkeypatch.delattr(parallelize, "apply_compile", raising=False)
    assert "fallback" in common.apply_compile(model)
    assert list(model.blocks) == blocks  # same modules, parameters untouched
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    calls = []
    monkeypatch.setattr(parallelize, "apply_compile", calls.append, raising=False)
    assert common.apply_compile(model) == "sh2.strategies.parallelize.apply_compile" and calls == [model]


def test_activation_checkpointing_switch_and_its_one_way_form(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    monkeypatch.delattr(parallelize, "apply_activation_checkpointing", raising=False)
    if hasattr(model, "activation_checkpointing"):
        common.set_activation_checkpointing(model, True)
        assert model.activation_checkpointing is True
        common.set_activation_checkpointing(model, False)
        assert model.activation_checkpointing is False
    calls = []
    monkeypatch.setattr(parallelize, "apply_activation_checkpointing", calls.append, raising=False)
    other = tiny_model()
    common.set_activation_checkpointing(other, False)
    common.set_activation_checkpointing(other, True)
    common.set_activation_checkpointing(other, True)
    assert calls == [other]  # applied once
    with pytest.raises(ValueError, match="cannot be removed"):
        common.set_activation_checkpointing(other, False)
