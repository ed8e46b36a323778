"""bench/e2e.py on the CPU at tiny shapes: both layouts, eager and compiled, with and without activation
checkpointing, and the SH2 / Transformer ratios.

The compiled runs use dynamo's ``aot_eager`` backend here (traced forward and backward, no code generation),
so the script's compiled path runs in seconds on a CPU; on a GPU it compiles with Inductor through
``bench.common.apply_compile``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import e2e


def compile_aot_eager(model: torch.nn.Module) -> str:
    for block in model.blocks:
        block.compile(backend="aot_eager")
    return "aot_eager (test)"


@pytest.mark.slow
def test_both_layouts_eager_and_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e2e, "apply_compile", compile_aot_eager)
    out = tmp_path / "e2e.json"
    assert e2e.main(["--device", "cpu", "--preset", "tiny", "--layers", "4", "--lengths", "64", "--steps", "1",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {(r["layout"], r["mode"], r["checkpointing"]): r for r in res["rows"]}
    assert set(rows) == {(lay, m, ck) for lay in ("sh2", "transformer") for m in ("eager", "compiled")
                         for ck in (False, True)}
    assert res["layouts"] == {"sh2": "SDH*", "transformer": "****"} and res["li_algorithm"] in ("fft", "modal")
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r)
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_s"]) and r["li_algorithm"] == res["li_algorithm"]
        if r["mode"] == "compiled":
            assert r["compile_path"] == "aot_eager (test)" and r["graph_breaks"] >= 0
            # same weights and tokens, fp32 on the CPU: the traced model computes the same first loss
            eager = rows[(key[0], "eager", key[2])]
            assert r["loss_first"] == pytest.approx(eager["loss_first"], rel=1e-5)


def test_plan_puts_the_setting_that_fits_first_at_long_lengths() -> None:
    args = e2e.build_parser().parse_args(["--lengths", "32768", "8192", "131072"])
    assert e2e.plan(args) == [(8192, False), (8192, True), (32768, True), (32768, False), (131072, True),
                              (131072, False)]
    args = e2e.build_parser().parse_args(["--lengths", "8192", "--checkpointing", "on", "--tokens-per-step", "32768"])
    assert e2e.plan(args) == [(8192, True)] and e2e.batch_for(args, 8192) == 4
    with pytest.raises(SystemExit, match="multiple"):
        e2e.batch_for(args, 3000)


def test_predicted_oom_and_time_budget_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    args = e2e.build_parser().parse_args(["--device", "cpu"])
    cfg = e2e.SH2Config.from_name("tiny")
    ok = {"layout": "sh2", "mode": "eager", "checkpointing": False, "status": "ok", "seq_len": 64, "batch": 1,
          "tokens_per_step": 64, "step_s": 2.0, "warmup_s": [5.0], "parameters": 10, "peak_mem_gib": 1.0}
    budget = e2e.Budget(10.0)
    # 4x the tokens at about 2 s per 64 tokens: ~4 x 8 s of steps, more than the 10 s left
    why = e2e.skip_reason([ok], {"sh2": cfg}, "sh2", "eager", 256, 1, False, args, torch.device("cpu"), budget)
    assert why is not None and why.startswith("skipped: time budget")
    oom = {**ok, "status": "out of memory", "seq_len": 128, "tokens_per_step": 128}
    why = e2e.skip_reason([oom], {"sh2": cfg}, "sh2", "eager", 256, 1, False, args, torch.device("cpu"), budget)
    assert why == "skipped: out of memory with fewer tokens"
