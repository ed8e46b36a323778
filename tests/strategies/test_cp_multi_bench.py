"""The multi-GPU CP benchmarks on CPU: 2 gloo processes under torchrun, tiny shapes.

Checks that bench/cp_correctness.py covers every CP operator scheme and the model in fp32 and bf16 and passes,
that bench/cp_scaling.py records every configuration (and resumes after a rank dies of a simulated
out-of-memory error), that bench/cp_summary.py renders the tables, that the fp32-anchored bf16 verdict of
bench/common.py judges by the ratio, and that bench/multi_gpu.sh is valid bash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SHAPE = ["--device", "cpu", "--width", "32", "--heads", "4", "--groups", "4", "--mlp", "64", "--mr-filter-len", "8",
         "--li-state", "4"]
OPS = {("featurizer", s) for s in ("p2p", "p2p_overlap")}
OPS |= {(op, s) for op in ("SE", "MR") for s in ("p2p", "p2p_overlap", "a2a", "a2a_pipelined")}
OPS |= {("LI", s) for s in ("a2a", "a2a_pipelined", "p2p_fft")} | {("attention", s) for s in ("a2a", "ring")}


def _torchrun(script: str, args: list[str], nproc: int = 2, env: dict[str, str] | None = None, check: bool = True
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(BENCH / script), *args]
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=180)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_multi_gpu_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / "multi_gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_correctness_covers_every_operator_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "correctness_n2.json"
    _torchrun("cp_correctness.py", [*SHAPE, "--op-seq-len", "64", "--model-seq-len", "64", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["world"] == 2 and rep["backend"] == "gloo" and rep["ok"] is True and rep["complete"] is True
    for dt in ("fp32", "bf16"):
        rows = {(r["op"], r["scheme"]): r for r in rep["ops"] if r["dtype"] == dt}
        assert set(rows) == OPS
        for key, r in rows.items():
            assert r["ok"] and r["max_rel_err"] < rep["tolerances"][dt], (key, dt, r)
        model = {r["scheme"]: r for r in rep["model"] if r["dtype"] == dt}
        assert set(model) == {"default", "alt+ckpt"} and all(r["ok"] for r in model.values()), model
    for r in rep["ops"] + rep["model"]:
        if r["dtype"] == "bf16":
            assert {"ref_bf16_vs_fp32", "cp_bf16_vs_fp32", "bf16_ratio"} <= set(r), r


def test_scaling_records_every_configuration_and_resumes_after_oom(tmp_path: Path) -> None:
    # rank 1 runs out of memory at the longest default length: the job dies (the other rank waits in a
    # collective), the rerun with --resume records it and runs the rest of the plan
    out = tmp_path / "scaling_n2.json"
    args = [*SHAPE, "--lengths", "128", "256", "512", "--variant-lengths", "128", "--warmup", "1",
            "--steps", "1", "--resume", "--out", str(out)]
    fake = {"SH2_BENCH_FAKE_OOM": "cp2/default/L512@1"}
    assert _torchrun("cp_scaling.py", args, env=fake, check=False).returncode != 0
    assert (tmp_path / "scaling_n2.json.rank1.err").exists()
    _torchrun("cp_scaling.py", args, env=fake)
    rep = json.loads(out.read_text())
    rows = {(r["scheme"], r["seq_len"]): r for r in rep["rows"]}
    assert set(rows) == {("default", 128), ("default", 256), ("default", 512), ("li=p2p_fft", 128), ("fir=a2a", 128),
                         ("attention=ring", 128)}
    oom = rows.pop(("default", 512))
    assert oom["status"].startswith("out of memory") and "(rank 1)" in oom["status"], oom
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["tokens_per_s_per_gpu"] > 0 and r["comm_ms"] >= 0, r
    assert rows[("li=p2p_fft", 128)]["cp_config"]["li_scheme"] == "p2p_fft"
    assert not list(tmp_path.glob("*.err"))

    # CP = 1 baseline (one process) and the summary tables
    _torchrun("cp_scaling.py", [*args[:-3], "--out", str(tmp_path / "scaling_n1.json")], nproc=1)
    proc = subprocess.run([sys.executable, str(BENCH / "cp_summary.py"), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "summary.md").read_text()
    assert "## Scaling" in md and "| 2 | 256 | default |" in md and "| 1 | 512 | local |" in md


@pytest.mark.parametrize("variant", ["li=p2p_fft,fir=a2a", "chunks=4"])
def test_parse_variant(variant: str) -> None:
    from bench.cp_scaling import parse_variant

    name, fields = parse_variant(variant)
    assert name == variant and fields and all(k.endswith(("_scheme", "_chunks")) for k in fields)
    with pytest.raises(ValueError):
        parse_variant("nonsense")


def test_bf16_verdict_is_anchored_to_fp32() -> None:
    from bench import common as cm

    g = torch.Generator().manual_seed(0)
    truth = [torch.randn(1000, generator=g), torch.randn(50, generator=g)]
    noise = [torch.randn(t.shape, generator=g) for t in truth]
    one_gpu_bf16 = [t + 0.05 * n for t, n in zip(truth, noise)]  # bf16 itself 5% off fp32

    def verdict(cp: list[torch.Tensor]) -> dict:
        row = {"ok": max(cm.rel_err(a, b) for a, b in zip(cp, one_gpu_bf16)) < cm.TOL["bf16"]}
        cm.judge_bf16(row, cp, one_gpu_bf16, truth, ["a", "b"])
        return row

    # as accurate as bf16 allows (errors of the same size, independent): passes although > 2e-2 from one GPU
    close = verdict([t + 0.05 * torch.randn(t.shape, generator=g) for t in truth])
    assert close["ok"] and close["bf16_ratio"] < cm.BF16_RATIO
    # one tensor three times as far from fp32 as bf16 is: fails
    far = verdict([truth[0] + 0.05 * noise[0], truth[1] + 0.15 * torch.randn(50, generator=g)])
    assert not far["ok"] and far["bf16_ratio"] > cm.BF16_RATIO
