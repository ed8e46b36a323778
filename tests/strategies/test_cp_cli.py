"""``sh2 fit --config configs/tiny_cp.yaml`` (2 processes, CP = 2) logs the losses of ``configs/tiny.yaml``."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
OVERRIDES = ["--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches",
             "0", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "csv",
             "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"]


def _fit(config: str, workdir: Path) -> list[dict[str, float]]:
    workdir.mkdir()
    exe = shutil.which("sh2", path=os.path.dirname(sys.executable)) or shutil.which("sh2")
    assert exe, "the sh2 console script is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([exe, "fit", "--config", str(ROOT / "configs" / config), *OVERRIDES], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics,) = workdir.glob("csv/*/version_0/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    return [{k: float(r[k]) for k in ("train/loss", "train/grad_norm") if r.get(k)} for r in rows]


@pytest.mark.slow
def test_tiny_cp_logs_the_losses_of_tiny(tmp_path: Path) -> None:
    single = _fit("tiny.yaml", tmp_path / "single")
    cp = _fit("tiny_cp.yaml", tmp_path / "cp")
    assert len(single) == len(cp) == STEPS
    for a, b in zip(cp, single):
        for key, value in b.items():
            assert abs(a[key] - value) <= 1e-5 * abs(value), (key, cp, single)
