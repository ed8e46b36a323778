"""Context-parallel scaling on several GPUs of one host: step time, tokens/s, memory and communication per scheme.

Launch with torchrun, one process per GPU (NCCL), or with ``--device cpu`` (gloo, small shapes)::

    torchrun --standalone --nproc_per_node 4 bench/cp_scaling.py --lengths 131072 262144 524288 --out scaling_n4.json
    torchrun --standalone --nproc_per_node 1 bench/cp_scaling.py --lengths 131072 262144 --out scaling_n1.json
    torchrun --nproc_per_node 2 bench/cp_scaling.py --device cpu --width 32 --heads 4 --groups 4 --mlp 64 \\
        --mr-filter-len 8 --li-state 4 --lengths 128 256 --variant-lengths 128 --steps 1      # CPU, tiny shapes

A 7B-shape stack (``--layout``, default ``SDH*``: SE, MR, LI and MHA), activation checkpointing, bf16
autocast, B = 1, fp32 weights replicated (no FSDP, no optimizer: the CP compute and its exchanges), at each
``--lengths`` for the default schemes and for each ``--variants`` (one scheme changed at a time). Per
configuration: median step time (forward + backward) after ``--warmup`` steps, tokens/s per GPU, peak memory,
and the communication time of one extra profiled step (torch.profiler: union of the NCCL kernel intervals,
and the part of it not overlapped by any compute kernel; NCCL kernels include the wait for the peer). With one
process (CP = 1) the model uses the local operators: the baseline.

``--time-budget`` skips what would not finish in time (recorded as skipped). Out of memory: with one process it
is caught and recorded; with several, the process exits (the other ranks are blocked in a collective) after
writing ``OUT.rankR.err``; rerun with ``--resume`` to record it and go on (bench/multi_gpu.sh does).
Configurations whose peak memory, extrapolated from shorter lengths, exceeds ``--mem-limit-frac`` of the GPU
are skipped. Tables of several runs (efficiency against CP = 1): ``bench/cp_summary.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import (
    Budget,
    Env,
    add_shape_args,
    add_torchrun_args,
    barrier,
    broadcast_obj,
    consume_errors,
    error_line,
    exit_now,
    free_memory,
    predict_peak_gib,
    record_error,
    remove_context_parallel,
    run_info,
    run_on_ranks,
    set_activation_checkpointing,
    shape_config,
    write_json,
)
from sh2.models.config import SH2Config
from sh2.models.model import SH2Model
from sh2.strategies.cp_ops import CPConfig, validate_cp_settings
from sh2.strategies.parallelize import apply_context_parallel, context_parallel_loss
from sh2.strategies.sharding import shard_sequence, zigzag_indices
from sh2.training.flops import model_flops_per_token

SCHEME_KEYS = {"li": "li_scheme", "fir": "fir_scheme", "featurizer": "featurizer_scheme",
               "attention": "attention_scheme", "chunks": "a2a_pipeline_chunks"}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``li=p2p_fft`` -> ``("li=p2p_fft", {"li_scheme": "p2p_fft"})``; several joined by ``,``."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in SCHEME_KEYS or not value:
            raise ValueError(f"variant {text!r}: expected KEY=VALUE with KEY in {sorted(SCHEME_KEYS)}")
        fields[SCHEME_KEYS[key]] = int(value) if key == "chunks" else value
    return text, fields


def scaling_plan(args: argparse.Namespace, cp: int) -> list[tuple[int, str, CPConfig | None]]:
    """Configurations in priority order: default schemes at every length, then each variant by length."""
    lengths = sorted(args.lengths)
    if cp == 1 and not args.force_cp_ops:
        return [(L, "local", None) for L in lengths]
    base = dict(a2a_pipeline_chunks=args.pipeline_chunks)
    plan: list[tuple[int, str, CPConfig | None]] = [(L, "default", CPConfig(**base)) for L in lengths]
    for L in sorted(args.variant_lengths or lengths):
        for v in args.variants:
            name, fields = parse_variant(v)
            plan.append((L, name, CPConfig(**{**base, **fields})))
    return plan


def work(cfg: SH2Config, L: int) -> float:
    """Analytic training FLOPs of one sequence of L tokens (attention quadratic, FFT L log L)."""
    return model_flops_per_token(cfg, L) * L


# ------------------------------------------------------------------------------------------ communication
def intervals_union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping ``(start, end)`` intervals."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        tot += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def kernel_events(prof: Any) -> list[tuple[str, float, float]]:
    """GPU kernels of a profile as (name, start us, end us): profiler events, else the exported trace."""
    from torch.autograd import DeviceType

    out = [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
           if getattr(e, "device_type", None) == DeviceType.CUDA]
    if out:
        return out
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return [(e.get("name", ""), float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "ts" in e]


def comm_stats(prof: Any, device: torch.device) -> dict[str, Any]:
    """Communication time of a profiled step, in ms.

    CUDA: ``comm_ms`` is the union of the NCCL kernel intervals (on any stream), ``exposed_comm_ms`` the part
    of it during which no other kernel runs, ``nccl_kernel_ms`` the plain sum of NCCL kernel durations. NCCL
    kernels start when enqueued and include the wait for the peer. CPU (gloo): the union of the c10d
    collective calls on the host (a smoke value only).
    """
    if device.type == "cuda":
        kern = kernel_events(prof)
        if not kern:
            raise RuntimeError("the profile holds no GPU kernel")
        comm = [(a, b) for n, a, b in kern if "nccl" in n.lower()]
        comp = [(a, b) for n, a, b in kern if "nccl" not in n.lower()]
        method = "NCCL kernel intervals (torch.profiler)"
    else:
        evs = [e for e in prof.events() if "c10d::" in e.name or "gloo" in e.name.lower()]
        comm = [(float(e.time_range.start), float(e.time_range.end)) for e in evs]
        comp, kern = [], []
        method = "c10d host calls (gloo; smoke value)"
    cu, pu = intervals_union(comm), intervals_union(comp)
    busy = sum(b - a for a, b in cu)
    exposed = busy - overlap(cu, pu) if device.type == "cuda" else busy
    return dict(comm_ms=busy / 1e3, exposed_comm_ms=exposed / 1e3, nccl_kernel_ms=sum(b - a for a, b in comm) / 1e3,
                comm_kernels=len(comm), kernels=len(kern), comm_method=method)


# ------------------------------------------------------------------------------------------------- steps
def run_config(args: argparse.Namespace, env: Env, model: SH2Model, cfg: SH2Config, L: int, name: str,
               cpcfg: CPConfig | None) -> dict[str, Any]:
    """Time forward + backward of one (length, scheme) configuration on this rank's shard.

    The environment variables ``SH2_BENCH_FAKE_OOM=KEY@RANK`` and ``SH2_BENCH_FAKE_ERROR=KEY@RANK`` raise an
    out-of-memory error or a RuntimeError there (tests).
    """
    cp, r, dev = env.world, env.rank, env.device
    if os.environ.get("SH2_BENCH_FAKE_OOM") == f"cp{cp}/{name}/L{L}@{r}":
        raise torch.OutOfMemoryError(f"CUDA out of memory (SH2_BENCH_FAKE_OOM on rank {r})")
    if os.environ.get("SH2_BENCH_FAKE_ERROR") == f"cp{cp}/{name}/L{L}@{r}":
        raise RuntimeError(f"SH2_BENCH_FAKE_ERROR on rank {r}")
    if cpcfg is None:
        remove_context_parallel(model)
    else:
        apply_context_parallel(model, env.cpg, cpcfg)
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(2, cfg.vocab_size, (1, L + 1), generator=g)
    inputs = shard_sequence(ids[:, :-1], cp, r).to(dev)
    labels = shard_sequence(ids[:, 1:], cp, r).to(dev)
    pos = zigzag_indices(L, cp, r, dev)
    weight = torch.tensor(float(inputs.numel()), device=dev)
    use_bf16 = args.precision == "bf16"

    def step() -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(inputs, pos)
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        loss = context_parallel_loss(ce, weight, env.cpg if cp > 1 else None)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_start = time.perf_counter()
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        barrier(env)
        env.sync()
        t0 = time.perf_counter()
        losses.append(step())
        env.sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    slowest = torch.tensor([step_s], device=dev, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    fpt = model_flops_per_token(cfg, L)
    row: dict[str, Any] = dict(status="ok", step_s=step_s, step_s_all=times, step_s_max_rank=float(slowest),
                               tokens_per_s=L / step_s, tokens_per_s_per_gpu=L / step_s / cp, loss=losses[-1],
                               flops_per_token=fpt, tflops_per_s_per_gpu=fpt * L / step_s / cp / 1e12)
    if dev.type == "cuda":
        row.update(peak_mem_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30)
    if args.profile and (cp > 1 or args.force_cp_ops):
        try:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
            barrier(env)
            env.sync()
            with profile(activities=acts) as prof:
                step()
                env.sync()
            row.update(comm_stats(prof, dev))
            row["comm_frac"] = row["comm_ms"] / 1e3 / step_s
            row["exposed_comm_frac"] = row["exposed_comm_ms"] / 1e3 / step_s
            del prof
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # the timing stands without the profile
            row["comm_error"] = f"{type(err).__name__}: {err}"[:300]
    row["seconds"] = round(time.perf_counter() - t_start, 1)
    return row


def skip_reason(args: argparse.Namespace, env: Env, cfg: SH2Config, rows: list[dict[str, Any]], L: int, name: str,
                cpcfg: CPConfig | None, static_gib: float, budget: Budget) -> str | None:
    """Rank 0's reason to skip a configuration (None: run it)."""
    if cpcfg is not None:
        try:
            validate_cp_settings(cfg, env.world, cpcfg)
        except ValueError as err:
            return f"skipped: {err}"
        if L % (2 * env.world):
            return f"skipped: L={L} not divisible by 2*cp"
    for x in rows:  # a shorter length of the same scheme ran out of memory (or died): so would this one
        status = str(x.get("status", ""))
        if x.get("scheme") == name and x["seq_len"] < L and (
                status.startswith(("out of memory", "failed")) or "OOM" in status):
            return f"skipped: {status.removeprefix('skipped: ')} at L={x['seq_len']}"
    ok = [x for x in rows if x.get("status") == "ok"]
    if env.device.type == "cuda":
        cap = torch.cuda.get_device_properties(env.device).total_memory / 2**30
        pts = [(x["seq_len"], x["peak_mem_gib"]) for x in ok if x.get("scheme") == name and "peak_mem_gib" in x]
        pred = predict_peak_gib(pts, L, static_gib)
        if pred is not None and pred > args.mem_limit_frac * cap:
            return f"skipped: predicted OOM ({pred:.0f} GiB > {args.mem_limit_frac:.0%} of {cap:.0f} GiB)"
    if budget.deadline is not None:
        left = budget.left()
        ref = sorted(ok, key=lambda x: (x.get("scheme") != name, abs(math.log(x["seq_len"] / L))))
        n_steps = args.warmup + args.steps + (1 if args.profile and env.world > 1 else 0)
        est = ref[0]["step_s"] * work(cfg, L) / work(cfg, ref[0]["seq_len"]) * n_steps + 3.0 if ref else 0.0
        if left < est or left < 5.0:
            return f"skipped: time budget ({left:.0f} s left, ~{est:.0f} s needed)"
    return None


def load_previous(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """Rows of an earlier attempt (``--resume``), with the configuration it died in recorded as failed."""
    if not (args.resume and args.out and os.path.exists(args.out)):
        return []
    with open(args.out) as f:
        old = json.load(f)
    if old.get("world") != world:
        return []
    rows = old.get("rows", [])
    pending = old.get("in_progress")
    errs = consume_errors(args.out)
    if pending:
        status = errs.get(pending["key"], "failed: the processes died (see the log)")
        rows.append({**pending, "status": status})
        print(f"resume: {pending['key']} -> {status}", flush=True)
    return rows


def run(args: argparse.Namespace, env: Env) -> int:
    """Every configuration of the plan: JSON to ``args.out`` after each one."""
    cfg = shape_config(args)
    cp, dev = env.world, env.device
    budget = Budget(args.time_budget)
    t_begin = time.perf_counter()
    rows = load_previous(args, cp) if env.is_main else []
    torch.manual_seed(0)
    with torch.device(dev):
        model = SH2Model(cfg)
    model.train()
    set_activation_checkpointing(model, not args.no_checkpointing)
    nparams = model.num_parameters()
    static_gib = 8 * nparams / 2**30  # fp32 weights + fp32 gradients (no optimizer here)
    report: dict[str, Any] = dict(mode="scaling", world=cp, backend=dist.get_backend(), **run_info(dev),
                                  layout=cfg.layout, layers=cfg.num_layers, width=cfg.hidden_size, heads=cfg.num_heads,
                                  mlp=cfg.mlp_hidden_size, groups=cfg.se_groups, parameters=nparams,
                                  precision=args.precision, activation_checkpointing=not args.no_checkpointing,
                                  batch=1, warmup=args.warmup, steps=args.steps,
                                  note="forward+backward, replicated fp32 weights, no optimizer or gradient reduction",
                                  rows=rows)
    if env.is_main:
        print(f"CP scaling on {cp} x {env.device_name()}: {cfg.layout} x{cfg.hidden_size} ({nparams / 1e6:.0f}M "
              f"parameters), {args.precision}, checkpointing {not args.no_checkpointing}", flush=True)
    for L, name, cpcfg in scaling_plan(args, cp):
        key = f"cp{cp}/{name}/L{L}"
        done = any(x.get("key") == key for x in rows) if env.is_main else False
        reason = None if done or not env.is_main else skip_reason(args, env, cfg, rows, L, name, cpcfg, static_gib,
                                                                   budget)
        done, reason = broadcast_obj(env, (done, reason))
        if done:
            continue
        base = dict(key=key, cp=cp, seq_len=L, scheme=name, cp_config=asdict(cpcfg) if cpcfg else None)
        if reason is not None:
            if env.is_main:
                rows.append({**base, "status": reason})
                print(f"  {key:<34s} {reason}", flush=True)
                write_json(args.out, report)
            continue
        if env.is_main:
            write_json(args.out, {**report, "in_progress": base})
        try:
            row = {**base, **run_config(args, env, model, cfg, L, name, cpcfg)}
        except torch.OutOfMemoryError as err:
            record_error(args.out, env.rank, key, f"out of memory: {(str(err).splitlines() or [''])[0]}")
            if cp > 1:  # the other ranks wait in a collective this rank will never join: end the job now
                print(f"rank {env.rank}: out of memory in {key}; exiting (rerun with --resume)", flush=True)
                exit_now(3)
            row = {**base, "status": "out of memory"}
            if args.out and os.path.exists(f"{args.out}.rank0.err"):
                os.remove(f"{args.out}.rank0.err")
        except Exception as err:  # recorded for --resume, then the job ends (see main)
            record_error(args.out, env.rank, key, f"failed: {error_line(err)}")
            raise
        free_memory(dev)
        if env.is_main:
            rows.append(row)
            if row["status"] == "ok":
                comm = (f"  comm {row['comm_ms']:.0f} ms (exposed {row['exposed_comm_ms']:.0f})"
                        if "comm_ms" in row else "")
                mem = f"  peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else ""
                print(f"  {key:<34s} step {row['step_s']:.3f} s  {row['tokens_per_s_per_gpu']:,.0f} tok/s/GPU"
                      f"{mem}{comm}  loss {row['loss']:.3f}", flush=True)
                if "comm_error" in row:
                    print(f"  {key:<34s} no communication profile: {row['comm_error']}", flush=True)
            else:
                print(f"  {key:<34s} {row['status']}", flush=True)
            write_json(args.out, report)
    report["elapsed_s"] = round(time.perf_counter() - t_begin, 1)
    if env.is_main:
        write_json(args.out, report)
        print(f"cp_scaling (cp={cp}): done in {report['elapsed_s']} s", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_torchrun_args(p)
    add_shape_args(p, preset="evo2_7b_1m", layout="SDH*")
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288])
    p.add_argument("--variants", nargs="*", default=["li=p2p_fft", "fir=a2a", "attention=ring"],
                   help="scheme changes from the defaults, one at a time (KEY=VALUE, KEY in li, fir, featurizer, "
                        "attention, chunks)")
    p.add_argument("--variant-lengths", type=int, nargs="*", default=None,
                   help="lengths of the variants (default: all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no communication profile step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or fp32")
    p.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing")
    p.add_argument("--force-cp-ops", action="store_true", help="CP operators also with one process")
    p.add_argument("--mem-limit-frac", type=float, default=0.92, help="skip if the predicted peak exceeds this")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: configurations that would not finish are skipped and recorded")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_on_ranks(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
