"""End-to-end training-step benchmark: an SH2 stack against the Transformer layout of the same width and depth.

Times a full training step (forward, backward, AdamW) of a model with the 7B width at several sequence
lengths, batch 1, bf16 autocast, and reports step time, tokens/s and MFU against the bf16 matmul peak
measured in the same run (SPEC 4.4: analytic FLOPs). The depth is reduced (``--layers``) so that 128K tokens
fit on one GPU; each layout is striped the Evo 2 way.

    python bench/e2e.py --preset evo2_7b_8k --layers 8 --lengths 8192 32768 131072 --out e2e.json
    python bench/e2e.py --preset tiny --lengths 256 --steps 2        # CPU smoke run (timings meaningless)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sh2.models import SH2Config, SH2Model, parameter_groups
from sh2.models.config import stripe_layout
from sh2.training.flops import measure_bf16_peak_flops, model_flops_per_token


def time_steps(model: torch.nn.Module, seq_len: int, steps: int, device: torch.device) -> float:
    """Median seconds of one training step."""
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, 512, (1, seq_len), device=device)
    y = torch.randint(0, 512, (1, seq_len), device=device)
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # two warm-up steps (Triton compilation, autotuning, allocator)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="evo2_7b_8k")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = measure_bf16_peak_flops(device)
    base = SH2Config.from_name(args.preset)
    attn = tuple(i for i in range(args.layers) if i % 7 == 3)
    layouts = {"sh2": stripe_layout(args.layers, attn), "transformer": "*" * args.layers}
    rows = []
    for L in args.lengths:
        for name, layout in layouts.items():
            cfg = base.replace(num_layers=args.layers, layout=layout)
            row = {"layout": name, "pattern": layout, "seq_len": L, "layers": args.layers,
                   "width": cfg.hidden_size}
            try:
                torch.manual_seed(0)
                model = SH2Model(cfg).to(device)
                model.activation_checkpointing = args.checkpointing
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                step = time_steps(model, L, args.steps, device)
                tps = L / step
                row.update(step_ms=step * 1e3, tokens_per_s=tps,
                           mfu=(tps * model_flops_per_token(cfg, L) / peak) if peak else None,
                           peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                           else None)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            finally:
                model = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; measured bf16 "
          f"matmul peak: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    print(f"{'L':>8} {'layout':>12} {'step ms':>10} {'tokens/s':>10} {'MFU':>6} {'mem GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['seq_len']:>8} {r['layout']:>12} {r['error']:>10}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['seq_len']:>8} {r['layout']:>12} {r['step_ms']:>10.1f} {r['tokens_per_s']:>10.0f} {mfu:>6} {mem:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "peak_flops": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
