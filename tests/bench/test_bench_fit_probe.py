"""bench/fit_probe.py: the callback measures a real ``sh2 fit`` run (tiny config, CPU) and the table reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import fit_probe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_probe_counts_the_tokens_of_the_timed_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fit_tiny.json"
    probe = {"class_path": "bench.fit_probe.FitProbe", "init_args": {"out": str(out), "name": "tiny", "skip_steps": 1}}
    cmd = [sys.executable, "-m", "sh2", "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps", "3",
           "--data.seq_len", "128", "--data.batch_size", "2", "--data.val_fraction", "0",
           "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0", "--checkpoint.monitor", "null",
           f"--trainer.callbacks+={json.dumps(probe)}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[bench] tiny:" in proc.stdout
    r = json.loads(out.read_text())
    # steps 2 and 3 are timed (the first is skipped): 2 steps x 2 sequences x 128 tokens
    assert r["status"] == "ok" and r["steps_timed"] == 2 and r["tokens"] == 2 * 2 * 128, r
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["seq_len"] == 128 and r["batch_size"] == 2 and r["world_size"] == 1 and r["flops_per_token"] > 0
    assert "mfu" not in r  # no bf16 peak on the CPU
    assert fit_probe.main([str(out)]) == 0
    table = capsys.readouterr().out
    assert "| tiny | SingleDeviceStrategy | 1 | 1 | 128 | 2 |" in table


def test_too_few_steps_are_reported_not_divided_by_zero(tmp_path: Path) -> None:
    record = {"name": "x", "status": "nothing timed: max_steps must exceed skip_steps=5"}
    assert fit_probe.status_line(record) == record["status"]
    (tmp_path / "fit_x.json").write_text(json.dumps(record))
    assert fit_probe.fit_rows(fit_probe.read_records([str(tmp_path / "fit_x.json"), str(tmp_path / "none.json")])
                              )[0][-1].startswith("nothing timed")
