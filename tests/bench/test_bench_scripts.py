"""Every benchmark script answers --help, every shell script is valid bash, gpu_app.sh refuses what it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py"
                                          and p.name != "common.py"))
def test_help(script: str) -> None:
    proc = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.sh")))
def test_shell_script_is_valid_bash(script: str) -> None:
    proc = subprocess.run(["bash", "-n", f"bench/{script}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args", [["/tmp/out"], ["/tmp/out", "30"], ["/tmp/out", "ops", "nonsense"]])
def test_gpu_app_needs_known_parts(args: list[str]) -> None:
    proc = subprocess.run(["bash", "bench/gpu_app.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "PARTS" in proc.stdout, proc.stdout + proc.stderr
