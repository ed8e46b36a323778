"""Operator benchmark: the sh2 sequence-mixing kernels beside their peers, with the device ceilings of the same run.

Protocol of ``shared/ANCHORS.md``: batch 1, width D = 4096, bf16 activations (filters, decays, Dskip fp32), the
sequence-mixing part of each operator only (no projections), ``triton.testing.do_bench`` median, fresh random
inputs for every operator, length and mode; "fwd+bwd" = forward plus the gradients of every input and filter.
One call checks the kernels against float64 references, measures the ceilings (device copy counting bytes read
plus written, bf16 matmul) and times every selected operator, then prints the tables (``## `` headings) and
writes everything to ``--out`` after every row::

    PYTHONPATH=$PWD python bench/ops.py --out ops.json                      # the default set, about 4 minutes
    PYTHONPATH=$PWD python bench/ops.py --groups li,long --out li.json      # Hyena-LI only
    PYTHONPATH=$PWD python bench/ops.py --device cpu --dim 64 --lengths 256,512 --long-len 1024   # CPU smoke

Operator groups (``--groups``, comma-separated; default ``li,peers,se,mr,long``, timed in that order):

- ``li``: Hyena-LI. "LI modal" = ``sh2.kernels.gated_modal_conv`` (the exact 16-state recurrence), when the
  tree has it; "LI fft" = the FFT path the model runs (``modal_filter`` then ``gated_fft_conv``), from the
  same (log_poles, residues) drawn by ``ModalFilter``'s initialisation, so both rows compute the same function.
- ``peers``: flash-linear-attention ``chunk_delta_rule`` (DeltaNet) and ``chunk_simple_gla`` (Mamba2-like),
  32 heads x 128, when ``fla`` is importable on a GPU.
- ``se``, ``mr``: Hyena-SE (K = 7) and Hyena-MR (K = 128, Dskip), 256 groups of 16 channels.
- ``long``: one LI operator at ``--long-len`` tokens (1,048,576): fwd+bwd and fwd time, peak memory and the
  memory beyond the inputs; the FFT path's fwd+bwd only where its extrapolated peak fits the GPU.
- ``refs`` (PyTorch references: ``F.conv1d``, fp32 ``torch.fft``) and ``sdpa`` (causal SDPA 32 x 128): opt-in.

Byte floors (bf16): the forward reads q, k, v and writes y (4 L D 2 bytes); fwd+bwd adds dy and dq, dk, dv
(11 tensors). ``featurizer`` (opt-in): the short convolution of the ``[1, L, 3D]`` projection (K = 3), whose
floors are 6 and 15 tensors of width D. ``--time-budget`` (default 230 s) is shared by the phases (check,
table, long run); a measurement that would not fit what is left is skipped and recorded. Kernel autotuning
(``SH2_AUTOTUNE``, on by default) happens in the first call of each shape, outside the timed region.
``--profile NAME`` prints a CUDA kernel breakdown of one fwd+bwd of the matching operators instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    Budget,
    bench_ms,
    byte_floor_ms,
    default_device,
    error_line,
    fmt,
    free_memory,
    measure_ceilings,
    print_table,
    run_info,
    sync,
    write_json,
)
from bench.kernel_checks import check, modal_kernel, modal_parameters
from sh2 import kernels
from sh2.kernels import reference

BF16 = torch.bfloat16
GROUPS = ("li", "peers", "se", "mr", "featurizer", "refs", "sdpa")  # timing order of the table


@dataclass
class Operator:
    """One timed operator: fresh random arguments for a length, and the call.

    Attributes:
        name: row label.
        group: the ``--groups`` word that selects it.
        make: ``make(L, grad)`` -> arguments (q, k, v first), leaves requiring grad when ``grad``.
        fn: the operator; a tuple result's first element is the output.
        floors: the byte floors of the forward and of forward + backward, in ``[L, D]`` bf16 tensors moved.
    """

    name: str
    group: str
    make: Callable[[int, bool], tuple[Any, ...]]
    fn: Callable[..., Any]
    floors: tuple[int, int] = (4, 11)


def operators(D: int, device: torch.device, backend: str, fla_ok: bool) -> list[Operator]:
    """Every operator this run can time, in table order."""
    G = D // 16
    H = D // 128

    def hyena(K: int, bias: bool) -> Callable[[int, bool], tuple[Any, ...]]:
        def make(L: int, grad: bool) -> tuple[Any, ...]:
            q, k, v = (torch.randn(1, L, D, device=device, dtype=BF16, requires_grad=grad) for _ in range(3))
            h = (torch.randn(G, K, device=device) / math.sqrt(K)).requires_grad_(grad)
            b = torch.randn(D, device=device, requires_grad=grad) if bias else None
            return q, k, v, h, b
        return make

    def li(L: int, grad: bool) -> tuple[Any, ...]:
        q, k, v = (torch.randn(1, L, D, device=device, dtype=BF16, requires_grad=grad) for _ in range(3))
        lp, r = modal_parameters(D, device)
        b = torch.randn(D, device=device)
        return (q, k, v, *(t.requires_grad_(grad) for t in (lp, r, b)))

    def li_fft(q, k, v, lp, r, b):
        return kernels.gated_fft_conv(q, k, v, kernels.modal_filter(lp, r, q.shape[1], backend=backend), b,
                                      backend=backend)

    def li_fft_ref(q, k, v, lp, r, b):
        return reference.gated_fft_conv_ref(q, k, v, reference.modal_filter_ref(lp, r, q.shape[1]), b)

    def fir(q, k, v, h, b):
        return kernels.gated_fir_conv(q, k, v, h, b, backend=backend)

    ops: list[Operator] = []
    modal = modal_kernel()
    if modal is not None:
        ops.append(Operator("LI modal", "li", li, modal))
    ops.append(Operator("LI fft", "li", li, li_fft))
    if fla_ok:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla

        def linear_attention(kind: str) -> Callable[[int, bool], tuple[Any, ...]]:
            def make(L: int, grad: bool) -> tuple[Any, ...]:
                q, k, v = (torch.randn(1, L, H, 128, device=device, dtype=BF16) for _ in range(3))
                k = F.normalize(k.float(), dim=-1).to(BF16)
                if kind == "delta":
                    extra = torch.rand(1, L, H, device=device, dtype=BF16).sigmoid()
                else:
                    extra = F.logsigmoid(torch.randn(1, L, H, device=device, dtype=torch.float32))
                return tuple(x.requires_grad_(grad) for x in (q, k, v, extra))
            return make

        ops.append(Operator("DeltaNet fla", "peers", linear_attention("delta"),
                            lambda q, k, v, b: chunk_delta_rule(q, k, v, b)))
        ops.append(Operator("simple-GLA fla", "peers", linear_attention("gla"),
                            lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g)))
    ops += [Operator("SE K=7", "se", hyena(7, False), fir), Operator("MR K=128", "mr", hyena(128, True), fir),
            Operator("SE K=7 torch conv1d", "refs", hyena(7, False), reference.gated_fir_conv_ref),
            Operator("MR K=128 torch conv1d", "refs", hyena(128, True), reference.gated_fir_conv_ref),
            Operator("LI torch fft", "refs", li, li_fft_ref)]

    def projection(L: int, grad: bool) -> tuple[Any, ...]:
        x = torch.randn(1, L, 3 * D, device=device, dtype=BF16, requires_grad=grad)
        return x, (torch.randn(3 * D, 3, device=device) / math.sqrt(3)).requires_grad_(grad)

    # The featurizer on the [1, L, 3D] projection: the forward reads and writes 3D channels (6 tensors of width
    # D), the backward reads x and dy and writes dx (9 more).
    ops.append(Operator("featurizer K=3", "featurizer", projection,
                        lambda x, w: kernels.causal_depthwise_conv(x, w, backend=backend), floors=(6, 15)))

    def sdpa(L: int, grad: bool) -> tuple[Any, ...]:
        return tuple(torch.randn(1, H, L, 128, device=device, dtype=BF16, requires_grad=grad) for _ in range(3))

    ops.append(Operator("SDPA causal 32x128", "sdpa", sdpa,
                        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    return ops


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# -------------------------------------------------------------------------------------------- measuring
def measure(op: Operator, L: int, backward: bool, device: torch.device) -> dict[str, Any]:
    """Median ms of one forward (or forward + all gradients) on fresh inputs, then the memory of one call.

    ``peak_GiB`` is the allocator's peak during one call; ``extra_GiB`` the part of it above what was allocated
    before the call (inputs, and dy for fwd+bwd): outputs, gradients and working memory.
    """
    args = op.make(L, backward)
    inputs_gib = sum(a.numel() * a.element_size() for a in args[:3]) / 2**30
    if backward:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        dy = torch.randn_like(_first(op.fn(*args)))  # the first call compiles and autotunes, untimed

        def call() -> Any:
            return torch.autograd.grad(_first(op.fn(*args)), leaves, dy)
    else:
        def call() -> Any:
            with torch.no_grad():
                return op.fn(*args)
    ms = bench_ms(call, device)
    out: dict[str, Any] = {"ms": ms, "inputs_GiB": inputs_gib}
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = call()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        out.update(peak_GiB=peak / 2**30, extra_GiB=(peak - base) / 2**30)
    return out


def measure_row(op: Operator, L: int, modes: tuple[str, ...], device: torch.device, copy_gbps: float, D: int,
                budget: Budget, history: dict[tuple[str, str], tuple[int, float]], skip: dict[str, str] | None = None
                ) -> dict[str, Any]:
    """Both modes of one operator at one length: times, memory, byte-floor ratios, or why not."""
    row: dict[str, Any] = {"op": op.name, "group": op.group, "L": L, "D": D}
    for mode in modes:
        why = (skip or {}).get(mode)
        if why is None:
            seen = history.get((op.name, mode))  # first call of an operator: compilation and autotuning
            need = 8 * seen[1] * L / seen[0] / 1e3 + 1.0 if seen else 20.0
            why = None if budget.allows(need) else f"skipped: time budget ({budget.left():.0f} s left, ~{need:.0f} s)"
        if why is not None:
            row[f"{mode}_status"] = why
            continue
        try:
            got = measure(op, L, mode == "fwdbwd", device)
            row.update({f"{mode}_{k}" if k != "inputs_GiB" else k: v for k, v in got.items()})
            row[f"{mode}_status"] = "ok"
            history[(op.name, mode)] = (L, got["ms"])
        except torch.OutOfMemoryError:
            row[f"{mode}_status"] = "out of memory"
        except Exception as err:  # keep measuring the other operators
            row[f"{mode}_status"] = f"error: {error_line(err)}"[:300]
        free_memory(device)
    floor4, floor11 = (byte_floor_ms(n, L, D, copy_gbps) for n in op.floors)
    row.update(floor_fwd_ms=floor4, floor_fwdbwd_ms=floor11)
    if row.get("fwd_ms"):
        row.update(fwd_over_floor=row["fwd_ms"] / floor4, fwd_frac_copy=floor4 / row["fwd_ms"])
    if row.get("fwdbwd_ms"):
        row["fwdbwd_over_floor"] = row["fwdbwd_ms"] / floor11
    return row


def long_run(ops: list[Operator], rows: list[dict[str, Any]], L: int, device: torch.device, copy_gbps: float,
             D: int, budget: Budget, history: dict[tuple[str, str], tuple[int, float]]) -> list[dict[str, Any]]:
    """One LI operator at ``L`` tokens: the modal kernel, then the FFT path (fwd+bwd only if it should fit)."""
    out = []
    cap = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else math.inf
    for op in ops:
        skip: dict[str, str] = {}
        fits = [r for r in rows if r["op"] == op.name and r.get("fwdbwd_peak_GiB")]
        if fits:
            ref = max(fits, key=lambda r: r["L"])
            pred = ref["fwdbwd_peak_GiB"] * L / ref["L"]
            if pred > 0.95 * cap:
                skip["fwdbwd"] = f"skipped: predicted out of memory ({pred:.0f} GiB from {ref['L']} tokens)"
        row = measure_row(op, L, ("fwdbwd", "fwd"), device, copy_gbps, D, budget, history, skip)
        row["group"] = "long"
        out.append(row)
        print(f"  {op.name:<22s} L={L:>8d}  fwd+bwd {fmt(row.get('fwdbwd_ms'), '.2f')} ms "
              f"({row.get('fwdbwd_status')}), fwd {fmt(row.get('fwd_ms'), '.2f')} ms ({row.get('fwd_status')})",
              flush=True)
    return out


# ---------------------------------------------------------------------------------------------- tables
# (row, label, modes compared): simple-GLA's backward is refused by fla 0.6 on Hopper, so it is compared forward only
PEERS = (("LI fft", "FFT", ("fwd", "fwdbwd")), ("DeltaNet fla", "DeltaNet", ("fwd", "fwdbwd")),
         ("simple-GLA fla", "GLA", ("fwd",)))


def print_tables(rows: list[dict[str, Any]], long_rows: list[dict[str, Any]], ceil: dict[str, Any]) -> None:
    """The operator table, the long-sequence table and the targets of shared/ANCHORS.md, as markdown."""
    by = {(r["op"], r["L"]): r for r in rows}

    def ms(r: dict[str, Any], mode: str) -> str:
        if r.get(f"{mode}_ms") is not None:
            return fmt(r[f"{mode}_ms"], ".3f")
        status = str(r.get(f"{mode}_status", "-"))
        return "OOM" if "out of memory" in status else ("skipped" if status.startswith("skipped") else
                                                        ("error" if status.startswith("error") else "-"))

    def speedups(r: dict[str, Any]) -> str:
        out = []
        for peer, label, modes in PEERS:
            p = by.get((peer, r["L"]))
            if p is None or peer == r["op"] or (peer == "LI fft" and r["group"] != "li"):
                continue
            for mode in modes:
                if p.get(f"{mode}_ms") and r.get(f"{mode}_ms"):
                    tag = "fwd" if mode == "fwd" else "f+b"
                    out.append(f"{label} {tag} {p[f'{mode}_ms'] / r[f'{mode}_ms']:.1f}x")
        return ", ".join(out) or "-"

    width = rows[0]["D"] if rows else "-"
    print_table(f"Operators (ms; D = {width}, batch 1, bf16; copy {ceil['copy_GBps']:.0f} GB/s, "
                f"bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s, same run)",
                ["op", "L", "fwd", "fwd / floor", "fwd % of copy", "fwd+bwd", "fwd+bwd / floor",
                 "fwd+bwd peak GiB", "speed-up over the peers (their time / this)"],
                [[r["op"], r["L"], ms(r, "fwd"), fmt(r.get("fwd_over_floor"), ".2f"),
                  fmt(r.get("fwd_frac_copy"), ".0%"), ms(r, "fwdbwd"), fmt(r.get("fwdbwd_over_floor"), ".2f"),
                  fmt(r.get("fwdbwd_peak_GiB"), ".1f"),
                  speedups(r) if r["group"] in ("li", "se", "mr") else ""] for r in rows])
    if long_rows:
        print_table("One LI operator at long length (extra = peak above the inputs and dy: outputs, gradients, "
                    "working memory)",
                    ["op", "L", "mode", "ms", "/ floor", "peak GiB", "extra GiB", "extra / inputs (q, k, v)", "status"],
                    [[r["op"], r["L"], mode, ms(r, mode), fmt(r.get(f"{mode}_over_floor"), ".2f"),
                      fmt(r.get(f"{mode}_peak_GiB"), ".1f"), fmt(r.get(f"{mode}_extra_GiB"), ".1f"),
                      fmt(r[f"{mode}_extra_GiB"] / r["inputs_GiB"] if r.get(f"{mode}_extra_GiB") else None, ".2f"),
                      r.get(f"{mode}_status")] for r in long_rows for mode in ("fwdbwd", "fwd")])
    goals = targets(rows, long_rows)
    if goals:
        print_table("Targets (shared/ANCHORS.md), this run", ["target", "L", "measured", "met"], goals)


def targets(rows: list[dict[str, Any]], long_rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One line per (target, length) that this run measured."""
    by = {(r["op"], r["L"]): r for r in rows}
    out: list[list[Any]] = []

    def add(name: str, L: int, value: float | None, spec: str, ok: bool | None) -> None:
        if value is not None:
            out.append([name, L, format(value, spec), {True: "yes", False: "**no**", None: "-"}[ok]])

    for r in rows:
        L, op = r["L"], r["op"]
        if op in ("SE K=7", "MR K=128") and L >= 8192:
            f, fb = r.get("fwd_frac_copy"), r.get("fwdbwd_over_floor")
            add(f"{op} fwd >= 70% of copy", L, f, ".0%", None if f is None else f >= 0.70)
            add(f"{op} fwd+bwd <= 2x 11-tensor floor", L, fb, ".2f", None if fb is None else fb <= 2.0)
        if op == "LI modal" and L >= 8192:
            f, fb = r.get("fwd_over_floor"), r.get("fwdbwd_over_floor")
            if L >= 32768:
                add("LI modal fwd <= 2x 4-tensor floor", L, f, ".2f", None if f is None else f <= 2.0)
                add("LI modal fwd+bwd <= 3x 11-tensor floor", L, fb, ".2f", None if fb is None else fb <= 3.0)
            for peer, mode in (("simple-GLA fla", "fwd"), ("DeltaNet fla", "fwdbwd")):
                p = by.get((peer, L), {}).get(f"{mode}_ms")
                mine = r.get(f"{mode}_ms")
                if p and mine:
                    add(f"LI modal {'fwd' if mode == 'fwd' else 'fwd+bwd'} faster than {peer}", L, p / mine, ".2f",
                        p / mine > 1.0)
    for r in long_rows:
        if r["op"] == "LI modal":
            status = r.get("fwdbwd_status")
            out.append(["LI modal fwd+bwd runs at long length", r["L"], ms_or(r, "fwdbwd"),
                        "yes" if status == "ok" else f"**no** ({status})"])
            extra = r.get("fwdbwd_extra_GiB")
            if extra is not None:
                ratio = extra / r["inputs_GiB"]
                add("LI modal fwd+bwd memory beyond inputs / inputs", r["L"], ratio, ".2f", None)
    return out


def ms_or(r: dict[str, Any], mode: str) -> str:
    return f"{r[f'{mode}_ms']:.2f} ms" if r.get(f"{mode}_ms") is not None else "-"


# ---------------------------------------------------------------------------------------------- profile
def profile(ops: list[Operator], pattern: str, L: int) -> int:
    """Per-kernel CUDA time of one forward + backward (after warm-up) for each matching operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for op in ops:
        if pattern not in op.name:
            continue
        args = op.make(L, True)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        dy = torch.randn_like(_first(op.fn(*args)))
        for _ in range(2):
            torch.autograd.grad(_first(op.fn(*args)), leaves, dy)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(_first(op.fn(*args)), leaves, dy)
            torch.cuda.synchronize()
        print(f"== {op.name} L={L} fwd+bwd")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    return 0


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    p.add_argument("--lengths", default="8192,32768,131072", help="comma-separated sequence lengths")
    p.add_argument("--dim", type=int, default=4096, help="width D")
    p.add_argument("--groups", default="li,peers,se,mr,long",
                   help=f"comma-separated operator groups: {', '.join(GROUPS)}, long")
    p.add_argument("--ops", default="", help="comma-separated substrings: only operators whose name contains one")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness checks")
    p.add_argument("--check-len", type=int, default=8192, help="sequence length of the checks")
    p.add_argument("--long-len", type=int, default=1 << 20, help="tokens of the long LI run (group long)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="sh2.kernels backend of the SE, MR and LI fft rows (auto: Triton on CUDA)")
    p.add_argument("--time-budget", type=float, default=230.0, help="seconds for the whole run (0: unlimited)")
    p.add_argument("--out", default="", help="JSON results, rewritten after every row")
    p.add_argument("--profile", default="", help="print a CUDA kernel breakdown of fwd+bwd for ops matching this "
                   "substring at the first length, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    device = torch.device(a.device)
    D, lengths = a.dim, [int(x) for x in a.lengths.split(",") if x]
    groups = [g for g in a.groups.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS) - {"long"})
    if unknown:
        raise SystemExit(f"--groups: unknown {unknown}; choose from {', '.join(GROUPS)}, long")
    total = Budget(a.time_budget or None)
    fla_ok = False
    if device.type == "cuda" and "peers" in groups:
        try:
            import fla  # noqa: F401

            fla_ok = True
        except Exception as e:  # depends on the machine
            print(f"note: fla not importable ({e}); DeltaNet / simple-GLA skipped")
    if modal_kernel() is None:
        print("note: sh2.kernels.gated_modal_conv is not in this tree; the LI modal rows are skipped")
    res: dict[str, Any] = {**run_info(device), "D": D, "batch": 1, "backend": a.backend, "groups": groups,
                           "modal_kernel": modal_kernel() is not None, "fla": fla_ok, "rows": [], "long": []}
    res["ceilings"] = ceil = measure_ceilings(device)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s "
          f"({ceil['method']})", flush=True)
    ops = operators(D, device, a.backend, fla_ok)
    if a.profile:
        return profile(ops, a.profile, lengths[0])
    failed = False
    if a.check:
        res["check"] = check(D, a.check_len, device, a.backend, total.phase(60.0))
        failed = any(r["ok"] is False for r in res["check"])
        write_json(a.out, res)
    wanted = [s for s in a.ops.split(",") if s]
    chosen = [op for g in GROUPS if g in groups for op in ops
              if op.group == g and (not wanted or any(w in op.name for w in wanted))]
    modes = ("fwd",) if a.no_backward else ("fwd", "fwdbwd")
    long_ops = [op for op in ops if op.group == "li"] if "long" in groups else []
    table = Budget(None, total.deadline - 40.0 if long_ops and total.deadline else total.deadline)
    history: dict[tuple[str, str], tuple[int, float]] = {}
    for op in chosen:
        for L in lengths:
            row = measure_row(op, L, modes, device, ceil["copy_GBps"], D, table, history)
            res["rows"].append(row)
            print(f"  {op.name:<22s} L={L:>7d}  fwd {fmt(row.get('fwd_ms'), '.3f')} ms  fwd+bwd "
                  f"{fmt(row.get('fwdbwd_ms'), '.3f')} ms  {row.get('fwd_status')}/{row.get('fwdbwd_status', '-')}",
                  flush=True)
            write_json(a.out, res)
    if long_ops:
        res["long"] = long_run(long_ops, res["rows"], a.long_len, device, ceil["copy_GBps"], D, total, history)
    try:
        from sh2.kernels import _tuning

        res["chosen_configs"] = {repr(k): repr(v) for k, v in getattr(_tuning, "_CACHE", {}).items()}
    except ImportError:
        pass
    write_json(a.out, res)
    print_tables(res["rows"], res["long"], ceil)
    if failed:
        print("\nCHECK FAILED: " + ", ".join(r["check"] for r in res["check"] if r["ok"] is False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
