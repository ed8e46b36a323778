"""bench/ops.py on the CPU at tiny shapes: every selected row is timed, the floors and targets follow from the
times, and the LI modal check compares a kernel with the float64 reference (and fails a wrong one).

Until the tree has ``sh2.kernels.gated_modal_conv``, a sequential recurrence written here stands in for it; it
is independent of the check's float64 reference (an FFT convolution with the explicit filter plus the closed
form of the initial state's contribution), so the passing check also validates that reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import ops
from sh2 import kernels


def recurrence(q, k, v, log_poles, residues, bias=None, initial_state=None, return_state=False, *, late=False):
    """``s_t = lambda s_(t-1) + k_t v_t`` (fp32, from ``initial_state``), ``y_t = q_t (R . s_t + bias k_t v_t)``.

    ``late=True`` reads the state before the update (a wrong kernel: the current token misses the filter's tap 0).
    """
    B, L, D = q.shape
    lam = torch.exp(log_poles.float())
    s = torch.zeros(B, D, log_poles.shape[1]) if initial_state is None else initial_state.float()
    z = k.float() * v.float()
    ys = []
    for t in range(L):
        before = s
        s = lam * s + z[:, t, :, None]
        y = ((before if late else s) * residues.float()).sum(-1)
        ys.append(y if bias is None else y + bias.float() * z[:, t])
    y = (q.float() * torch.stack(ys, 1)).to(q.dtype)
    return (y, s) if return_state else y


@pytest.fixture
def modal(monkeypatch: pytest.MonkeyPatch):
    if not hasattr(kernels, "gated_modal_conv"):
        monkeypatch.setattr(kernels, "gated_modal_conv", recurrence, raising=False)
    return kernels.gated_modal_conv


def run(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "ops.json"
    rc = ops.main(["--device", "cpu", "--dim", "32", "--check-len", "48", "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_every_selected_row_is_timed_with_its_floors(tmp_path: Path, modal) -> None:
    rc, res = run(tmp_path, "--lengths", "64,128", "--long-len", "256", "--groups", "li,se,mr,long")
    assert rc == 0, res["check"]
    checks = {r["check"]: r for r in res["check"]}
    assert {"SE", "MR", "LI fft", "LI modal bf16", "LI modal fp32"} <= set(checks)
    assert all(r["ok"] for r in checks.values()), checks
    # fp32 inputs: the kernel and the float64 reference agree to fp32 rounding, every output and gradient
    assert checks["LI modal fp32"]["max_rel_err"] < 1e-5, checks["LI modal fp32"]["errors"]
    rows = {(r["op"], r["L"]): r for r in res["rows"]}
    assert set(rows) == {(op, L) for op in ("LI modal", "LI fft", "SE K=7", "MR K=128") for L in (64, 128)}
    copy = res["ceilings"]["copy_GBps"]
    for r in rows.values():
        assert r["fwd_status"] == r["fwdbwd_status"] == "ok", r
        floor4 = 4 * r["L"] * 32 * 2 / (copy * 1e9) * 1e3
        assert r["fwd_over_floor"] == pytest.approx(r["fwd_ms"] / floor4)
        assert r["fwdbwd_over_floor"] == pytest.approx(r["fwdbwd_ms"] / (floor4 * 11 / 4))
    long = {r["op"]: r for r in res["long"]}
    assert set(long) == {"LI modal", "LI fft"} and all(r["L"] == 256 for r in long.values())
    assert all(r["fwdbwd_status"] == r["fwd_status"] == "ok" for r in long.values()), long


def test_modal_check_fails_a_kernel_that_reads_the_state_too_early(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(kernels, "gated_modal_conv", lambda *a, **kw: recurrence(*a, **kw, late=True), raising=False)
    rc, res = run(tmp_path, "--lengths", "32", "--groups", "se")
    assert rc == 1
    modal_checks = [r for r in res["check"] if r["check"].startswith("LI modal")]
    assert modal_checks and not any(r["ok"] for r in modal_checks)
    assert all(r["errors"]["y"] > 1e-2 for r in modal_checks)


def test_time_budget_skips_and_records(tmp_path: Path, modal) -> None:
    rc, res = run(tmp_path, "--lengths", "64", "--groups", "se,mr", "--no-check", "--time-budget", "0.001")
    assert rc == 0
    assert all(str(r["fwd_status"]).startswith("skipped: time budget") for r in res["rows"]), res["rows"]


def test_targets_follow_the_measured_ratios() -> None:
    def row(op: str, L: int, **kw) -> dict:
        return {"op": op, "L": L, "group": "li", **kw}

    rows = [row("LI modal", 32768, fwd_over_floor=1.5, fwdbwd_over_floor=3.5, fwd_ms=1.0, fwdbwd_ms=4.0),
            row("simple-GLA fla", 32768, fwd_ms=0.9), row("DeltaNet fla", 32768, fwdbwd_ms=6.0),
            row("SE K=7", 8192, fwd_frac_copy=0.81, fwdbwd_over_floor=2.9)]
    got = {(t[0], t[1]): t[3] for t in ops.targets(rows, [])}
    assert got[("LI modal fwd <= 2x 4-tensor floor", 32768)] == "yes"
    assert got[("LI modal fwd+bwd <= 3x 11-tensor floor", 32768)] == "**no**"
    assert got[("LI modal fwd faster than simple-GLA fla", 32768)] == "**no**"  # 0.9 ms vs 1.0 ms
    assert got[("LI modal fwd+bwd faster than DeltaNet fla", 32768)] == "yes"
    assert got[("SE K=7 fwd >= 70% of copy", 8192)] == "yes"
    assert got[("SE K=7 fwd+bwd <= 2x 11-tensor floor", 8192)] == "**no**"
