"""Where a training step's time goes: a kernel profile of the ``bench/e2e.py`` step, and its CUDA-graph replay.

For each layout (the Evo 2 stripe and the Transformer layout of the same width and depth, as ``bench/e2e.py``
builds them) and mode (eager, compiled blocks), the script runs warm-up steps (compilation, kernel autotuning),
times ``--steps`` steps without the profiler, then profiles the same number of steps with ``torch.profiler`` and
sorts every GPU kernel into a category:

- ``matmul`` (cuBLAS / CUTLASS products), ``attention`` (flash / cuDNN SDPA kernels);
- the sh2 kernel families: ``fir`` (Hyena-SE and -MR), ``featurizer`` (the short depthwise convolution),
  ``li_modal`` (Hyena-LI recurrence), ``li_fft`` (the FFT path);
- ``fused (Inductor)``: the Triton kernels ``torch.compile`` generates (norms, residuals, RoPE, casts, loss);
- ``elementwise (eager)``, ``reduction (eager)``: ATen's own pointwise and reduction kernels;
- ``optimizer`` (fused AdamW), ``memcpy / memset`` and ``other``.

It reports, per step: the wall time (unprofiled), the GPU's busy time (union of kernel intervals) and what is left
idle, the kernel launches, and per category the milliseconds, the share of the wall time and the launches. The
``matmul + attention`` line against the wall time is the step's bound if every other kernel and every idle
microsecond vanished: what fused glue and CUDA graphs could gain at most.

``--cuda-graph`` also captures the whole step (forward, backward and a capturable fused AdamW) in one CUDA graph
and times its replay against the same step launched from Python: the host time CUDA graphs would remove::

    PYTHONPATH=$PWD python bench/step_profile.py --lengths 8192 --cuda-graph --out step_profile.json  # one H200
    PYTHONPATH=$PWD python bench/step_profile.py --device cpu --preset tiny --layers 4 --lengths 128  # CPU smoke

On the CPU the categories come from the ATen operators' own CPU time (a smoke test of the same code, not a
measurement).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from bench.common import (
    Budget,
    default_device,
    error_line,
    fmt,
    free_memory,
    print_table,
    sync,
    write_json,
)
from bench.e2e import build_model, make_step, setup_run
from sh2.models import SH2Config, SH2Model
from sh2.training.flops import model_flops_per_token

# (category, pattern on the kernel or operator name), first match wins. The sh2 kernels are named by their
# Triton functions (``_fir_blocked_fwd_kernel``, ...); Inductor's start with ``triton_``.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pat, re.IGNORECASE)) for name, pat in (
    ("li_modal", r"_modal|modal_|^chunk_\w+_kernel$|^combine_\w*kernel$"),
    ("li_fft", r"_pack_|_unpack_|_spectra_|fft"),
    ("fir", r"_fir_"),
    ("featurizer", r"short_conv"),
    ("attention", r"flash|fmha|sdpa|cudnn.*attn|attention|efficient_attention"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm100_|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("fused (Inductor)", r"^triton_"),
    ("memcpy / memset", r"memcpy|memset|copy_kernel|aten::(copy_|fill_|zero_)$"),
    ("reduction (eager)", r"reduce_kernel|softmax|nll_loss|norm_kernel|aten::(sum|mean|norm|log_softmax)"),
    ("elementwise (eager)", r"elementwise|aten::(mul|add|sub|div|gelu|exp|pow|rsqrt|to|_to_copy|where)"),
))


def categorize(name: str) -> str:
    """The category of a kernel (or, on the CPU, an ATen operator) by its name; ``other`` when none matches."""
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (kernels on several streams overlap)."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def kernel_table(prof: torch.profiler.profile, device: torch.device, steps: int) -> dict[str, Any]:
    """Per category and step: milliseconds, launches and the busiest names; plus busy time and launches.

    On CUDA: every kernel, memcpy and memset event. On the CPU: the ATen operators' self CPU time.
    """
    cats: dict[str, dict[str, Any]] = {}
    intervals = []
    if device.type == "cuda":
        from torch.autograd import DeviceType

        # GPU-side annotations (``Optimizer.step#AdamW.step``, ...) span kernels that are counted themselves
        events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                  if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        intervals = [(s, e) for _, s, e in events]
        rows = [(name, end - start) for name, start, end in events]
    else:
        rows = [(e.key, e.self_cpu_time_total / max(1, e.count)) for e in prof.key_averages()
                for _ in range(e.count) if e.key.startswith("aten::")]
    for name, us in rows:
        c = cats.setdefault(categorize(name), {"ms": 0.0, "launches": 0, "names": {}})
        c["ms"] += us / 1e3 / steps
        c["launches"] += 1
        c["names"][name] = c["names"].get(name, 0.0) + us / 1e3 / steps
    for c in cats.values():
        c["launches"] = round(c["launches"] / steps)
        c["top"] = [(n[:120], ms) for n, ms in sorted(c.pop("names").items(), key=lambda kv: -kv[1])]
    busy = busy_us(intervals) / 1e3 / steps if intervals else sum(c["ms"] for c in cats.values())
    return {"categories": cats, "busy_ms": busy, "launches": sum(c["launches"] for c in cats.values())}


def timed(step: Callable[[], Any], zero: Callable[[], None], device: torch.device, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` (each followed by ``zero``), synchronised around each."""
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        zero()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def graph_replay_ms(model: SH2Model, batch: int, L: int, device: torch.device, steps: int) -> dict[str, Any]:
    """The whole step captured in one CUDA graph: median replay time against the same step launched eagerly
    (both with a capturable AdamW, so that the two differ only in how the kernels are launched)."""
    step, opt = make_step(model, batch, L, device, capturable=True)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream(device).wait_stream(side)
    launched = statistics.median(timed(step, lambda: opt.zero_grad(set_to_none=True), device, steps))
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # gradients are allocated inside the graph and overwritten by each replay
        step()
    replayed = statistics.median(timed(graph.replay, lambda: None, device, steps))
    del graph
    return {"launched_ms": launched * 1e3, "replay_ms": replayed * 1e3, "saved_ms": (launched - replayed) * 1e3}


def profile_config(cfg: SH2Config, L: int, batch: int, mode: str, ckpt: bool, args: argparse.Namespace,
                   device: torch.device) -> dict[str, Any]:
    """Build the model as ``bench/e2e.py`` does, warm up, time ``args.steps`` steps, then profile as many."""
    model, _ = build_model(cfg, mode, ckpt, device)
    step, opt = make_step(model, batch, L, device, capturable=False)
    zero = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    timed(step, zero, device, args.warmup)
    wall = statistics.median(timed(step, zero, device, args.steps))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        timed(step, zero, device, args.steps)
    out = {"step_ms": wall * 1e3, **kernel_table(prof, device, args.steps)}
    del prof
    if args.cuda_graph and device.type == "cuda":
        del step, opt
        free_memory(device)
        try:
            out["cuda_graph"] = graph_replay_ms(model, batch, L, device, args.steps)
        except Exception as err:  # a capture failure is a finding, not a crash
            out["cuda_graph"] = {"error": error_line(err)[:300]}
    return out


def print_profile(row: dict[str, Any]) -> None:
    """The category table of one configuration, largest first, with the matmul + attention bound."""
    wall, cats = row["step_ms"], row["categories"]
    title = (f"L={row['seq_len']} {row['layout']} {row['mode']} ckpt={'on' if row['checkpointing'] else 'off'}: "
             f"step {wall:.1f} ms, busy {row['busy_ms']:.1f} ms, idle {wall - row['busy_ms']:.1f} ms, "
             f"{row['launches']} launches")
    table = [(name, f"{c['ms']:.2f}", fmt(c["ms"] / wall, ".1%"), c["launches"],
              "; ".join(f"{n[:60]} {ms:.2f}" for n, ms in c["top"][:2]))
             for name, c in sorted(cats.items(), key=lambda kv: -kv[1]["ms"])]
    print_table(title, ["category", "ms / step", "of step", "launches", "largest kernels (ms)"], table)
    core = sum(cats.get(k, {"ms": 0.0})["ms"] for k in ("matmul", "attention"))
    print(f"matmul + attention: {core:.1f} ms ({fmt(core / wall, '.1%')} of the step)")
    graph = row.get("cuda_graph")
    if graph:
        print("whole step as one CUDA graph: " + (graph["error"] if "error" in graph else
              f"launched {graph['launched_ms']:.1f} ms, replayed {graph['replay_ms']:.1f} ms, "
              f"saved {graph['saved_ms']:.1f} ms"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    ap.add_argument("--preset", default="evo2_7b_8k", help="width, heads, MLP and filters of this preset")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--layouts", nargs="+", choices=("sh2", "transformer"), default=["sh2", "transformer"])
    ap.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["compiled"])
    ap.add_argument("--checkpointing", action="store_true", help="recompute every block in the backward")
    ap.add_argument("--li-algorithm", default=None, help="Hyena-LI path (modal | fft)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, autotuning)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, then as many profiled steps")
    ap.add_argument("--cuda-graph", action="store_true", help="also time the whole step as one CUDA graph")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--out", default=None, help="JSON results, rewritten after every configuration")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    budget = Budget(args.time_budget)
    cfgs, peak, info = setup_run(args, device)
    for L in args.lengths:
        for name, cfg in cfgs.items():
            for mode in args.modes:
                row: dict[str, Any] = {"layout": name, "seq_len": L, "batch": args.batch, "mode": mode,
                                       "checkpointing": args.checkpointing}
                if not budget.allows(120):
                    row["status"] = "skipped: time budget"
                else:
                    try:
                        row.update(profile_config(cfg, L, args.batch, mode, args.checkpointing, args, device))
                        tps = L * args.batch / (row["step_ms"] / 1e3)
                        row.update(status="ok", tokens_per_s=tps,
                                   mfu=tps * model_flops_per_token(cfg, L) / peak if peak else None)
                    except torch.OutOfMemoryError:
                        row["status"] = "out of memory"
                    except Exception as err:  # the other configurations still run
                        row["status"] = f"error: {error_line(err)}"[:300]
                    free_memory(device)
                info["rows"].append(row)
                if row["status"] == "ok":
                    print_profile(row)
                else:
                    print(f"L={L} {name} {mode}: {row['status']}")
                write_json(args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
