"""Correctness checks of the sh2 sequence-mixing kernels at realistic sizes, run by bench/ops.py before timing.

Each kernel gets bf16 inputs and is compared with a float64 reference on the same values (the inputs upcast),
output and every gradient, by ``||out - ref|| / ||ref||``: bf16 outputs land near 3e-3, the tolerance is 2e-2.
The Hyena-LI modal kernel is also checked with fp32 inputs (tolerance 1e-4: fp32 states and accumulation), with
an initial state and its final state, against :func:`modal_reference`. Alone::

    PYTHONPATH=$PWD python bench/kernel_checks.py                       # D = 4096, L = 8192 on the GPU
    PYTHONPATH=$PWD python bench/kernel_checks.py --device cpu --dim 32 --len 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from bench.common import Budget, default_device, error_line, free_memory, rel_err, write_json
from sh2 import kernels
from sh2.kernels import reference
from sh2.models.filters import ModalFilter

BF16 = torch.bfloat16
STATE_SIZE = 16
CHECK_TOL = {"bf16": 2e-2, "fp32": 1e-4}


def modal_kernel() -> Callable[..., Any] | None:
    """``sh2.kernels.gated_modal_conv`` where the tree has it."""
    return getattr(kernels, "gated_modal_conv", None)


def modal_parameters(D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_poles, residues)`` ``[D, 16]`` fp32 as the model initialises them (``ModalFilter``)."""
    with torch.device(device):
        f = ModalFilter(D, STATE_SIZE)
    return f.log_poles().detach(), f.residues().detach()


def modal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                    residues: torch.Tensor, bias: torch.Tensor, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 Hyena-LI with an initial state, from the explicit filter: ``(y [B, L, D], final state [B, D, N])``.

    With ``z = k v`` and decays ``lambda = exp(log_poles)``, the recurrence ``s_t = lambda s_{t-1} + z_t`` (from
    ``s_{-1} = s0``), ``y_t = q_t (sum_n R_n s_t,n + bias z_t)`` is, unrolled,
    ``y_t = q_t (sum_j h_{t-j} z_j + bias z_t + sum_n R_n lambda_n^(t+1) s0_n)`` with ``h_t = sum_n R_n lambda_n^t``
    (the FFT path's filter), and the final state is ``lambda^L s0 + sum_j lambda^(L-1-j) z_j``.
    """
    B, L, D = q.shape
    z = k * v
    y = reference.fft_causal_conv(z, reference.modal_filter_ref(log_poles, residues, L)) + bias * z
    carried = torch.stack([reference.modal_filter_ref(log_poles, residues * s0[b], L + 1)[:, 1:].t()
                           for b in range(B)])
    y = q * (y + carried)
    t = torch.arange(L, device=q.device, dtype=q.dtype)
    parts = []
    for c0 in range(0, D, 256):  # [c, N, L] decay powers per channel chunk, never [D, N, L] at once
        lp = log_poles[c0:c0 + 256]
        decay = torch.exp(lp[..., None] * (L - 1 - t))
        parts.append(torch.einsum("btc,cnt->bcn", z[:, :, c0:c0 + 256], decay))
    return y, torch.exp(log_poles * L) * s0 + torch.cat(parts, dim=1)


def check_modal(fn: Callable[..., Any], D: int, L: int, device: torch.device) -> list[dict[str, Any]]:
    """The modal kernel with an initial state and its final state vs :func:`modal_reference`, bf16 and fp32 inputs.

    Errors of the output, the final state and the gradients of q, k, v, log_poles, residues, bias and the
    initial state (the loss weights both outputs by random tensors).
    """
    rows = []
    for name, dtype in (("bf16", BF16), ("fp32", torch.float32)):
        g = torch.Generator(device=device).manual_seed(1)
        B = 2
        q, k, v = (torch.randn(B, L, D, device=device, generator=g).to(dtype) for _ in range(3))
        lp, r = modal_parameters(D, device)
        bias = torch.randn(D, device=device, generator=g)
        s0 = torch.randn(B, D, STATE_SIZE, device=device, generator=g) * 0.1
        leaves = [t.requires_grad_() for t in (q, k, v, lp, r, bias, s0)]
        y, state = fn(q, k, v, lp, r, bias, initial_state=s0, return_state=True)
        dy = torch.randn(y.shape, device=device, generator=g)
        ds = torch.randn(state.shape, device=device, generator=g) if state.shape == s0.shape else None
        names = ["y", "state", "dq", "dk", "dv", "dlog_poles", "dresidues", "dbias", "dinitial_state"]
        if ds is None:
            rows.append({"check": f"LI modal {name}", "ok": False, "tol": CHECK_TOL[name],
                         "error": f"final state has shape {tuple(state.shape)}, expected [B, D, N] = "
                                  f"{tuple(s0.shape)}"})
            continue
        grads = torch.autograd.grad((y.float() * dy).sum() + (state.float() * ds).sum(), leaves)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        y64, s64 = modal_reference(*ref_leaves)
        ref_grads = torch.autograd.grad((y64 * dy.double()).sum() + (s64 * ds.double()).sum(), ref_leaves)
        errs = {n: rel_err(a, b) for n, a, b in zip(names, [y, state, *grads], [y64, s64, *ref_grads])}
        rows.append({"check": f"LI modal {name}", "max_rel_err": max(errs.values()), "errors": errs,
                     "tol": CHECK_TOL[name], "ok": bool(max(errs.values()) < CHECK_TOL[name])})
        del y, state, grads, y64, s64, ref_grads, ref_leaves, leaves
        free_memory(device)
    return rows


def check(D: int, L: int, device: torch.device, backend: str, budget: Budget) -> list[dict[str, Any]]:
    """Every kernel on bf16 inputs vs the float64 reference on the same values, output and every gradient."""
    rows: list[dict[str, Any]] = []
    g = torch.Generator(device=device).manual_seed(0)

    def fir(q, k, v, h, b):
        return kernels.gated_fir_conv(q, k, v, h, b, backend=backend)

    def fft(q, k, v, h, b):
        return kernels.gated_fft_conv(q, k, v, h, b, backend=backend)

    cases = [("SE", fir, reference.gated_fir_conv_ref, D // 16, 7, False),
             ("MR", fir, reference.gated_fir_conv_ref, D // 16, 128, True),
             ("LI fft", fft, reference.gated_fft_conv_ref, D, L, True)]
    for name, fn, ref, G, K, bias in cases:
        if not budget.allows(5.0):
            rows.append({"check": name, "ok": None, "status": "skipped: time budget"})
            continue
        u = torch.randn(1, L, 3 * D, device=device, generator=g).to(BF16).requires_grad_()
        decay = torch.exp(-torch.arange(K, device=device) / 64)
        h = (torch.randn(G, K, device=device, generator=g) * decay).requires_grad_()
        b = torch.randn(D, device=device, generator=g).requires_grad_() if bias else None
        leaves = [x for x in (u, h, b) if x is not None]
        refs = [x.detach().double().requires_grad_() for x in leaves]
        y = fn(u[..., :D], u[..., D:2 * D], u[..., 2 * D:], h, b)
        ur = refs[0]
        yr = ref(ur[..., :D], ur[..., D:2 * D], ur[..., 2 * D:], refs[1], refs[2] if bias else None)
        dy = torch.randn(y.shape, device=device, generator=g)
        errs = [rel_err(y, yr)]
        errs += [rel_err(a, b) for a, b in zip(torch.autograd.grad(y.float(), leaves, dy),
                                               torch.autograd.grad(yr, refs, dy.double()))]
        rows.append({"check": name, "max_rel_err": max(errs), "errors": errs, "tol": CHECK_TOL["bf16"],
                     "ok": bool(max(errs) < CHECK_TOL["bf16"])})
        free_memory(device)
    modal = modal_kernel()
    if modal is None:
        rows.append({"check": "LI modal", "ok": None, "status": "sh2.kernels.gated_modal_conv not in this tree"})
    elif not budget.allows(10.0):
        rows.append({"check": "LI modal", "ok": None, "status": "skipped: time budget"})
    else:
        try:
            rows += check_modal(modal, D, L, device)
        except Exception as err:  # reported beside the others; the timings still run
            rows.append({"check": "LI modal", "ok": False, "error": error_line(err)[:300]})
        free_memory(device)
    for r in rows:
        verdict = {True: "ok", False: "FAIL", None: r.get("status", "-")}[r["ok"]]
        err = f"max rel err {r['max_rel_err']:.2e} (tol {r['tol']:g})" if "max_rel_err" in r else r.get("error", "")
        print(f"check {r['check']:<14s} {err}  {verdict}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    p.add_argument("--dim", type=int, default=4096, help="width D")
    p.add_argument("--len", type=int, default=8192, help="sequence length")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--out", default=None, help="JSON results")
    a = p.parse_args(argv)
    rows = check(a.dim, a.len, torch.device(a.device), a.backend, Budget(None))
    write_json(a.out, rows)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
