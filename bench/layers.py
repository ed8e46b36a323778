"""Whole-layer benchmark: one SH2 block of each type (RMSNorm + mixer + RMSNorm + gated MLP) at the 7B width.

For SE, MR, LI and MHA blocks: forward and forward+backward time of a single ``SH2Block`` (projections,
featurizer, mixer, MLP) at batch 1 and several sequence lengths, bf16 autocast, ``triton.testing.do_bench``
median on fresh random inputs, with the bf16 matmul ceiling measured in the same run and the share of the
block's analytic FLOPs (SPEC 4.4) it achieves.

    python bench/layers.py --out layers.json                      # 7B width, L = 8K, 32K, 128K (GPU)
    python bench/layers.py --preset tiny --lengths 256 --reps 1   # CPU smoke run (timings meaningless)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from sh2.models import SH2Config
from sh2.models.model import SH2Block
from sh2.training.flops import layer_flops_per_token, measure_bf16_peak_flops


def bench(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``: triton's do_bench on CUDA, a plain timer elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_block(cfg: SH2Config, op: str, L: int, device: torch.device, reps: int) -> dict[str, float]:
    """Forward and forward+backward milliseconds of one block of ``cfg`` (a one-layer config)."""
    torch.manual_seed(0)
    block = SH2Block(cfg, 0).to(device)
    x = torch.randn(1, L, cfg.hidden_size, device=device, requires_grad=True)
    dy = torch.randn_like(x)

    def fwd() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return block(x)

    def fwd_bwd() -> None:
        torch.autograd.grad(fwd(), [x, *block.parameters()], dy)

    with torch.no_grad():
        out = {"fwd_ms": bench(fwd, device, reps)}
    out["fwd_bwd_ms"] = bench(fwd_bwd, device, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="evo2_7b_8k")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = measure_bf16_peak_flops(device)
    base = SH2Config.from_name(args.preset)
    rows = []
    for L in args.lengths:
        for op, symbol in (("SE", "S"), ("MR", "D"), ("LI", "H"), ("MHA", "*")):
            cfg = base.replace(num_layers=1, layout=symbol)
            row = {"block": op, "seq_len": L, "width": cfg.hidden_size}
            try:
                row.update(time_block(cfg, op, L, device, args.reps))
                flops = L * sum(layer_flops_per_token(cfg, op, L).values())
                if peak:
                    row["fwd_bwd_mfu"] = 3 * flops / (row["fwd_bwd_ms"] * 1e-3) / peak
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}; measured bf16 matmul peak: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    print(f"{'L':>8} {'block':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['seq_len']:>8} {r['block']:>6} {r['error']}")
            continue
        mfu = f"{r['fwd_bwd_mfu']:.1%}" if "fwd_bwd_mfu" in r else "-"
        print(f"{r['seq_len']:>8} {r['block']:>6} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f} {mfu:>6}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "peak_flops": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
