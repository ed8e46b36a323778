"""Markdown tables of a multi-GPU run folder: CP correctness, CP scaling and the ``sh2 fit`` training logs.

    python bench/cp_summary.py OUT_DIR        # prints the tables and writes OUT_DIR/summary.md

Reads ``correctness_n*.json`` (bench/cp_correctness.py), ``scaling_n*.json`` (bench/cp_scaling.py), the
CSVLogger logs ``csv/*/version_*/metrics.csv`` and the ``fit_*.json`` records (bench/fit_probe.py) of the training
runs of bench/multi_gpu.sh. Scaling efficiency =
tokens/s per GPU with CP = n divided by tokens/s with CP = 1 at the largest length that ran on one GPU; also the
same ratio of model FLOP/s per GPU ("work"), which discounts the higher cost per token of longer sequences.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from bench.common import BF16_RATIO, TOL, fmt, markdown_table
from bench.fit_probe import FIT_HEADER, fit_rows, read_records


def training_rows(out_dir: Path) -> list[str]:
    """One markdown row per ``sh2 fit`` run logged by CSVLogger under ``out_dir/csv``.

    A run whose name contains ``resume`` is compared with the run of the same prefix it resumed: it continues if
    its first loss is closer to that run's last loss than to its first loss.
    """
    runs: dict[str, dict[int, float]] = {}
    for metrics in sorted(out_dir.glob("csv/*/version_*/metrics.csv")):
        steps: dict[int, float] = {}
        with open(metrics) as f:
            for rec in csv.DictReader(f):
                if rec.get("train/loss"):
                    steps[int(rec["step"])] = float(rec["train/loss"])
        if steps:
            runs[metrics.parts[-3]] = steps
    lines = []
    for run, steps in sorted(runs.items(), key=lambda kv: min(kv[1])):
        ks = sorted(steps)
        first, last = steps[ks[0]], steps[ks[-1]]
        note = ""
        if "resume" in run:
            prefix = run.split("_cp")[0]
            before = [v for k, v in runs.items() if k != run and "resume" not in k and k.startswith(prefix)]
            if before:
                b = before[0]
                b_first, b_last = b[min(b)], b[max(b)]
                cont = abs(first - b_last) < abs(first - b_first)
                note = (f"resumed at step {ks[0]} from a checkpoint with loss {b_last:.4f} (started at {b_first:.4f}): "
                        f"{'continues' if cont else '**does not continue**'}")
        lines.append(f"| {run} | {ks[0]}-{ks[-1]} ({len(ks)}) | {first:.4f} | {last:.4f} | "
                     f"{'yes' if last < first else 'no'} | {note} |")
    return lines


def summarize(out_dir: str) -> str:
    """Markdown tables of every correctness and scaling JSON (and training log) in ``out_dir``; also ``summary.md``."""
    d = Path(out_dir)
    md = [f"# CP multi-GPU run ({d})", ""]
    corr = [json.load(open(p)) for p in sorted(d.glob("correctness_n*.json"))]
    if corr:
        md += ["## Correctness (max relative error over output and gradients vs one GPU)", "",
               f"Tolerances: fp32 {TOL['fp32']:g}, bf16 {TOL['bf16']:g} against one GPU in the same dtype, or in "
               f"bf16 a per-tensor error against one-GPU fp32 at most {BF16_RATIO:g}x that of one-GPU bf16. "
               f"Device: {corr[0].get('device')}. "
               f"Shape: {corr[0].get('shape')}.", "",
               "| cp | operator | scheme | dtype | max rel err vs one GPU | CP bf16 vs one-GPU fp32 "
               "| one-GPU bf16 vs fp32 | ok |",
               "|---|---|---|---|---|---|---|---|"]
        for c in corr:
            for r in c.get("ops", []) + c.get("model", []):
                err = r.get("max_rel_err")
                status = ("ok" if r.get("ok") else "**FAIL**") if "max_rel_err" in r else r.get("status", "-")
                md.append(f"| {c['world']} | {r['op']} | {r['scheme']} | {r['dtype']} | {fmt(err, '.2e')} | "
                          f"{fmt(r.get('cp_bf16_vs_fp32'), '.1e')} | {fmt(r.get('ref_bf16_vs_fp32'), '.1e')} | "
                          f"{status} |")
        md.append("")
    scal = [json.load(open(p)) for p in sorted(d.glob("scaling_n*.json"))]
    if scal:
        base = [r for s in scal if s["world"] == 1 for r in s["rows"] if r.get("status") == "ok"]
        ref = max(base, key=lambda r: r["seq_len"]) if base else None
        by_len = {r["seq_len"]: r for r in base}
        s0 = scal[0]
        md += ["## Scaling", "",
               f"{s0.get('layout')} x{s0.get('width')} ({s0.get('parameters', 0) / 1e6:.0f}M parameters), "
               f"{s0.get('precision')}, activation checkpointing {s0.get('activation_checkpointing')}, kernel "
               f"autotuning {s0.get('autotune')}, B = 1, "
               f"{s0.get('note')}. Device: {s0.get('device')}. Efficiency = tokens/s per GPU / tokens/s of CP = 1 at "
               f"L = {ref['seq_len'] if ref else '-'} (the largest length that ran on one GPU); 'same L' uses the "
               f"CP = 1 run at the same length where there is one. 'work' divides model FLOP/s per GPU instead "
               f"(analytic training FLOPs per token at each length: attention grows with L, so a longer sequence "
               f"costs more per token; this is the efficiency of the parallelisation alone). comm = union of NCCL "
               f"kernel intervals in one profiled step; exposed = not overlapped by compute kernels.", "",
               "| cp | L | schemes | step s | tok/s/GPU | efficiency | same L | work | TFLOP/s/GPU | peak GiB "
               "| comm ms | exposed ms | status |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in sorted(scal, key=lambda s: s["world"]):
            for r in sorted(s["rows"], key=lambda r: (r["seq_len"], r["scheme"] != "default", r["scheme"])):
                ok = r.get("status") == "ok"
                tps = r.get("tokens_per_s_per_gpu") if ok else None
                eff = tps / ref["tokens_per_s"] if ok and ref else None
                same = by_len.get(r["seq_len"])
                eff_same = tps / same["tokens_per_s"] if ok and same else None
                tflops = r.get("tflops_per_s_per_gpu") if ok else None
                eff_work = tflops / ref["tflops_per_s_per_gpu"] if tflops and ref and \
                    ref.get("tflops_per_s_per_gpu") else None
                md.append(f"| {s['world']} | {r['seq_len']} | {r['scheme']} | {fmt(r.get('step_s'), '.3f')} | "
                          f"{fmt(tps, ',.0f')} | {fmt(eff, '.1%')} | {fmt(eff_same, '.1%')} | "
                          f"{fmt(eff_work, '.1%')} | {fmt(tflops, '.0f')} | "
                          f"{fmt(r.get('peak_mem_gib'), '.1f')} | {fmt(r.get('comm_ms'), '.0f')} | "
                          f"{fmt(r.get('exposed_comm_ms'), '.0f')} | {r.get('status')} |")
        md.append("")
    train = training_rows(d)
    if train:
        md += ["## Training (sh2 fit, train/loss from the CSV logs)", "",
               "| run | steps | first loss | last loss | decreasing | resume |", "|---|---|---|---|---|---|", *train,
               ""]
    probes = read_records([str(p) for p in sorted(d.glob("fit_*.json"))])
    if probes:
        md += ["## Training throughput (bench/fit_probe.py: tokens/s, MFU against the bf16 peak measured in each run, "
               "peak memory)", "", *markdown_table(FIT_HEADER, fit_rows(probes)), ""]
    for log in sorted(d.glob("*.log")):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.startswith("[sh2] throughput")]
        if lines:
            md.append(f"- {log.stem}: {lines[-1]}")
    text = "\n".join(md) + "\n"
    (d / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder with the JSON files (and csv/ logs) of a run")
    print(summarize(p.parse_args(argv).out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
