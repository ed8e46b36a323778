"""Where the time of the Hyena-LI modal recurrence goes: each pass of the kernel timed alone, on one GPU.

The kernel (``sh2/kernels/modal_conv.py``) runs the forward as chunk end states -> scan -> outputs and the backward
as reverse chunk scans -> scan -> (dq, dlambda) and (dk, dv, dR) passes. This script times each of those passes
and the whole forward and forward+backward at the ANCHORS protocol (batch 1, D = 4096, bf16, 16 poles initialised
as the model does, ``triton.testing.do_bench`` median), with the copy-bandwidth and bf16-matmul ceilings measured
in the same run, the byte floors (4 tensors forward, 11 forward+backward) and the FFT path for comparison.

    python bench/modal_profile.py --out $OUT/modal_profile.json            # 8K, 32K, 128K and one 1M row
    python bench/modal_profile.py --lengths 8192 --no-million               # quick
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from triton.testing import do_bench

from bench.common import measure_ceilings
from sh2 import kernels
from sh2.kernels import modal_conv as mc
from sh2.kernels._tuning import _CACHE


def _inputs(L: int, D: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(1, L, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    gamma = torch.empty(D, 16, device=dev).uniform_(0.01, 0.1, generator=g).log_()
    log_poles = -torch.exp(torch.full((D, 16), -1.0, device=dev)) * torch.exp(gamma)  # ModalFilter's init
    residues = torch.randn(D, 16, device=dev, generator=g) * 0.1 / 4
    bias = torch.randn(D, device=dev, generator=g)
    return q, k, v, log_poles, residues, bias


def _ms(fn, reps: int = 50) -> float:
    return do_bench(fn, warmup=10, rep=reps, return_mode="median")


def profile_length(L: int, D: int, bandwidth: float) -> dict:
    """Timings (ms) of the whole operator and of each pass at one length."""
    q, k, v, lp, r, bias = _inputs(L, D)
    floor4 = 4 * L * D * 2 / bandwidth * 1e3
    floor11 = 11 * L * D * 2 / bandwidth * 1e3

    def fwd():
        return kernels.gated_modal_conv(q, k, v, lp, r, bias, check_values=False)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, lp, r, bias)]
    dy = torch.randn_like(q)

    def fwd_bwd():
        y = kernels.gated_modal_conv(*leaves, check_values=False)
        torch.autograd.grad(y, leaves, dy)

    t0 = time.perf_counter()
    fwd_bwd()  # compiles and autotunes every pass
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0
    row = {"L": L, "D": D, "fwd_ms": _ms(fwd), "fwd_bwd_ms": _ms(fwd_bwd), "floor4_ms": floor4, "floor11_ms": floor11,
           "first_call_s": first_call_s}
    plan = mc.plan_chunks(1, L, D, q.device)
    row["chunk"], row["n_chunks"] = plan.chunk, plan.n_chunks

    def states(sigma: bool):
        ends, sig_ends = mc.chunk_ends(k, v, lp, plan, sigma)
        return mc.combine_states(ends, sig_ends, lp, None, plan, L)

    starts, sig_starts, _, _ = states(True)
    carries, _ = mc.adjoint_carries(dy, q, lp, plan)
    row["passes_ms"] = {
        "states (forward)": _ms(lambda: states(False)),
        "states + sigma (training forward)": _ms(lambda: states(True)),
        "outputs": _ms(lambda: mc.forward_output(q, k, v, lp, r, bias, starts, plan)),
        "adjoint scans": _ms(lambda: mc.adjoint_carries(dy, q, lp, plan)),
        "input gradients (dq + dk/dv)": _ms(lambda: mc.input_grads(dy, q, k, v, lp, r, bias, starts, sig_starts,
                                                                    carries, None, plan)),
    }
    h = kernels.modal_filter(lp, r, L)
    row["fft_fwd_ms"] = _ms(lambda: kernels.gated_fft_conv(q, k, v, h, bias), reps=30)
    row["fwd_x_floor"], row["fwd_bwd_x_floor"] = row["fwd_ms"] / floor4, row["fwd_bwd_ms"] / floor11
    return row


def profile_million(D: int, bandwidth: float) -> dict:
    """One LI layer, forward and backward, at 1,048,576 tokens: time and memory beyond the inputs."""
    L = 1 << 20
    leaves = [t.requires_grad_() for t in _inputs(L, D)]
    dy = torch.randn_like(leaves[0])

    def fwd_bwd():
        y = kernels.gated_modal_conv(*leaves, check_values=False)
        torch.autograd.grad(y, leaves, dy)

    fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = _ms(fwd_bwd, reps=10)
    return {"L": L, "D": D, "fwd_bwd_ms": ms, "floor11_ms": 11 * L * D * 2 / bandwidth * 1e3,
            "peak_beyond_inputs_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
            "inputs_gib": 3 * L * D * 2 / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--no-million", action="store_true", help="skip the 1M-token row")
    parser.add_argument("--out", default=None, help="JSON file for every figure")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/modal_profile.py times Triton kernels: it needs a CUDA device")
    ceilings = measure_ceilings(torch.device("cuda"))
    bandwidth = ceilings["copy_GBps"] * 1e9
    rows = [profile_length(L, args.width, bandwidth) for L in args.lengths]
    million = None if args.no_million else profile_million(args.width, bandwidth)
    configs = {key[0]: str(cfg) for key, cfg in _CACHE.items() if str(key[0]).startswith("modal")}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceilings,
              "rows": rows, "million": million, "tuned_configs": configs}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    print("| L | fwd ms | x floor | fwd+bwd ms | x floor | FFT fwd ms | " + " | ".join(rows[0]["passes_ms"]) + " |")
    for r in rows:
        passes = " | ".join(f"{v:.3f}" for v in r["passes_ms"].values())
        print(f"| {r['L']} | {r['fwd_ms']:.3f} | {r['fwd_x_floor']:.2f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_bwd_x_floor']:.2f} | {r['fft_fwd_ms']:.2f} | {passes} |")
    if million:
        print(f"1M tokens: fwd+bwd {million['fwd_bwd_ms']:.1f} ms (floor {million['floor11_ms']:.1f}), "
              f"{million['peak_beyond_inputs_gib']:.1f} GiB beyond the {million['inputs_gib']:.0f} GiB of inputs")
    print("tuned:", configs)


if __name__ == "__main__":
    main()
