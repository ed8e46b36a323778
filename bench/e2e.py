"""End-to-end training step: an SH2 stack against the Transformer layout of the same width and depth.

One full training step (forward, backward, fused AdamW) of a model at the 7B width with reduced depth
(``--layers``, so that 128K tokens fit one GPU), bf16 autocast, fp32 weights, for each layout (the Evo 2
stripe, and every layer attention), eager and compiled (``torch.compile`` of every block:
``sh2.strategies.parallelize.apply_compile`` where the tree has it), with and without activation checkpointing,
at each length. Reports step time (median of the timed steps after the warm-up, which absorbs compilation and
kernel autotuning), tokens/s, MFU (analytic FLOPs of ``sh2.training.flops.model_flops_per_token`` against the
bf16 matmul peak measured in the same run), peak memory, the compiled step's first loss against eager's (same
weights and tokens) and the SH2 / Transformer ratio of tokens/s per length::

    PYTHONPATH=$PWD python bench/e2e.py --lengths 8192 --out e2e_8k.json                # about 3-4 minutes
    PYTHONPATH=$PWD python bench/e2e.py --lengths 32768 131072 --out e2e_long.json       # about 6-8 minutes
    PYTHONPATH=$PWD python bench/e2e.py --device cpu --preset tiny --layers 4 --lengths 128 256 --steps 1  # CPU smoke

``--checkpointing both`` (the default) runs both settings at every length, without checkpointing first at the
shortest length and last at the others; a run whose peak memory, extrapolated from the measured ones, would not
fit the GPU is skipped. ``--tokens-per-step T`` keeps the tokens of a step fixed (batch = T / L); the default
is batch 1 at every length (the protocol of the figures in ``shared/ANCHORS.md``). ``--li-algorithm`` picks the
Hyena-LI path where SH2Config has that field; the path measured is recorded either way. Compiled runs use
static shapes (one compilation per length). ``--time-budget`` skips what would not finish in time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    Budget,
    apply_compile,
    bench_layouts,
    default_device,
    error_line,
    fmt,
    free_memory,
    li_algorithm_of,
    measure_ceilings,
    predict_peak_gib,
    print_table,
    run_info,
    set_activation_checkpointing,
    static_training_gib,
    sync,
    with_li_algorithm,
    write_json,
)
from sh2.models import SH2Config, SH2Model, parameter_groups
from sh2.training.flops import model_flops_per_token

# Targets (shared/ANCHORS.md) for both layouts compiled at their best: SH2 tokens/s over the Transformer's.
RATIO_TARGETS = {8192: 1.3, 32768: 1.8, 131072: 3.0}


def configure_dynamo() -> None:
    """Static shapes (a training run has one sequence length) and room for one compilation per length/layout."""
    from torch import _dynamo

    cfg = _dynamo.config
    cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process so far."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def plan(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(length, activation checkpointing) in the order they run."""
    out = []
    lengths = sorted(args.lengths)
    for L in lengths:
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
        if args.checkpointing == "both" and L != lengths[0]:
            modes = [True, False]  # long sequences: the setting that fits first
        out += [(L, ck) for ck in modes]
    return out


def batch_for(args: argparse.Namespace, L: int) -> int:
    """Sequences per step: 1, or ``--tokens-per-step / L``."""
    if not args.tokens_per_step:
        return 1
    if args.tokens_per_step % L:
        raise SystemExit(f"--tokens-per-step {args.tokens_per_step} is not a multiple of the length {L}")
    return args.tokens_per_step // L


def make_step(model: SH2Model, batch: int, L: int, device: torch.device, capturable: bool = False
              ) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """One training step on fixed random tokens (seeded by L): bf16 autocast forward, cross-entropy, backward,
    fused AdamW (``capturable`` for a CUDA graph); returns the step (loss, detached) and its optimizer."""
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda",
                            capturable=capturable)
    g = torch.Generator().manual_seed(L)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, L), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, L), generator=g).to(device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return loss.detach()

    return step, opt


def train_steps(model: SH2Model, batch: int, L: int, args: argparse.Namespace, device: torch.device
                ) -> dict[str, Any]:
    """Warm-up and timed training steps: median step time, first loss, warm-up time."""
    run, opt = make_step(model, batch, L, device)

    def step() -> float:
        loss = run()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    warm, times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        (warm if i < args.warmup else times).append(time.perf_counter() - t0)
        if times and sum(times) > args.max_timed_s:
            break
    return {"step_s": statistics.median(times), "steps_s": times, "warmup_s": warm, "loss_first": losses[0],
            "loss_last": losses[-1]}


def build_model(cfg: SH2Config, mode: str, ckpt: bool, device: torch.device) -> tuple[SH2Model, str | None]:
    """The seeded model (eager and compiled runs share weights) in training mode, checkpointed if ``ckpt``,
    its blocks compiled if ``mode == "compiled"``; returns it and the compile path (None: eager)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = SH2Model(cfg)
    model.train()
    set_activation_checkpointing(model, ckpt)
    return model, apply_compile(model) if mode == "compiled" else None


def run_config(cfg: SH2Config, L: int, batch: int, mode: str, ckpt: bool, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """Build the model (seeded: eager and compiled share weights), apply the settings and time it."""
    breaks = graph_breaks() if mode == "compiled" else 0
    model, compile_path = build_model(cfg, mode, ckpt, device)
    out: dict[str, Any] = {"parameters": model.num_parameters()}
    if compile_path is not None:
        out["compile_path"] = compile_path
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out.update(train_steps(model, batch, L, args, device))
    if mode == "compiled":
        out["graph_breaks"] = graph_breaks() - breaks
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def release(device: torch.device, row: dict[str, Any]) -> None:
    """Free the finished configuration's memory; if compiled code still holds some (more than 1 GiB left
    allocated), drop dynamo's caches too, so the next configuration starts from an empty GPU."""
    free_memory(device)
    if device.type == "cuda" and torch.cuda.memory_allocated(device) > 2**30:
        from torch import _dynamo

        row["left_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
        _dynamo.reset()
        free_memory(device)


def predicted_seconds(rows: list[dict[str, Any]], cfgs: dict[str, SH2Config], layout: str, mode: str, L: int,
                      batch: int, args: argparse.Namespace) -> float | None:
    """Seconds a configuration should take, from the measured ones (None: nothing to go by)."""
    ok = [r for r in rows if r.get("status") == "ok" and r["layout"] == layout and r["mode"] == mode]
    if not ok:
        return None
    cfg = cfgs[layout]
    work = model_flops_per_token(cfg, L) * L * batch
    ref = min(ok, key=lambda r: abs(math.log(r["seq_len"] / L)))
    step = ref["step_s"] * work / (model_flops_per_token(cfg, ref["seq_len"]) * ref["tokens_per_step"])
    compiled_here = any(r["seq_len"] == L for r in ok)
    overhead = max(sum(r["warmup_s"]) - r["step_s"] * len(r["warmup_s"]) for r in ok) if not compiled_here else 0.0
    return args.warmup * step + overhead + min(args.steps * step, args.max_timed_s + step) + 5.0


def skip_reason(rows: list[dict[str, Any]], cfgs: dict[str, SH2Config], layout: str, mode: str, L: int, batch: int,
                ckpt: bool, args: argparse.Namespace, device: torch.device, budget: Budget) -> str | None:
    """Why a configuration is not run (None: run it)."""
    same = [r for r in rows if r["layout"] == layout and r["mode"] == mode and r["checkpointing"] == ckpt]
    if any(r["seq_len"] * r["batch"] < L * batch and r.get("status") == "out of memory" for r in same):
        return "skipped: out of memory with fewer tokens"
    if device.type == "cuda":
        cap = torch.cuda.get_device_properties(device).total_memory / 2**30
        pts = [(r["tokens_per_step"], r["peak_mem_gib"]) for r in same if r.get("status") == "ok"]
        if pts:
            params = next(r["parameters"] for r in same if r.get("status") == "ok")
            pred = predict_peak_gib(pts, L * batch, static_training_gib(params))
            if pred is not None and pred > args.mem_limit_frac * cap:
                return f"skipped: predicted out of memory ({pred:.0f} GiB of {cap:.0f})"
    need = predicted_seconds(rows, cfgs, layout, mode, L, batch, args)
    if need is not None and not budget.allows(need):
        return f"skipped: time budget ({budget.left():.0f} s left, ~{need:.0f} s needed)"
    return None


def print_tables(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """The configurations, and the SH2 / Transformer ratio per length."""
    eager = {(r["layout"], r["seq_len"], r["checkpointing"]): r for r in rows
             if r["mode"] == "eager" and r.get("status") == "ok"}
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        ref = eager.get((r["layout"], r["seq_len"], r["checkpointing"])) if r["mode"] == "compiled" else None
        dloss = abs(r["loss_first"] - ref["loss_first"]) / abs(ref["loss_first"]) if ok and ref else None
        body.append([r["seq_len"], r["batch"], "yes" if r["checkpointing"] else "no", r["layout"], r["mode"],
                     fmt(r.get("step_s") and r["step_s"] * 1e3, ",.1f"), fmt(r.get("tokens_per_s"), ",.0f"),
                     fmt(r.get("mfu"), ".1%"), fmt(r.get("peak_mem_gib"), ".1f"),
                     fmt(sum(r["warmup_s"]) if ok else None, ".1f"), fmt(dloss, ".1e"), fmt(r.get("graph_breaks")),
                     r.get("status")])
    print_table(f"Training step, {info['layers']} layers x {info['width']} ({info['device']}; bf16 peak "
                f"{fmt(info['peak_flops'] and info['peak_flops'] / 1e12, '.0f')} TFLOP/s measured; LI path "
                f"{info['li_algorithm']})",
                ["L", "batch", "act. ckpt", "layout", "mode", "step ms", "tokens/s", "MFU", "peak GiB", "warm-up s",
                 "first loss vs eager", "graph breaks", "status"], body)
    tps = {(r["layout"], r["seq_len"], r["mode"], r["checkpointing"]): r["tokens_per_s"] for r in rows
           if r.get("status") == "ok"}
    ratios = []
    for L in sorted({r["seq_len"] for r in rows}):
        cells = []
        for mode in ("eager", "compiled"):
            for ck in (False, True):
                s, t = tps.get(("sh2", L, mode, ck)), tps.get(("transformer", L, mode, ck))
                cells.append(fmt(s / t if s and t else None, ".2f"))
        best = {lay: max((v for (la, ll, m, _), v in tps.items() if la == lay and ll == L and m == "compiled"),
                         default=None) for lay in ("sh2", "transformer")}
        ratio = best["sh2"] / best["transformer"] if best["sh2"] and best["transformer"] else None
        target = RATIO_TARGETS.get(L)
        verdict = "-" if ratio is None or target is None else ("yes" if ratio >= target else "**no**")
        ratios.append([L, *cells, fmt(ratio, ".2f"), fmt(target), verdict])
    print_table("SH2 tokens/s over the Transformer's (same length, mode, checkpointing)",
                ["L", "eager", "eager, act. ckpt", "compiled", "compiled, act. ckpt", "compiled, each at its best",
                 "target", "met"], ratios)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    ap.add_argument("--preset", default="evo2_7b_8k", help="width, heads, MLP and filters of this preset")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--layouts", nargs="+", choices=("sh2", "transformer"), default=["sh2", "transformer"])
    ap.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    ap.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                    help="activation checkpointing per block")
    ap.add_argument("--tokens-per-step", type=int, default=0, help="fixed tokens per step (batch = T / L); "
                    "0: batch 1")
    ap.add_argument("--li-algorithm", default=None, help="Hyena-LI path (modal | fft) where SH2Config has it")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation, autotuning)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (fewer once --max-timed-s is spent)")
    ap.add_argument("--max-timed-s", type=float, default=20.0, help="stop timing a configuration after this")
    ap.add_argument("--mem-limit-frac", type=float, default=0.92, help="skip if the predicted peak exceeds this")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--out", default=None, help="JSON results, rewritten after every configuration")
    return ap


def setup_run(args: argparse.Namespace, device: torch.device
              ) -> tuple[dict[str, SH2Config], float | None, dict[str, Any]]:
    """The configs of the layouts asked for (``--preset``, ``--layers``, ``--layouts``, ``--li-algorithm``), the
    bf16 matmul peak in FLOP/s measured now (None on the CPU) and the run's record (device, ceilings, an empty
    ``rows`` list), printed in one line. Dynamo is configured when a compiled mode is asked for."""
    if "compiled" in args.modes:
        configure_dynamo()
    base = with_li_algorithm(SH2Config.from_name(args.preset), args.li_algorithm)
    cfgs = {name: base.replace(num_layers=args.layers, layout=layout)
            for name, layout in bench_layouts(args.layers).items() if name in args.layouts}
    ceil = measure_ceilings(device)
    peak = ceil["matmul_bf16_TFLOPs"] * 1e12 if device.type == "cuda" else None
    info: dict[str, Any] = {**run_info(device), "ceilings": ceil, "peak_flops": peak, "layers": args.layers,
                            "width": base.hidden_size, "preset": args.preset, "li_algorithm": li_algorithm_of(base),
                            "layouts": {n: c.layout for n, c in cfgs.items()}, "rows": []}
    print(f"{info['device']}: bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s, copy {ceil['copy_GBps']:.0f} GB/s "
          f"({ceil['method']}); LI path {info['li_algorithm']}; layouts {info['layouts']}", flush=True)
    return cfgs, peak, info


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    budget = Budget(args.time_budget)
    cfgs, peak, info = setup_run(args, device)
    rows: list[dict[str, Any]] = info["rows"]
    for L, ckpt in plan(args):
        batch = batch_for(args, L)
        for name, cfg in cfgs.items():
            for mode in args.modes:
                row: dict[str, Any] = {"layout": name, "pattern": cfg.layout, "seq_len": L, "batch": batch,
                                       "tokens_per_step": L * batch, "checkpointing": ckpt, "mode": mode,
                                       "li_algorithm": li_algorithm_of(cfg)}
                why = skip_reason(rows, cfgs, name, mode, L, batch, ckpt, args, device, budget)
                if why is None:
                    try:
                        row.update(run_config(cfg, L, batch, mode, ckpt, args, device))
                        tps = L * batch / row["step_s"]
                        row.update(status="ok", tokens_per_s=tps,
                                   mfu=tps * model_flops_per_token(cfg, L) / peak if peak else None)
                    except torch.OutOfMemoryError:
                        row["status"] = "out of memory"
                    except Exception as err:  # the other configurations still run
                        row["status"] = f"error: {error_line(err)}"[:300]
                    release(device, row)
                else:
                    row["status"] = why
                rows.append(row)
                print(f"  L={L:>6d} x{batch} ckpt={'on ' if ckpt else 'off'} {name:<11s} {mode:<8s} "
                      + (f"step {row['step_s'] * 1e3:,.1f} ms  {row['tokens_per_s']:,.0f} tok/s  MFU "
                         f"{fmt(row['mfu'], '.1%')}  peak {fmt(row.get('peak_mem_gib'), '.1f')} GiB  warm-up "
                         f"{sum(row['warmup_s']):.1f} s" if row["status"] == "ok" else row["status"]), flush=True)
                write_json(args.out, info)
    write_json(args.out, info)
    print_tables(rows, info)
    eager = {(r["layout"], r["seq_len"], r["checkpointing"]): r["loss_first"] for r in rows
             if r["mode"] == "eager" and r.get("status") == "ok"}
    diffs = [abs(r["loss_first"] - eager[k]) / abs(eager[k]) for r in rows
             if r["mode"] == "compiled" and r.get("status") == "ok"
             and (k := (r["layout"], r["seq_len"], r["checkpointing"])) in eager]
    if diffs:
        print(f"\ncompiled vs eager, first-step loss (same weights and tokens): largest relative difference "
              f"{max(diffs):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
