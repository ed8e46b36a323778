"""Context parallelism on several GPUs of one host: every CP operator and the whole model against one GPU.

Launch with torchrun, one process per GPU (NCCL), or with ``--device cpu`` (gloo, small shapes)::

    torchrun --standalone --nproc_per_node 4 bench/cp_correctness.py --out correctness_n4.json
    torchrun --nproc_per_node 2 bench/cp_correctness.py --device cpu --width 32 --heads 4 --groups 4 \\
        --mlp 64 --mr-filter-len 8 --li-state 4 --op-seq-len 64 --model-seq-len 64      # CPU, tiny shapes

Operators: every CP scheme of every operator (featurizer p2p / p2p_overlap; SE and MR by p2p, p2p_overlap,
a2a, a2a_pipelined; LI by a2a, a2a_pipelined, p2p_fft; attention a2a and ring) at the 7B width (D = 4096,
32 heads x 128, G = 256, MR K = 128) on random inputs sharded zig-zag, forward and backward (input and
parameter gradients), against the local operator on the full sequence computed on rank 0 of the same
process group. Model: the whole model at the 7B width (``--layout``, a few layers of each type) with CP = N
against CP = 1: loss and every parameter gradient, with the default schemes and with the alternative ones
(p2p_fft, a2a_pipelined, p2p_overlap, ring; activation checkpointing on, so the exchanges are re-run in the
recomputation). In fp32 and bf16 (the model in bf16 autocast, as in training).

Tolerances (relative error ``||cp - ref|| / ||ref||`` per tensor, the max over output and gradients):

- fp32: 1e-4. TF32 is switched off and the sh2 Triton kernels use exact fp32 dots, so CP and reference differ
  only by the order of fp32 sums and by the FFT algorithm (p2p_fft): ~1e-6 expected.
- bf16: 2e-2. Both sides round to bf16 (eps 2^-8 = 3.9e-3) at different points (per shard, per channel slice,
  partial parameter gradients summed over ranks); a few roundings of 4e-3 stay well below 2e-2. Where bf16
  itself is further off than that (the gradients of the 7B-width model: bf16 vs fp32 on one GPU differ by
  ~5e-2), a bf16 row also passes if, tensor by tensor, the CP bf16 result is at most 2x as far from the
  one-GPU fp32 result as the one-GPU bf16 result is (``bench.common.judge_bf16``).

A crash (out of memory on one rank, a kernel fault) kills the job: ``--resume`` reruns keep the rows of
``--out``, record the check that died as failed (with the message the dying rank left in ``OUT.rankR.err``)
and go on. Exit status 1 if a check fails. Tables of several runs: ``bench/cp_summary.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import (
    TOL,
    Budget,
    Env,
    add_shape_args,
    add_torchrun_args,
    bf16_note,
    broadcast_obj,
    consume_errors,
    error_line,
    judge_bf16,
    record_error,
    rel_err,
    remove_context_parallel,
    run_on_ranks,
    set_activation_checkpointing,
    shape_config,
    tf32_off,
    worst,
    write_json,
)
from sh2.models.config import SH2Config
from sh2.models.model import SH2Model
from sh2.models.seqops import LOCAL_OPS
from sh2.strategies.cp_ops import CPConfig, CPSequenceOps
from sh2.strategies.parallelize import apply_context_parallel, context_parallel_loss
from sh2.strategies.sharding import shard_batch, shard_sequence, unshard_sequence

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALT_SCHEMES = dict(li_scheme="p2p_fft", fir_scheme="a2a_pipelined", featurizer_scheme="p2p_overlap",
                   attention_scheme="ring")
MODEL_COMBOS = ("default", "alt+ckpt")


def gather_seq(x: torch.Tensor, env: Env) -> torch.Tensor:
    """All-gather zig-zag shards ``[B, 2c, ...]`` (in fp32) and undo the permutation: ``[B, L, ...]``."""
    x = x.detach().float().contiguous()
    parts = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(parts, x)
    return unshard_sequence(parts, dim=1)


def sum_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks, in fp32."""
    t = t.detach().float().clone()
    dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------- operators
def op_cases(args: argparse.Namespace, cfg: SH2Config) -> list[dict[str, Any]]:
    """Every (operator, scheme) with its random full-sequence inputs and parameters (fp32, CPU, seeded)."""
    g = torch.Generator().manual_seed(0)
    B, L, D, G, H = args.batch, args.op_seq_len, cfg.hidden_size, cfg.se_groups, cfg.num_heads
    hd = cfg.head_dim

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    cases: list[dict[str, Any]] = []
    x, w = rnd(B, L, 3 * D), rnd(3 * D, cfg.featurizer_len, scale=0.5)
    for s in ("p2p", "p2p_overlap"):
        cases.append(dict(op="featurizer", scheme=s, cfg=CPConfig(featurizer_scheme=s), method="short_conv",
                          seq=[x], params=[w], fp32_params=()))
    q, k, v = rnd(B, L, D), rnd(B, L, D), rnd(B, L, D)
    h_se, h_mr, bias = rnd(G, cfg.se_filter_len, scale=0.3), rnd(G, cfg.mr_filter_len, scale=0.05), rnd(D)
    for op, h, b in (("SE", h_se, None), ("MR", h_mr, bias)):
        for s in ("p2p", "p2p_overlap", "a2a", "a2a_pipelined"):
            cases.append(dict(op=op, scheme=s, cfg=CPConfig(fir_scheme=s, a2a_pipeline_chunks=args.pipeline_chunks),
                              method="fir", seq=[q, k, v], params=[h, b], fp32_params=()))
    lp = -torch.exp(rnd(D, cfg.li_state_size, scale=0.5) - 3.0)
    res = rnd(D, cfg.li_state_size, scale=0.05)
    for s in ("a2a", "a2a_pipelined", "p2p_fft"):
        cases.append(dict(op="LI", scheme=s, cfg=CPConfig(li_scheme=s, a2a_pipeline_chunks=args.pipeline_chunks),
                          method="long_conv", seq=[q, k, v], params=[lp, res, bias], fp32_params=(0, 1)))
    qa, ka, va = rnd(B, L, H, hd), rnd(B, L, H, hd), rnd(B, L, H, hd)
    for s in ("a2a", "ring"):
        cases.append(dict(op="attention", scheme=s, cfg=CPConfig(attention_scheme=s), method="attention",
                          seq=[qa, ka, va], params=[], fp32_params=()))
    return cases


def not_applicable(case: dict[str, Any], cp: int) -> str | None:
    """Why a scheme cannot run with this CP size (None if it can)."""
    s, op = case["scheme"], case["op"]
    if op == "LI" and s == "p2p_fft" and cp & (cp - 1):
        return f"p2p_fft needs cp a power of two (cp={cp})"
    if op == "attention" and s == "a2a" and case["seq"][0].shape[2] % cp:
        return f"a2a attention needs heads divisible by cp={cp}"
    if op in ("SE", "MR") and s.startswith("a2a") and case["params"][0].shape[0] % cp:
        return f"a2a FIR needs groups divisible by cp={cp}"
    return None


def run_local(method: str, seq: list[torch.Tensor], params: list[torch.Tensor | None], gout: torch.Tensor
              ) -> list[torch.Tensor]:
    """Reference: the local operator on the full sequence; [out, input grads..., param grads...]."""
    xs = [t.clone().requires_grad_() for t in seq]
    ps = [None if p is None else p.clone().requires_grad_() for p in params]
    out = getattr(LOCAL_OPS, method)(*xs, *ps)
    (out.float() * gout).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in xs] + [p.grad.float() for p in ps if p is not None]


def run_cp(env: Env, cpcfg: CPConfig, method: str, seq: list[torch.Tensor], params: list[torch.Tensor | None],
           gout: torch.Tensor) -> list[torch.Tensor]:
    """The CP operator on this rank's zig-zag shards; gathered output and gradients (full, fp32)."""
    cp, r = env.world, env.rank
    ops = CPSequenceOps(env.cpg, cpcfg)
    xs = [shard_sequence(t, cp, r).clone().requires_grad_() for t in seq]
    ps = [None if p is None else p.clone().requires_grad_() for p in params]
    out = getattr(ops, method)(*xs, *ps)
    (out.float() * shard_sequence(gout, cp, r)).sum().backward()
    res = [gather_seq(out, env)] + [gather_seq(t.grad, env) for t in xs]
    return res + [sum_ranks(p.grad) for p in ps if p is not None]


def tensor_names(case: dict[str, Any]) -> list[str]:
    n_in = len(case["seq"])
    return ["out"] + [f"d_in{i}" for i in range(n_in)] + [f"d_param{i}" for i, p in enumerate(case["params"])
                                                          if p is not None]


def out_of_time(env: Env, budget: Budget, need_s: float) -> bool:
    """Rank 0's verdict, shared by every rank: less than ``need_s`` seconds left."""
    return bool(broadcast_obj(env, not budget.allows(need_s) if env.is_main else None))


def check_ops(args: argparse.Namespace, env: Env, cfg: SH2Config, budget: Budget,
              rows: list[dict[str, Any]] | None = None, done: set[str] | None = None,
              save: Callable[..., None] | None = None) -> list[dict[str, Any]]:
    """Every operator scheme vs the local operator on rank 0, in each of ``args.dtypes``.

    Args:
        args: the command line.
        env: this rank.
        cfg: the model shape.
        budget: the time left; checks that would start with less than 3 s left are skipped.
        rows: rows of an earlier attempt (rank 0), kept.
        done: ``op/scheme`` keys already in ``rows`` (every rank), not run again.
        save: ``save(rows, in_progress)`` on rank 0 before and after every operator, so partial results and
            the operator a crash happened in survive.
    """
    rows = list(rows or [])
    done = done or set()
    for case in op_cases(args, cfg):
        key = f"{case['op']}/{case['scheme']}"
        if key in done:
            continue
        why = not_applicable(case, env.world)
        if why is None and out_of_time(env, budget, 3.0):
            why = "time budget"
        if why is not None:
            for dt in args.dtypes:
                rows.append(dict(op=case["op"], scheme=case["scheme"], dtype=dt, status=f"skipped: {why}", ok=None))
            continue
        if save is not None and env.is_main:
            save(rows, {"key": key})
        try:
            rows += check_case(args, env, case)
        except Exception as err:  # recorded for --resume, then the job ends (see main)
            record_error(args.out, env.rank, key, f"failed: {error_line(err)}")
            raise
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None and env.is_main:
            save(rows, None)
    return rows


def check_case(args: argparse.Namespace, env: Env, case: dict[str, Any]) -> list[dict[str, Any]]:
    """One operator scheme in every dtype: rows with the errors (on rank 0).

    ``SH2_BENCH_FAKE_ERROR=OP/SCHEME@RANK`` raises a RuntimeError there (tests).
    """
    if os.environ.get("SH2_BENCH_FAKE_ERROR") == f"{case['op']}/{case['scheme']}@{env.rank}":
        raise RuntimeError(f"SH2_BENCH_FAKE_ERROR on rank {env.rank}")
    rows = []
    dev = env.device
    gout = torch.randn(case["seq"][0].shape, generator=torch.Generator().manual_seed(7)).to(dev)
    names = tensor_names(case)
    ref_fp32: list[torch.Tensor] | None = None
    for dt in args.dtypes:
        dtype = DTYPES[dt]
        seq = [t.to(dev, dtype) for t in case["seq"]]
        params = [None if p is None else p.to(dev, torch.float32 if i in case["fp32_params"] else dtype)
                  for i, p in enumerate(case["params"])]
        t0 = time.perf_counter()
        ref = run_local(case["method"], seq, params, gout) if env.is_main else None
        got = run_cp(env, case["cfg"], case["method"], seq, params, gout)
        env.sync()
        row: dict[str, Any] = dict(op=case["op"], scheme=case["scheme"], dtype=dt, tol=TOL[dt])
        if env.is_main:
            errs = {n: rel_err(a, b) for n, a, b in zip(names, got, ref)}
            err = worst(errs.values())
            row.update(max_rel_err=err, errors=errs, ok=bool(math.isfinite(err) and err < TOL[dt]),
                       seconds=round(time.perf_counter() - t0, 3))
            if dt == "fp32":
                ref_fp32 = ref
            elif ref_fp32 is not None:
                judge_bf16(row, got, ref, ref_fp32, names)
            print(f"  {case['op']:<10s} {case['scheme']:<14s} {dt}  max rel err {err:.2e}  "
                  f"{'ok' if row['ok'] else 'FAIL'}{bf16_note(row)}", flush=True)
        rows.append(row)
        del seq, params, ref, got
    return rows


# ----------------------------------------------------------------------------------------------- model
def loss_sums(model: SH2Model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted cross-entropy sum and weight sum of a batch."""
    logits = model(batch["input_ids"], batch.get("position_ids"))
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    w = batch["loss_weights"].flatten().float()
    return (ce * w).sum(), w.sum()


def autocast(env: Env, dt: str) -> Any:
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if dt == "bf16" else nullcontext()


def check_model(args: argparse.Namespace, env: Env, cfg: SH2Config) -> list[dict[str, Any]]:
    """The whole model with CP = world vs CP = 1 on rank 0: loss and every parameter gradient.

    The references (one per dtype) come first, so that activation checkpointing, once switched on for the
    alternative schemes, is never switched off again.
    """
    cp, r, dev = env.world, env.rank, env.device
    torch.manual_seed(1234)
    with torch.device(dev):
        model = SH2Model(cfg)
    for p in model.parameters():  # identical weights on every rank, whatever the device RNG does
        dist.broadcast(p.data, src=0)
    g = torch.Generator().manual_seed(3)
    L = args.model_seq_len
    ids = torch.randint(2, cfg.vocab_size, (args.batch, L + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "loss_weights": (torch.rand(args.batch, L, generator=g) > 0.1).float()}
    batch = {k: v.to(dev) for k, v in batch.items()}
    local = shard_batch(batch, cp, r)
    names = [n for n, _ in model.named_parameters()]
    combos = [("default", CPConfig(a2a_pipeline_chunks=args.pipeline_chunks), False)]
    alt = dict(ALT_SCHEMES)
    if cp & (cp - 1):
        alt["li_scheme"] = "a2a_pipelined"
    if cfg.num_heads % cp == 0:
        combos.append(("alt+ckpt", CPConfig(**alt, a2a_pipeline_chunks=args.pipeline_chunks), True))
    refs: dict[str, list[torch.Tensor]] = {}  # dtype -> [loss, *grads] of the one-process model (rank 0)
    if env.is_main:
        ref_model = copy.deepcopy(model)
        for dt in args.dtypes:
            ref_model.zero_grad(set_to_none=True)
            with autocast(env, dt):
                ls, ws = loss_sums(ref_model, batch)
            ref = ls / ws
            ref.backward()
            refs[dt] = [ref.detach().float(), *(p.grad.detach().float().clone() for p in ref_model.parameters())]
        del ref_model
    rows = []
    for name, cpcfg, ckpt in combos:
        apply_context_parallel(model, env.cpg, cpcfg)
        set_activation_checkpointing(model, ckpt)
        for dt in args.dtypes:
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            with autocast(env, dt):
                ls, ws = loss_sums(model, local)
            loss = context_parallel_loss(ls, ws, env.cpg)
            loss.backward()
            grads = [sum_ranks(p.grad) / cp for p in model.parameters()]  # FSDP's average over ranks
            env.sync()
            row: dict[str, Any] = dict(op="model", scheme=name, dtype=dt, tol=TOL[dt], layout=cfg.layout,
                                       width=cfg.hidden_size, seq_len=L, cp_config=asdict(cpcfg),
                                       activation_checkpointing=ckpt)
            if env.is_main:
                ref_loss, *ref_grads = refs[dt]
                loss_err = rel_err(loss.detach().float(), ref_loss)
                gerrs = {n: rel_err(a, b) for n, a, b in zip(names, grads, ref_grads)}
                top = sorted(gerrs.items(), key=lambda kv: -(math.inf if math.isnan(kv[1]) else kv[1]))[:3]
                err = worst([loss_err, *gerrs.values()])
                diff2 = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(grads, ref_grads))
                norm2 = sum(float(b.double().square().sum()) for b in ref_grads)
                row.update(loss=float(loss.detach()), ref_loss=float(ref_loss), loss_rel_err=loss_err,
                           global_grad_rel_err=math.sqrt(diff2 / max(norm2, 1e-300)),
                           max_grad_rel_err=top[0][1], worst_params=dict(top), max_rel_err=err,
                           ok=bool(math.isfinite(err) and err < TOL[dt]), seconds=round(time.perf_counter() - t0, 3))
                if dt != "fp32" and "fp32" in refs:  # the loss is judged with the gradients
                    judge_bf16(row, [loss.detach().float(), *grads], refs[dt], refs["fp32"], ["loss", *names])
                print(f"  model {cfg.layout} x{cfg.hidden_size} {name:<9s} {dt}  loss {float(loss.detach()):.5f} (ref "
                      f"{float(ref_loss):.5f}, rel {loss_err:.1e})  max grad rel err {top[0][1]:.2e} "
                      f"({top[0][0]})  {'ok' if row['ok'] else 'FAIL'}{bf16_note(row)}", flush=True)
            rows.append(row)
            del grads, loss
    remove_context_parallel(model)
    order = {dt: i for i, dt in enumerate(args.dtypes)}
    return sorted(rows, key=lambda r: order[r["dtype"]])


# ------------------------------------------------------------------------------------------------- run
def load_previous(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Rows of an earlier attempt (``--resume``), with the check it died in recorded as failed."""
    if not (args.resume and args.out and os.path.exists(args.out)):
        return {}
    with open(args.out) as f:
        old = json.load(f)
    if old.get("world") != world:
        return {}
    errs = consume_errors(args.out)
    pending = old.get("in_progress")
    if pending:
        key = pending["key"]
        status = errs.get(key, "failed: the processes died (see the log)")
        op, _, scheme = key.partition("/")
        failed = [dict(op=op, scheme=scheme, dtype=dt, status=status, ok=False) for dt in args.dtypes]
        if key == "model":
            old["model"] = [{**r, "scheme": s} for s in MODEL_COMBOS for r in failed]
        else:
            old.setdefault("ops", []).extend(failed)
        print(f"resume: {key} -> {status}", flush=True)
    return old


def run(args: argparse.Namespace, env: Env) -> int:
    """Operators and model; JSON to ``args.out``; exit status 1 on a failure.

    Kernel autotuning is off (``SH2_AUTOTUNE=0`` unless set): every config is exact, and it saves compile time.
    """
    tf32_off()
    os.environ.setdefault("SH2_AUTOTUNE", "0")
    budget = Budget(args.time_budget)
    cfg = shape_config(args)
    t0 = time.perf_counter()
    if env.is_main:
        print(f"CP correctness on {env.world} x {env.device_name()} ({dist.get_backend()}): width "
              f"{cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, G={cfg.se_groups}, "
              f"MR K={cfg.mr_filter_len}, "
              f"ops L={args.op_seq_len}, model {cfg.layout} L={args.model_seq_len}; tolerances {TOL}", flush=True)
    report: dict[str, Any] = dict(mode="correctness", world=env.world, device=env.device_name(),
                                  backend=dist.get_backend(), torch=torch.__version__, tolerances=TOL, tf32=False,
                                  shape=dict(width=cfg.hidden_size, heads=cfg.num_heads, head_dim=cfg.head_dim,
                                             groups=cfg.se_groups, mr_filter_len=cfg.mr_filter_len,
                                             op_seq_len=args.op_seq_len, model_seq_len=args.model_seq_len,
                                             layout=cfg.layout, batch=args.batch),
                                  ops=[], model=[])
    prev = load_previous(args, env.world) if env.is_main else {}
    done = broadcast_obj(env, sorted({f"{r['op']}/{r['scheme']}" if r["op"] != "model" else "model"
                                      for r in prev.get("ops", []) + prev.get("model", [])}))

    def save(rows: list[dict[str, Any]], in_progress: dict[str, Any] | None, part: str = "ops") -> None:
        write_json(args.out, {**report, part: rows, "in_progress": in_progress})

    if not args.skip_ops:
        report["ops"] = check_ops(args, env, cfg, budget, rows=prev.get("ops"), done=set(done), save=save)
    if args.skip_model:
        pass
    elif "model" in done:
        report["model"] = prev["model"]
    elif out_of_time(env, budget, 15.0):
        report["model"] = [dict(op="model", scheme=s, dtype=dt, status="skipped: time budget", ok=None)
                           for s in MODEL_COMBOS for dt in args.dtypes]
    else:
        if env.is_main:
            save([], {"key": "model"}, "model")
        try:
            report["model"] = check_model(args, env, cfg)
        except Exception as err:  # recorded for --resume, then the job ends (see main)
            record_error(args.out, env.rank, "model", f"failed: {error_line(err)}")
            raise
    rows = report["ops"] + report["model"]
    report["ok"] = all(r["ok"] for r in rows if r.get("ok") is not None) if env.is_main else None
    report["complete"] = not any("time budget" in str(r.get("status", "")) for r in rows)
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    ok = broadcast_obj(env, report["ok"])
    if env.is_main:
        write_json(args.out, report)
        part = "" if report["complete"] else " (incomplete: time budget)"
        print(f"cp_correctness (cp={env.world}): {'OK' if ok else 'FAILED'}{part} in {report['elapsed_s']} s",
              flush=True)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_torchrun_args(p)
    add_shape_args(p, preset="evo2_7b_1m", layout="SDH*")
    p.add_argument("--op-seq-len", type=int, default=8192)
    p.add_argument("--model-seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--skip-ops", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: checks that would not finish are skipped and recorded")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_on_ranks(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
