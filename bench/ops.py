"""Operator benchmark of the sh2 kernels against their references and the sequence-mixing peers.

One command on the GPU machine (protocol of ANCHORS.md: batch 1, D = 4096, bf16, sequence mixing only,
``triton.testing.do_bench`` median, fresh random inputs for every operator and length)::

    PYTHONPATH=$PWD python bench/ops.py --check --out ops.json

It measures the ceilings first (device copy, counting bytes read + written; bf16 matmul), then for each
L: Hyena-SE (K = 7, 256 groups), Hyena-MR (K = 128, 256 groups, Dskip) and Hyena-LI (full-length
filter, Dskip) through the Triton kernels and through the PyTorch reference (``F.conv1d`` / fp32
``torch.fft``), causal SDPA (32 heads x 128), and flash-linear-attention DeltaNet and simple-GLA when
``fla`` is importable. ``--check`` first compares every kernel with the reference at realistic sizes.

With autotuning on (the default) the first call of each FIR shape compiles and times about 15 kernel
variants, so the whole run takes 6-7 minutes on an H100; ``--lengths`` and ``--ops`` split it.
``--profile NAME`` prints a per-kernel CUDA time breakdown of one fwd+bwd instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from sh2.kernels import _tuning, reference
from sh2.kernels.fft import gated_fft_conv_triton
from sh2.kernels.fir import gated_fir_conv_triton
from sh2.kernels.modal import modal_filter_triton

BF16 = torch.bfloat16


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench, events, warm-up excluded)."""
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def ceilings() -> dict[str, float]:
    """Device copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s), measured here."""
    n = 1 << 30  # bytes
    a = torch.randn(n // 2, device="cuda", dtype=BF16)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    copy_gbs = 2 * n / ms / 1e6
    m = 8192
    x, y = (torch.randn(m, m, device="cuda", dtype=BF16) for _ in range(2))
    ms_mm = bench(lambda: x @ y)
    return {"copy_GBps": copy_gbs, "matmul_bf16_TFLOPs": 2 * m**3 / ms_mm / 1e9}


def _hyena_inputs(L: int, D: int, G: int, K: int, bias: bool, grad: bool):
    q, k, v = (torch.randn(1, L, D, device="cuda", dtype=BF16, requires_grad=grad) for _ in range(3))
    h = (torch.randn(G, K, device="cuda") / math.sqrt(K)).requires_grad_(grad)
    b = torch.randn(D, device="cuda", requires_grad=grad) if bias else None
    return q, k, v, h, b


def _time_op(make: Callable[[bool], tuple], fn: Callable, backward: bool) -> float:
    """Time forward (or forward + backward of all inputs) on freshly drawn inputs."""
    args = make(backward)
    if not backward:
        with torch.no_grad():
            return bench(lambda: fn(*args))
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    dy = torch.randn_like(out)
    del out

    def step():
        for a in leaves:
            a.grad = None
        o = fn(*args)
        o = o[0] if isinstance(o, tuple) else o
        o.backward(dy)

    return bench(step)


def operators(D: int, fla_ok: bool) -> dict[str, tuple[Callable[[int], Callable[[bool], tuple]], Callable]]:
    """name -> (inputs factory for L, callable)."""
    G = D // 16
    ops: dict[str, tuple] = {
        "SE K=7 triton": (lambda L: lambda g: _hyena_inputs(L, D, G, 7, False, g), gated_fir_conv_triton),
        "SE K=7 torch conv1d": (lambda L: lambda g: _hyena_inputs(L, D, G, 7, False, g), reference.gated_fir_conv_ref),
        "MR K=128 triton": (lambda L: lambda g: _hyena_inputs(L, D, G, 128, True, g), gated_fir_conv_triton),
        "MR K=128 torch conv1d": (lambda L: lambda g: _hyena_inputs(L, D, G, 128, True, g),
                                  reference.gated_fir_conv_ref),
        "LI triton fft": (lambda L: lambda g: _hyena_inputs(L, D, D, L, True, g), gated_fft_conv_triton),
        "LI torch fft": (lambda L: lambda g: _hyena_inputs(L, D, D, L, True, g), reference.gated_fft_conv_ref),
    }
    H = D // 128

    def sdpa_inputs(L):
        return lambda g: tuple(torch.randn(1, H, L, 128, device="cuda", dtype=BF16, requires_grad=g) for _ in range(3))

    ops["SDPA causal 32x128"] = (sdpa_inputs, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if fla_ok:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla

        def la_inputs(L, kind):
            def make(g):
                q, k, v = (torch.randn(1, L, H, 128, device="cuda", dtype=BF16) for _ in range(3))
                k = F.normalize(k.float(), dim=-1).to(BF16)
                if kind == "delta":
                    extra = torch.rand(1, L, H, device="cuda", dtype=BF16).sigmoid()
                else:
                    extra = F.logsigmoid(torch.randn(1, L, H, device="cuda", dtype=torch.float32))
                return tuple(x.requires_grad_(g) for x in (q, k, v, extra))
            return make

        ops["DeltaNet fla"] = (lambda L: la_inputs(L, "delta"), lambda q, k, v, b: chunk_delta_rule(q, k, v, b))
        ops["simple-GLA fla"] = (lambda L: la_inputs(L, "gla"), lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g))
    return ops


def check(D: int, L: int) -> list[tuple[str, float]]:
    """Relative errors of every Triton kernel vs the fp32 reference on the same bf16 inputs, fwd and grads."""
    torch.manual_seed(0)
    out = []
    cases = [("SE", gated_fir_conv_triton, reference.gated_fir_conv_ref, D // 16, 7, False),
             ("MR", gated_fir_conv_triton, reference.gated_fir_conv_ref, D // 16, 128, True),
             ("LI", gated_fft_conv_triton, reference.gated_fft_conv_ref, D, L, True)]
    for name, fn, ref, G, K, bias in cases:
        u = torch.randn(1, L, 3 * D, device="cuda", dtype=BF16, requires_grad=True)
        h = (torch.randn(G, K, device="cuda") * torch.exp(-torch.arange(K, device="cuda") / 64)).requires_grad_(True)
        b = torch.randn(D, device="cuda", requires_grad=True) if bias else None
        leaves = [x for x in (u, h, b) if x is not None]
        refs = [x.detach().float().requires_grad_(True) for x in leaves]
        y = fn(u[..., :D], u[..., D:2 * D], u[..., 2 * D:], h, b)
        ur = refs[0]
        yr = ref(ur[..., :D], ur[..., D:2 * D], ur[..., 2 * D:], refs[1], refs[2] if bias else None)
        dy = torch.randn_like(y)
        errs = [y.float().sub(yr).norm().item() / yr.norm().item()]
        for g, gr in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(yr, refs, dy.float())):
            errs.append(g.float().sub(gr).norm().item() / gr.norm().item())
        out.append((name, max(errs)))
        print(f"check {name}: max rel err (fwd, grads) = {max(errs):.2e}  {[f'{e:.1e}' for e in errs]}")
    lp = torch.rand(D, 16, device="cuda").mul(-0.1).sub(0.01).requires_grad_(True)
    r = torch.randn(D, 16, device="cuda").requires_grad_(True)
    hm = modal_filter_triton(lp, r, L)
    lp64, r64 = (x.detach().double().requires_grad_(True) for x in (lp, r))
    hr = reference.modal_filter_ref(lp64, r64, L)
    dh = torch.randn_like(hm)
    errs = [hm.double().sub(hr).norm().item() / hr.norm().item()]
    for g, gr in zip(torch.autograd.grad(hm, (lp, r), dh), torch.autograd.grad(hr, (lp64, r64), dh.double())):
        errs.append(g.double().sub(gr).norm().item() / gr.norm().item())
    out.append(("modal", max(errs)))
    print(f"check modal: max rel err = {max(errs):.2e}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,8192,32768,131072")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--ops", default="", help="comma-separated substrings of operator names to run (default all)")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--check", action="store_true", help="correctness checks at realistic sizes first")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--profile", default="", help="print a CUDA kernel breakdown of fwd+bwd for ops matching this "
                   "substring at the first length, then exit")
    a = p.parse_args(argv)
    D = a.dim
    try:
        import fla  # noqa: F401

        fla_ok = True
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"note: fla not importable ({e}); DeltaNet / simple-GLA skipped")
        fla_ok = False
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "D": D, "batch": 1}
    if a.check:
        res["check"] = check(D, 8192)
        bad = [n for n, e in res["check"] if not e < 2e-2]
        if bad:
            print(f"CHECK FAILED: {bad}")
            return 1
    res["ceilings"] = ceilings()
    copy = res["ceilings"]["copy_GBps"]
    print(f"ceilings: copy {copy:.0f} GB/s, bf16 matmul {res['ceilings']['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    ops = operators(D, fla_ok)
    if a.profile:
        return profile(ops, a.profile, int(a.lengths.split(",")[0]))
    wanted = [s for s in a.ops.split(",") if s]
    rows = []
    for L in (int(x) for x in a.lengths.split(",")):
        for name, (make, fn) in ops.items():
            if wanted and not any(w in name for w in wanted):
                continue
            row = {"op": name, "L": L}
            for mode in ("fwd", "fwdbwd") if not a.no_backward else ("fwd",):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    row[mode] = _time_op(make(L), fn, mode == "fwdbwd")
                    row[mode + "_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                except torch.cuda.OutOfMemoryError:
                    row[mode] = None
                    row[mode + "_note"] = "out of memory"
                except Exception as e:  # keep measuring the other operators
                    row[mode] = None
                    row[mode + "_error"] = repr(e)[:300]
                torch.cuda.empty_cache()
            floor_f = 4 * L * D * 2 / (copy * 1e9) * 1e3
            floor_fb = 11 * L * D * 2 / (copy * 1e9) * 1e3
            row["fwd_frac_copy"] = floor_f / row["fwd"] if row.get("fwd") else None
            row["fwdbwd_over_floor"] = row["fwdbwd"] / floor_fb if row.get("fwdbwd") else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            res["rows"] = rows
            res["chosen_configs"] = {repr(k): repr(v) for k, v in _tuning._CACHE.items()}
            if a.out:  # rewritten after every row, so a run cut short keeps what it measured
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=1)
    print_table(rows)
    return 0


def profile(ops: dict, pattern: str, L: int) -> int:
    """Per-kernel CUDA time of one forward + backward (after warm-up) for each matching operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, (make, fn) in ops.items():
        if pattern not in name:
            continue
        args = make(L)(True)
        out = fn(*args)
        dy = torch.randn_like(out)
        for _ in range(2):
            fn(*args).backward(dy)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args).backward(dy)
            torch.cuda.synchronize()
        print(f"== {name} L={L} fwd+bwd")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    return 0


def print_table(rows: list[dict]) -> None:
    """Markdown table: ms, fraction of the copy ceiling (gated-conv byte floor), speedups over the peers."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    by = {(r["op"], r["L"]): r for r in rows}
    peers = ["torch", "DeltaNet fla", "simple-GLA fla", "SDPA causal 32x128"]
    print("| op | L | fwd ms | fwd floor/time | fwd+bwd ms | fwd+bwd / 11-tensor floor | fwd speedup vs ref / "
          "DeltaNet / GLA / SDPA | fwd+bwd speedup vs ref / DeltaNet / GLA / SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = {"fwd": [], "fwdbwd": []}
        if "triton" in r["op"]:
            ref_name = r["op"].replace("triton fft", "torch fft").replace("triton", "torch conv1d")
            for mode in sp:
                for peer in [ref_name] + peers[1:]:
                    o = by.get((peer, r["L"]), {}).get(mode)
                    sp[mode].append(f"{o / r[mode]:.1f}x" if o and r.get(mode) else "-")
        fwd = "OOM" if r.get("fwd_note") else fmt(r.get("fwd"))
        fb = "OOM" if r.get("fwdbwd_note") else fmt(r.get("fwdbwd"))
        print(f"| {r['op']} | {r['L']} | {fwd} | {fmt(r.get('fwd_frac_copy'), '.0%')} | "
              f"{fb} | {fmt(r.get('fwdbwd_over_floor'), '.2f')} | {' / '.join(sp['fwd'])} | "
              f"{' / '.join(sp['fwdbwd'])} |")


if __name__ == "__main__":
    sys.exit(main())
