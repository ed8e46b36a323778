"""bench/cp_check.py on the CPU (gloo, tiny shapes): every CP operator scheme in a 1-rank group against the
single-process operators, then a few training steps with the CP strategy, activation checkpointing and the CP
operators forced on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cp_check_runs_every_scheme_and_trains(tmp_path: Path) -> None:
    out = tmp_path / "cp_check.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "bench/cp_check.py", "--device", "cpu", "--preset", "tiny", "--layers", "4",
                           "--seq-len", "128", "--op-seq-len", "256", "--op-width", "32", "--steps", "2",
                           "--activation-checkpointing", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    names = {r["name"].rsplit("/", 1)[0] for r in report["ops"]}
    assert {"li/state", "li/a2a", "featurizer/p2p", "fir K=128/a2a", "attention/a2a/auto"} <= names
    assert all(r["ok"] for r in report["ops"])
    (train,) = report["train"]
    assert train["strategy"] == "ContextParallelStrategy" and train["ok"] and len(train["losses"]) == 2
