"""Whole-layer benchmark: one SH2 block of each type (RMSNorm + mixer + RMSNorm + gated MLP) at the 7B width.

For SE, MR, LI and MHA blocks: forward and forward+backward time of a single ``SH2Block`` (projections,
featurizer, mixer, MLP) at batch 1 and several sequence lengths, bf16 autocast, ``triton.testing.do_bench``
median on fresh random inputs, with the bf16 matmul ceiling measured in the same run and the share of the
block's analytic FLOPs (``sh2.training.flops.layer_flops_per_token``) it achieves.

    PYTHONPATH=$PWD python bench/layers.py --out layers.json                      # 7B width, L = 8K, 32K, 128K (GPU)
    PYTHONPATH=$PWD python bench/layers.py --preset tiny --lengths 256 --reps 1   # CPU smoke run (timings meaningless)
"""

from __future__ import annotations

import argparse

import torch

from bench.common import (
    bench_ms,
    default_device,
    fmt,
    free_memory,
    measure_ceilings,
    print_table,
    run_info,
    with_li_algorithm,
    write_json,
)
from sh2.models import SH2Config
from sh2.models.model import SH2Block
from sh2.training.flops import layer_flops_per_token


def time_block(cfg: SH2Config, L: int, device: torch.device, reps: int) -> dict[str, float]:
    """Forward and forward+backward milliseconds of one block of ``cfg`` (a one-layer config)."""
    torch.manual_seed(0)
    with torch.device(device):
        block = SH2Block(cfg, 0)
    x = torch.randn(1, L, cfg.hidden_size, device=device, requires_grad=True)
    dy = torch.randn_like(x)

    def fwd() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return block(x)

    def fwd_bwd() -> None:
        torch.autograd.grad(fwd(), [x, *block.parameters()], dy)

    with torch.no_grad():
        out = {"fwd_ms": bench_ms(fwd, device, warmup_ms=5, rep_ms=50, cpu_reps=reps)}
    out["fwd_bwd_ms"] = bench_ms(fwd_bwd, device, warmup_ms=5, rep_ms=50, cpu_reps=reps)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    ap.add_argument("--preset", default="evo2_7b_8k")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--li-algorithm", default=None, help="Hyena-LI path (modal | fft) where SH2Config has it")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    ceil = measure_ceilings(device)
    peak = ceil["matmul_bf16_TFLOPs"] * 1e12 if device.type == "cuda" else None
    base = with_li_algorithm(SH2Config.from_name(args.preset), args.li_algorithm)
    rows = []
    report = {**run_info(device), "ceilings": ceil, "rows": rows}
    for L in args.lengths:
        for op, symbol in (("SE", "S"), ("MR", "D"), ("LI", "H"), ("MHA", "*")):
            cfg = base.replace(num_layers=1, layout=symbol)
            row = {"block": op, "seq_len": L, "width": cfg.hidden_size}
            try:
                row.update(time_block(cfg, L, device, args.reps))
                flops = L * sum(layer_flops_per_token(cfg, op, L).values())
                if peak:
                    row["fwd_bwd_mfu"] = 3 * flops / (row["fwd_bwd_ms"] * 1e-3) / peak
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            free_memory(device)
            rows.append(row)
            print(f"  {op:<4s} L={L:>7d}  fwd {fmt(row.get('fwd_ms'), '.3f')} ms  fwd+bwd "
                  f"{fmt(row.get('fwd_bwd_ms'), '.3f')} ms  {row.get('error', '')}", flush=True)
            write_json(args.out, report)
    print_table(f"One block at width {base.hidden_size} ({report['device']}; bf16 matmul "
                f"{fmt(peak and peak / 1e12, '.0f')} TFLOP/s measured)",
                ["L", "block", "fwd ms", "fwd+bwd ms", "fwd+bwd MFU"],
                [[r["seq_len"], r["block"], fmt(r.get("fwd_ms"), ".3f"), fmt(r.get("fwd_bwd_ms"), ".3f"),
                  fmt(r.get("fwd_bwd_mfu"), ".1%") if "error" not in r else r["error"]] for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
