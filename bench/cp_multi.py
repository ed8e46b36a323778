"""Context parallelism on several GPUs of one host: correctness against one GPU, and CP scaling (issue 7).

Launch with torchrun, one process per GPU (NCCL), or with ``--device cpu`` (gloo, small shapes)::

    torchrun --standalone --nproc_per_node 4 bench/cp_multi.py correctness --out corr_n4.json
    torchrun --standalone --nproc_per_node 4 bench/cp_multi.py scaling --lengths 131072 262144 524288 \\
        --out scaling_n4.json
    torchrun --standalone --nproc_per_node 1 bench/cp_multi.py scaling --lengths 131072 262144 --out scaling_n1.json
    python bench/cp_multi.py summary OUT_DIR          # markdown tables of every JSON in OUT_DIR -> summary.md

    # CPU (2-4 gloo processes, tiny shapes):
    torchrun --nproc_per_node 2 bench/cp_multi.py correctness --device cpu --width 32 --heads 4 --groups 4 \\
        --mlp 64 --mr-filter-len 8 --op-seq-len 64 --model-seq-len 64

``correctness``: every CP scheme of every operator (featurizer p2p / p2p_overlap; SE and MR by p2p, p2p_overlap,
a2a, a2a_pipelined; LI by a2a, a2a_pipelined, p2p_fft; attention a2a and ring) at the 7B width (D = 4096,
32 heads x 128, G = 256, MR K = 128) on random inputs sharded zig-zag, forward and backward (input and
parameter gradients), against the local operator on the full sequence computed on rank 0 of the same
process group. Then the whole model at the 7B width (``--layout``, a few layers of each type) with CP = N
against CP = 1: loss and every parameter gradient, with the default schemes and with the alternative ones
(p2p_fft, a2a_pipelined, p2p_overlap, ring; activation checkpointing on, so the exchanges are re-run in the
recomputation). In fp32 and bf16 (the model in bf16 autocast, as in training).

Tolerances (relative error ``||cp - ref|| / ||ref||`` per tensor, the max over output and gradients):

- fp32: 1e-4. TF32 is switched off (``torch.backends.{cuda.matmul,cudnn}.allow_tf32 = False``) and the sh2
  Triton kernels use exact fp32 dots (``input_precision="ieee"``), so CP and reference differ only by the
  order of fp32 sums and by the FFT algorithm (p2p_fft): ~1e-6 expected.
- bf16: 2e-2. Both sides round to bf16 (eps 2^-8 = 3.9e-3) at different points (per shard, per channel slice,
  partial parameter gradients summed over ranks); a few roundings of 4e-3 stay well below 2e-2. Where bf16
  itself is further off than that (the gradients of the 7B-width model: bf16 vs fp32 on one GPU differ by
  ~5e-2), a bf16 row also passes if, tensor by tensor, the CP bf16 result is at most 2x as far from the
  one-GPU fp32 result as the one-GPU bf16 result is (the FlashAttention test criterion). Each bf16 row
  reports both errors against fp32 (``cp_bf16_vs_fp32``, ``ref_bf16_vs_fp32``) and the worst ratio.

``scaling``: a 7B-shape stack (``--layout``, default ``SDH*``: SE, MR, LI and MHA), activation checkpointing,
bf16 autocast, B = 1, fp32 weights replicated (no FSDP, no optimizer: the CP compute and its exchanges), at
each ``--lengths`` for the default schemes and for each ``--variants`` (one scheme changed at a time). Per
configuration: median step time (forward + backward) after ``--warmup`` steps, tokens/s per GPU, peak memory,
and the communication time of one extra profiled step (torch.profiler: union of the NCCL kernel intervals,
and the part of it not overlapped by any compute kernel; NCCL kernels include the wait for the peer). With one
process (CP = 1) the model uses the local operators: the baseline. ``--deadline`` (unix time) skips what
would not finish in time (recorded as skipped). Out-of-memory: with one process it is caught and recorded;
with several, the process exits (the other ranks are blocked in a collective) after writing
``OUT.rankR.err``; rerun with ``--resume`` to record it and go on (bench/multi_gpu.sh does). Configurations
whose peak memory, extrapolated from shorter lengths, exceeds ``--mem-limit-frac`` of the GPU are skipped.

``summary DIR``: reads ``correctness_n*.json``, ``scaling_n*.json`` and the training CSV logs of
bench/multi_gpu.sh and writes ``DIR/summary.md`` (scaling efficiency = tokens/s per GPU with CP = n divided
by tokens/s with CP = 1 at the largest length that ran on one GPU; also the same ratio of model FLOP/s per
GPU, which discounts the higher cost per token of longer sequences).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import glob
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

# NVLink multicast must stay off on the shared multi-GPU hosts (read by NCCL when a communicator is created).
for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_var] = _val

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cp_check import _rel, init_single_rank  # noqa: E402

from sh2.models.config import SH2Config, parse_layout  # noqa: E402
from sh2.models.model import SH2Model  # noqa: E402
from sh2.models.seqops import LOCAL_OPS  # noqa: E402
from sh2.strategies.cp_comm import CPGroup  # noqa: E402
from sh2.strategies.cp_ops import CPConfig, CPSequenceOps, validate_cp_settings  # noqa: E402
from sh2.strategies.parallelize import apply_context_parallel, context_parallel_loss  # noqa: E402
from sh2.strategies.sharding import shard_batch, shard_sequence, unshard_sequence, zigzag_indices  # noqa: E402
from sh2.training.flops import model_flops_per_token  # noqa: E402

TOL = {"fp32": 1e-4, "bf16": 2e-2}
BF16_RATIO = 2.0  # bf16 also passes when CP-bf16 is within this factor of one-GPU bf16, both against fp32


def worst(values: Any) -> float:
    """The largest error, NaN counted as infinite (Python's max drops a NaN that is not first)."""
    return max((math.inf if math.isnan(v) else v for v in values), default=0.0)


def judge_bf16(row: dict[str, Any], got: list[torch.Tensor], ref: list[torch.Tensor],
               ref_fp32: list[torch.Tensor], names: list[str]) -> None:
    """Add the fp32-anchored bf16 verdict to a bf16 ``row`` (in place).

    A bf16 result passes if it is within ``TOL["bf16"]`` of the one-GPU bf16 result, or, per tensor, no further
    from the one-GPU fp32 result than ``BF16_RATIO`` times the one-GPU bf16 result is (the criterion of the
    FlashAttention tests): where bf16 itself is off by more than the fixed tolerance (gradients of wide layers
    summed over many tokens), the CP result only has to be as accurate as bf16 allows.
    """
    cp_vs = {n: _rel(a, b) for n, a, b in zip(names, got, ref_fp32)}
    ref_vs = {n: _rel(a, b) for n, a, b in zip(names, ref, ref_fp32)}
    # errors under 1e-3 (a quarter of one bf16 rounding) are not judged by ratio: both sides are exact there
    ratio = worst(cp_vs[n] / max(ref_vs[n], 1e-3) for n in names)
    row.update(ref_bf16_vs_fp32=worst(ref_vs.values()), cp_bf16_vs_fp32=worst(cp_vs.values()), bf16_ratio=ratio)
    row["ok"] = bool(row["ok"] or (math.isfinite(ratio) and ratio <= BF16_RATIO))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCHEME_KEYS = {"li": "li_scheme", "fir": "fir_scheme", "featurizer": "featurizer_scheme",
               "attention": "attention_scheme", "chunks": "a2a_pipeline_chunks"}
ALT_SCHEMES = dict(li_scheme="p2p_fft", fir_scheme="a2a_pipelined", featurizer_scheme="p2p_overlap",
                   attention_scheme="ring")


# ------------------------------------------------------------------------------------------------ setup
class Env:
    """This process's place: device, CP group (the whole world) and rank.

    Attributes:
        device: the torch device of this rank.
        cpg: the context-parallel group (all ranks).
        rank: global rank (= CP rank).
        world: number of processes (= CP size).
    """

    def __init__(self, device: torch.device, cpg: CPGroup) -> None:
        self.device, self.cpg = device, cpg
        self.rank, self.world = cpg.rank, cpg.size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        """Wait for this rank's device work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def setup(args: argparse.Namespace) -> Env:
    """Initialise the process group (NCCL on CUDA, gloo on CPU) from torchrun's environment, or 1 rank."""
    device_type = args.device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(seconds=args.pg_timeout))
        else:
            init_single_rank(backend)
    cpg = CPGroup.from_group(None)
    env = Env(device, cpg)
    barrier(env)  # creates the communicator with every rank before the first point-to-point exchange
    return env


def barrier(env: Env) -> None:
    """A barrier that is a plain all-reduce on the device (works the same on NCCL and gloo)."""
    t = torch.ones(1, device=env.device)
    dist.all_reduce(t)


def broadcast_obj(env: Env, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions that must be identical everywhere)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


def model_config(args: argparse.Namespace) -> SH2Config:
    """The preset (7B shape by default) with the layout and any shape overrides of the command line."""
    over: dict[str, Any] = {"layout": args.layout, "num_layers": len(parse_layout(args.layout))}
    for name, field in (("width", "hidden_size"), ("heads", "num_heads"), ("mlp", "mlp_hidden_size"),
                        ("mr_filter_len", "mr_filter_len"), ("li_state", "li_state_size")):
        if getattr(args, name) is not None:
            over[field] = getattr(args, name)
    if args.groups is not None:
        over["se_groups"] = over["mr_groups"] = args.groups
    return SH2Config.from_name(args.preset, **over)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a reader never sees half a file)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def gather_seq(x: torch.Tensor, env: Env) -> torch.Tensor:
    """All-gather zig-zag shards ``[B, 2c, ...]`` (in fp32) and undo the permutation: ``[B, L, ...]``."""
    x = x.detach().float().contiguous()
    parts = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(parts, x)
    return unshard_sequence(parts, dim=1)


def sum_ranks(g: torch.Tensor, env: Env) -> torch.Tensor:
    """Sum of a tensor over ranks, in fp32."""
    g = g.detach().float().clone()
    dist.all_reduce(g)
    return g


def tf32_off() -> None:
    """Exact fp32 matmuls and convolutions for the fp32 comparisons."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------------------------ correctness
def op_cases(args: argparse.Namespace, cfg: SH2Config, cp: int) -> list[dict[str, Any]]:
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


def _applicable(case: dict[str, Any], cp: int, L: int) -> str | None:
    """Why a scheme cannot run with this CP size (None if it can)."""
    s, op = case["scheme"], case["op"]
    if op == "LI" and s == "p2p_fft" and cp & (cp - 1):
        return f"p2p_fft needs cp a power of two (cp={cp})"
    if op == "attention" and s == "a2a" and case["seq"][0].shape[2] % cp:
        return f"a2a attention needs heads divisible by cp={cp}"
    if op in ("SE", "MR") and s.startswith("a2a") and case["params"][0].shape[0] % cp:
        return f"a2a FIR needs groups divisible by cp={cp}"
    return None


def _run_local(method: str, seq: list[torch.Tensor], params: list[torch.Tensor | None], gout: torch.Tensor
               ) -> list[torch.Tensor]:
    """Reference: the local operator on the full sequence; [out, input grads..., param grads...]."""
    xs = [t.clone().requires_grad_() for t in seq]
    ps = [None if p is None else p.clone().requires_grad_() for p in params]
    out = getattr(LOCAL_OPS, method)(*xs, *ps)
    (out.float() * gout).sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in xs] + [p.grad.float() for p in ps if p is not None]


def _run_cp(env: Env, cpcfg: CPConfig, method: str, seq: list[torch.Tensor], params: list[torch.Tensor | None],
            gout: torch.Tensor) -> list[torch.Tensor]:
    """The CP operator on this rank's zig-zag shards; gathered output and gradients (full, fp32)."""
    cp, r = env.world, env.rank
    ops = CPSequenceOps(env.cpg, cpcfg)
    xs = [shard_sequence(t, cp, r).clone().requires_grad_() for t in seq]
    ps = [None if p is None else p.clone().requires_grad_() for p in params]
    out = getattr(ops, method)(*xs, *ps)
    (out.float() * shard_sequence(gout, cp, r)).sum().backward()
    res = [gather_seq(out, env)] + [gather_seq(t.grad, env) for t in xs]
    return res + [sum_ranks(p.grad, env) for p in ps if p is not None]


def _names(case: dict[str, Any]) -> list[str]:
    n_in = len(case["seq"])
    return ["out"] + [f"d_in{i}" for i in range(n_in)] + [f"d_param{i}" for i, p in enumerate(case["params"])
                                                          if p is not None]


def _out_of_time(args: argparse.Namespace, env: Env, need_s: float) -> bool:
    """Rank 0's verdict, shared by every rank: less than ``need_s`` seconds left before ``args.deadline``."""
    late = bool(args.deadline and args.deadline - time.time() < need_s) if env.is_main else None
    return bool(broadcast_obj(env, late))


def check_ops(args: argparse.Namespace, env: Env, cfg: SH2Config, rows: list[dict[str, Any]] | None = None,
              done: set[str] | None = None, save: Callable[..., None] | None = None) -> list[dict[str, Any]]:
    """Every operator scheme vs the local operator on rank 0, in each of ``args.dtypes``.

    Args:
        args: the command line.
        env: this rank.
        cfg: the model shape.
        rows: rows of an earlier attempt (rank 0), kept.
        done: ``op/scheme`` keys already in ``rows`` (every rank), not run again.
        save: ``save(rows, in_progress)`` on rank 0 before and after every operator, so partial results and
            the operator a crash happened in survive.
    """
    rows = list(rows or [])
    done = done or set()
    dev = env.device
    for case in op_cases(args, cfg, env.world):
        key = f"{case['op']}/{case['scheme']}"
        if key in done:
            continue
        why = _applicable(case, env.world, args.op_seq_len)
        if why is None and _out_of_time(args, env, 3.0):
            why = "time budget"
        if why is not None:
            for dt in args.dtypes:
                rows.append(dict(op=case["op"], scheme=case["scheme"], dtype=dt, status=f"skipped: {why}", ok=None))
            continue
        if save is not None and env.is_main:
            save(rows, {"key": key})
        try:
            rows += _check_case(args, env, case)
        except Exception as err:  # recorded for --resume, then the job ends (see main)
            _record_error(args, env, key, f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            raise
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None and env.is_main:
            save(rows, None)
    return rows


def _check_case(args: argparse.Namespace, env: Env, case: dict[str, Any]) -> list[dict[str, Any]]:
    """One operator scheme in every dtype: rows with the errors (on rank 0).

    ``CP_MULTI_FAKE_ERROR=OP/SCHEME@RANK`` raises a RuntimeError there (tests).
    """
    if os.environ.get("CP_MULTI_FAKE_ERROR") == f"{case['op']}/{case['scheme']}@{env.rank}":
        raise RuntimeError(f"CP_MULTI_FAKE_ERROR on rank {env.rank}")
    rows = []
    dev = env.device
    gout = torch.randn(case["seq"][0].shape, generator=torch.Generator().manual_seed(7)).to(dev)
    ref_fp32: list[torch.Tensor] | None = None
    for dt in args.dtypes:
        dtype = DTYPES[dt]
        seq = [t.to(dev, dtype) for t in case["seq"]]
        params = [None if p is None else p.to(dev, torch.float32 if i in case["fp32_params"] else dtype)
                  for i, p in enumerate(case["params"])]
        t0 = time.perf_counter()
        ref = _run_local(case["method"], seq, params, gout) if env.is_main else None
        got = _run_cp(env, case["cfg"], case["method"], seq, params, gout)
        env.sync()
        row: dict[str, Any] = dict(op=case["op"], scheme=case["scheme"], dtype=dt, tol=TOL[dt])
        if env.is_main:
            errs = {n: _rel(a, b) for n, a, b in zip(_names(case), got, ref)}
            err = worst(errs.values())
            row.update(max_rel_err=err, errors=errs, ok=bool(math.isfinite(err) and err < TOL[dt]),
                       seconds=round(time.perf_counter() - t0, 3))
            if dt == "fp32":
                ref_fp32 = ref
            elif ref_fp32 is not None:
                judge_bf16(row, got, ref, ref_fp32, _names(case))
            print(f"  {case['op']:<10s} {case['scheme']:<14s} {dt}  max rel err {err:.2e}  "
                  f"{'ok' if row['ok'] else 'FAIL'}{_bf16_note(row)}", flush=True)
        rows.append(row)
        del seq, params, ref, got
    del gout
    return rows


def _bf16_note(row: dict[str, Any]) -> str:
    if "bf16_ratio" not in row:
        return ""
    return (f"  (vs fp32: CP bf16 {row['cp_bf16_vs_fp32']:.1e}, one-GPU bf16 {row['ref_bf16_vs_fp32']:.1e}; "
            f"worst tensor ratio {row['bf16_ratio']:.2f})")


def _loss_sums(model: SH2Model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["input_ids"], batch.get("position_ids"))
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    w = batch["loss_weights"].flatten().float()
    return (ce * w).sum(), w.sum()


def _autocast(env: Env, dt: str) -> Any:
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if dt == "bf16" else nullcontext()


def check_model(args: argparse.Namespace, env: Env, cfg: SH2Config) -> list[dict[str, Any]]:
    """The whole model with CP = world vs CP = 1 on rank 0: loss and every parameter gradient."""
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
    ref_model = copy.deepcopy(model) if env.is_main else None
    names = [n for n, _ in model.named_parameters()]
    combos = [("default", CPConfig(a2a_pipeline_chunks=args.pipeline_chunks), False)]
    alt = dict(ALT_SCHEMES)
    if cp & (cp - 1):
        alt["li_scheme"] = "a2a_pipelined"
    if cfg.num_heads % cp == 0:
        combos.append(("alt+ckpt", CPConfig(**alt, a2a_pipeline_chunks=args.pipeline_chunks), True))
    rows = []
    ref_fp32: list[torch.Tensor] | None = None
    for dt in args.dtypes:
        ref_loss, ref_grads = None, None
        if env.is_main:
            ref_model.zero_grad(set_to_none=True)
            with _autocast(env, dt):
                ls, ws = _loss_sums(ref_model, batch)
            ref = ls / ws
            ref.backward()
            ref_loss = ref.detach().float()
            ref_grads = [p.grad.detach().float().clone() for p in ref_model.parameters()]
            ref_model.zero_grad(set_to_none=True)
        for name, cpcfg, ckpt in combos:
            t0 = time.perf_counter()
            apply_context_parallel(model, env.cpg, cpcfg)
            model.activation_checkpointing = ckpt
            model.zero_grad(set_to_none=True)
            with _autocast(env, dt):
                ls, ws = _loss_sums(model, local)
            loss = context_parallel_loss(ls, ws, env.cpg)
            loss.backward()
            grads = [sum_ranks(p.grad, env) / cp for p in model.parameters()]  # FSDP's average over ranks
            env.sync()
            row: dict[str, Any] = dict(op="model", scheme=name, dtype=dt, tol=TOL[dt], layout=cfg.layout,
                                       width=cfg.hidden_size, seq_len=L, cp_config=asdict(cpcfg),
                                       activation_checkpointing=ckpt)
            if env.is_main:
                loss_err = _rel(loss.detach().float(), ref_loss)
                gerrs = {n: _rel(a, b) for n, a, b in zip(names, grads, ref_grads)}
                top = sorted(gerrs.items(), key=lambda kv: -(math.inf if math.isnan(kv[1]) else kv[1]))[:3]
                err = worst([loss_err, *gerrs.values()])
                diff2 = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(grads, ref_grads))
                norm2 = sum(float(b.double().square().sum()) for b in ref_grads)
                row.update(loss=float(loss.detach()), ref_loss=float(ref_loss), loss_rel_err=loss_err,
                           global_grad_rel_err=math.sqrt(diff2 / max(norm2, 1e-300)),
                           max_grad_rel_err=top[0][1], worst_params=dict(top), max_rel_err=err,
                           ok=bool(math.isfinite(err) and err < TOL[dt]), seconds=round(time.perf_counter() - t0, 3))
                if dt != "fp32" and ref_fp32 is not None:  # the loss is judged with the gradients
                    judge_bf16(row, [loss.detach().float(), *grads], [ref_loss, *ref_grads], ref_fp32,
                               ["loss", *names])
                print(f"  model {cfg.layout} x{cfg.hidden_size} {name:<9s} {dt}  loss {float(loss.detach()):.5f} (ref "
                      f"{float(ref_loss):.5f}, rel {loss_err:.1e})  max grad rel err {top[0][1]:.2e} "
                      f"({top[0][0]})  {'ok' if row['ok'] else 'FAIL'}{_bf16_note(row)}", flush=True)
            rows.append(row)
            del grads, loss
        if env.is_main and dt == "fp32":
            ref_fp32 = [ref_loss, *ref_grads]
    for block in model.blocks:
        block.mixer.ops = LOCAL_OPS
    return rows


def _consume_errors(out: str) -> dict[str, str]:
    """Messages of the ``OUT.rankR.err`` files a crashed attempt left, by key (the files are removed).

    The earliest file wins: the rank that failed first, not a peer that lost its connection afterwards.
    """
    errs: dict[str, str] = {}
    for path in sorted(glob.glob(f"{out}.rank*.err"), key=lambda p: (os.path.getmtime(p), p)):
        try:
            with open(path) as f:
                e = json.load(f)
            errs.setdefault(e["key"], e["error"] + f" (rank {e['rank']})")
        except (OSError, ValueError, KeyError):
            pass
        os.remove(path)
    return errs


def _load_correctness(args: argparse.Namespace, world: int, dtypes: list[str]) -> dict[str, Any]:
    """Rows of an earlier attempt (``--resume``), with the check it died in recorded as failed."""
    if not (args.resume and args.out and os.path.exists(args.out)):
        return {}
    with open(args.out) as f:
        old = json.load(f)
    if old.get("world") != world:
        return {}
    errs = _consume_errors(args.out)
    pending = old.get("in_progress")
    if pending:
        key = pending["key"]
        status = errs.get(key, "failed: the processes died (see the log)")
        op, _, scheme = key.partition("/")
        failed = [dict(op=op, scheme=scheme, dtype=dt, status=status, ok=False) for dt in dtypes]
        if key == "model":
            old["model"] = [{**r, "scheme": s} for s in ("default", "alt+ckpt") for r in failed]
        else:
            old.setdefault("ops", []).extend(failed)
        print(f"resume: {key} -> {status}", flush=True)
    return old


def run_correctness(args: argparse.Namespace, env: Env) -> int:
    """Mode ``correctness``: operators and model; JSON to ``args.out``; exit status 1 on a failure.

    Kernel autotuning is off (``SH2_AUTOTUNE=0`` unless set): every config is exact, and it saves compile time.
    """
    tf32_off()
    os.environ.setdefault("SH2_AUTOTUNE", "0")
    cfg = model_config(args)
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
    prev = _load_correctness(args, env.world, args.dtypes) if env.is_main else {}
    done = broadcast_obj(env, sorted({f"{r['op']}/{r['scheme']}" if r["op"] != "model" else "model"
                                      for r in prev.get("ops", []) + prev.get("model", [])}))

    def save(rows: list[dict[str, Any]], in_progress: dict[str, Any] | None, part: str = "ops") -> None:
        write_json(args.out, {**report, part: rows, "in_progress": in_progress})

    if not args.skip_ops:
        report["ops"] = check_ops(args, env, cfg, rows=prev.get("ops"), done=set(done), save=save)
    if args.skip_model:
        pass
    elif "model" in done:
        report["model"] = prev["model"]
    elif _out_of_time(args, env, 15.0):
        report["model"] = [dict(op="model", scheme=s, dtype=dt, status="skipped: time budget", ok=None)
                           for s in ("default", "alt+ckpt") for dt in args.dtypes]
    else:
        if env.is_main:
            save([], {"key": "model"}, "model")
        try:
            report["model"] = check_model(args, env, cfg)
        except Exception as err:  # recorded for --resume, then the job ends (see main)
            _record_error(args, env, "model", f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            raise
    rows = report["ops"] + report["model"]
    report["ok"] = all(r["ok"] for r in rows if r.get("ok") is not None) if env.is_main else None
    report["complete"] = not any("time budget" in str(r.get("status", "")) for r in rows)
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    ok = broadcast_obj(env, report["ok"])
    if env.is_main:
        write_json(args.out, report)
        part = "" if report["complete"] else " (incomplete: time budget)"
        print(f"cp_multi correctness (cp={env.world}): {'OK' if ok else 'FAILED'}{part} in {report['elapsed_s']} s",
              flush=True)
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- scaling
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
    vlengths = sorted(args.variant_lengths or lengths)
    for L in vlengths:
        for v in args.variants:
            name, fields = parse_variant(v)
            plan.append((L, name, CPConfig(**{**base, **fields})))
    return plan


def _work(cfg: SH2Config, L: int) -> float:
    """Analytic training FLOPs of one sequence of L tokens (attention quadratic, FFT L log L)."""
    return model_flops_per_token(cfg, L) * L


def _set_ops(model: SH2Model, env: Env, cpcfg: CPConfig | None) -> None:
    if cpcfg is None:
        for block in model.blocks:
            block.mixer.ops = LOCAL_OPS
    else:
        apply_context_parallel(model, env.cpg, cpcfg)


def _intervals_union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
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


def _kernel_events(prof: Any) -> list[tuple[str, float, float]]:
    """GPU kernels of a profile as (name, start us, end us): profiler events, else the exported trace."""
    from torch.autograd import DeviceType

    out = [(e.name, float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
           if getattr(e, "device_type", None) == DeviceType.CUDA]
    if out:
        return out
    import tempfile

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
        kern = _kernel_events(prof)
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
    cu, pu = _intervals_union(comm), _intervals_union(comp)
    busy = sum(b - a for a, b in cu)
    exposed = busy - _overlap(cu, pu) if device.type == "cuda" else busy
    return dict(comm_ms=busy / 1e3, exposed_comm_ms=exposed / 1e3, nccl_kernel_ms=sum(b - a for a, b in comm) / 1e3,
                comm_kernels=len(comm), kernels=len(kern), comm_method=method)


def _record_error(args: argparse.Namespace, env: Env, key: str, message: str) -> None:
    """Leave ``OUT.rankR.err`` for ``--resume``: this rank dies in configuration ``key`` with ``message``."""
    if args.out:
        with open(f"{args.out}.rank{env.rank}.err", "w") as f:
            json.dump({"key": key, "rank": env.rank, "error": message[:300]}, f)


def _free(env: Env) -> None:
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(args: argparse.Namespace, env: Env, model: SH2Model, cfg: SH2Config, L: int, name: str,
               cpcfg: CPConfig | None) -> dict[str, Any]:
    """Time forward + backward of one (length, scheme) configuration on this rank's shard.

    The environment variables ``CP_MULTI_FAKE_OOM=KEY@RANK`` and ``CP_MULTI_FAKE_ERROR=KEY@RANK`` raise an
    out-of-memory error or a RuntimeError there (tests).
    """
    cp, r, dev = env.world, env.rank, env.device
    if os.environ.get("CP_MULTI_FAKE_OOM") == f"cp{cp}/{name}/L{L}@{r}":
        raise torch.OutOfMemoryError(f"CUDA out of memory (CP_MULTI_FAKE_OOM on rank {r})")
    if os.environ.get("CP_MULTI_FAKE_ERROR") == f"cp{cp}/{name}/L{L}@{r}":
        raise RuntimeError(f"CP_MULTI_FAKE_ERROR on rank {r}")
    _set_ops(model, env, cpcfg)
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


def _predict_mem(done: list[dict[str, Any]], L: int, static_gib: float) -> float | None:
    """Peak memory at length L extrapolated from completed rows of the same scheme (linear in L)."""
    pts = sorted((d["seq_len"], d["peak_mem_gib"]) for d in done if d.get("peak_mem_gib") is not None)
    if not pts:
        return None
    if len(pts) >= 2 and pts[-1][0] != pts[-2][0]:
        (l0, m0), (l1, m1) = pts[-2], pts[-1]
        return m1 + (m1 - m0) * (L - l1) / (l1 - l0)
    l1, m1 = pts[-1]
    return static_gib + (m1 - static_gib) * L / l1


def _decide(args: argparse.Namespace, env: Env, cfg: SH2Config, rows: list[dict[str, Any]], L: int, name: str,
            cpcfg: CPConfig | None, static_gib: float) -> str | None:
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
        pred = _predict_mem([x for x in ok if x.get("scheme") == name], L, static_gib)
        if pred is not None and pred > args.mem_limit_frac * cap:
            return f"skipped: predicted OOM ({pred:.0f} GiB > {args.mem_limit_frac:.0%} of {cap:.0f} GiB)"
    if args.deadline:
        left = args.deadline - time.time()
        ref = sorted(ok, key=lambda x: (x.get("scheme") != name, abs(math.log(x["seq_len"] / L))))
        n_steps = args.warmup + args.steps + (1 if args.profile and env.world > 1 else 0)
        if ref:
            est = ref[0]["step_s"] * _work(cfg, L) / _work(cfg, ref[0]["seq_len"]) * n_steps + 3.0
        else:
            est = 0.0
        if left < est or left < 5.0:
            return f"skipped: time budget ({left:.0f} s left, ~{est:.0f} s needed)"
    return None


def _load_resume(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """Rows of an earlier attempt, with the configuration it died in recorded as failed."""
    if not (args.resume and args.out and os.path.exists(args.out)):
        return []
    with open(args.out) as f:
        old = json.load(f)
    if old.get("world") != world:
        return []
    rows = old.get("rows", [])
    pending = old.get("in_progress")
    errs = _consume_errors(args.out)
    if pending:
        status = errs.get(pending["key"], "failed: the processes died (see the log)")
        rows.append({**pending, "status": status})
        print(f"resume: {pending['key']} -> {status}", flush=True)
    return rows


def run_scaling(args: argparse.Namespace, env: Env) -> int:
    """Mode ``scaling``: step time, tokens/s per GPU, memory and communication per configuration."""
    cfg = model_config(args)
    cp, dev = env.world, env.device
    t_begin = time.perf_counter()
    rows = _load_resume(args, cp) if env.is_main else []
    torch.manual_seed(0)
    with torch.device(dev):
        model = SH2Model(cfg)
    model.train()
    model.activation_checkpointing = not args.no_checkpointing
    nparams = model.num_parameters()
    static_gib = 8 * nparams / 2**30  # fp32 weights + fp32 gradients
    report: dict[str, Any] = dict(mode="scaling", world=cp, device=env.device_name(), backend=dist.get_backend(),
                                  torch=torch.__version__, layout=cfg.layout, layers=cfg.num_layers,
                                  width=cfg.hidden_size, heads=cfg.num_heads, mlp=cfg.mlp_hidden_size,
                                  groups=cfg.se_groups, parameters=nparams, precision=args.precision,
                                  activation_checkpointing=not args.no_checkpointing, batch=1,
                                  warmup=args.warmup, steps=args.steps,
                                  autotune=os.environ.get("SH2_AUTOTUNE", "1") not in ("0", "false", "off"),
                                  note="forward+backward, replicated fp32 "
                                  "weights, no optimizer or gradient reduction", rows=rows)
    if env.is_main:
        print(f"CP scaling on {cp} x {env.device_name()}: {cfg.layout} x{cfg.hidden_size} ({nparams / 1e6:.0f}M "
              f"parameters), {args.precision}, checkpointing {not args.no_checkpointing}", flush=True)
    for L, name, cpcfg in scaling_plan(args, cp):
        key = f"cp{cp}/{name}/L{L}"
        done = any(x.get("key") == key for x in rows) if env.is_main else False
        reason = None if done else _decide(args, env, cfg, rows, L, name, cpcfg, static_gib) \
            if env.is_main else None
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
            _record_error(args, env, key, f"out of memory: {(str(err).splitlines() or [''])[0]}")
            if cp > 1:  # the other ranks wait in a collective this rank will never join: end the job now
                print(f"rank {env.rank}: out of memory in {key}; exiting (rerun with --resume)", flush=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(3)  # no process-group teardown: torchrun stops the other ranks
            row = {**base, "status": "out of memory"}
            if args.out and os.path.exists(f"{args.out}.rank0.err"):
                os.remove(f"{args.out}.rank0.err")
        except Exception as err:  # recorded for --resume, then the job ends (see main)
            _record_error(args, env, key, f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            raise
        _free(env)
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
        print(f"cp_multi scaling (cp={cp}): done in {report['elapsed_s']} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- summary
def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _training_rows(out_dir: Path) -> list[str]:
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
    """Markdown tables of every cp_multi JSON (and training CSV log) in ``out_dir``; also ``summary.md``."""
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
                md.append(f"| {c['world']} | {r['op']} | {r['scheme']} | {r['dtype']} | {_fmt(err, '.2e')} | "
                          f"{_fmt(r.get('cp_bf16_vs_fp32'), '.1e')} | {_fmt(r.get('ref_bf16_vs_fp32'), '.1e')} | "
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
                md.append(f"| {s['world']} | {r['seq_len']} | {r['scheme']} | {_fmt(r.get('step_s'), '.3f')} | "
                          f"{_fmt(tps, ',.0f')} | {_fmt(eff, '.1%')} | {_fmt(eff_same, '.1%')} | "
                          f"{_fmt(eff_work, '.1%')} | {_fmt(tflops, '.0f')} | "
                          f"{_fmt(r.get('peak_mem_gib'), '.1f')} | {_fmt(r.get('comm_ms'), '.0f')} | "
                          f"{_fmt(r.get('exposed_comm_ms'), '.0f')} | {r.get('status')} |")
        md.append("")
    train = _training_rows(d)
    if train:
        md += ["## Training (sh2 fit, train/loss from the CSV logs)", "",
               "| run | steps | first loss | last loss | decreasing | resume |", "|---|---|---|---|---|---|", *train,
               ""]
    for log in sorted(d.glob("*.log")):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.startswith("[sh2] throughput")]
        if lines:
            md.append(f"- {log.stem}: {lines[-1]}")
    text = "\n".join(md) + "\n"
    (d / "summary.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The command line (three subcommands sharing the shape arguments)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--out", default=None, help="JSON output (written by rank 0)")
    common.add_argument("--preset", default="evo2_7b_1m", help="shape preset (7B: D=4096, 32 heads, G=256)")
    common.add_argument("--layout", default="SDH*", help="layer layout (S=SE, D=MR, H=LI, *=MHA)")
    common.add_argument("--width", type=int, default=None, help="override hidden_size")
    common.add_argument("--heads", type=int, default=None, help="override num_heads")
    common.add_argument("--groups", type=int, default=None, help="override se_groups and mr_groups")
    common.add_argument("--mlp", type=int, default=None, help="override mlp_hidden_size")
    common.add_argument("--mr-filter-len", type=int, default=None)
    common.add_argument("--li-state", type=int, default=None)
    common.add_argument("--pipeline-chunks", type=int, default=2, help="a2a_pipeline_chunks")
    common.add_argument("--pg-timeout", type=int, default=300, help="process-group timeout, seconds")
    common.add_argument("--deadline", type=float, default=None, help="unix time: skip what would not finish before it")
    common.add_argument("--time-budget", type=float, default=None, help="seconds from now (sets --deadline)")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("correctness", parents=[common], help="every CP operator and the model vs one GPU")
    c.add_argument("--op-seq-len", type=int, default=8192)
    c.add_argument("--model-seq-len", type=int, default=8192)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    c.add_argument("--skip-ops", action="store_true")
    c.add_argument("--skip-model", action="store_true")
    c.add_argument("--resume", action="store_true", help="keep the rows of --out and record where it died")
    s = sub.add_parser("scaling", parents=[common], help="step time, tokens/s, memory, communication per scheme")
    s.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144, 524288])
    s.add_argument("--variants", nargs="*", default=["li=p2p_fft", "fir=a2a", "attention=ring"],
                   help="scheme changes from the defaults, one at a time (KEY=VALUE, KEY in li, fir, featurizer, "
                        "attention, chunks)")
    s.add_argument("--variant-lengths", type=int, nargs="*", default=None,
                   help="lengths of the variants (default: all)")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--no-profile", dest="profile", action="store_false", help="no communication profile step")
    s.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or fp32")
    s.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing")
    s.add_argument("--force-cp-ops", action="store_true", help="CP operators also with one process")
    s.add_argument("--mem-limit-frac", type=float, default=0.92, help="skip if the predicted peak exceeds this")
    s.add_argument("--resume", action="store_true", help="keep the rows of --out and record where it died")
    m = sub.add_parser("summary", help="markdown tables of the JSON files of a folder (summary.md)")
    m.add_argument("out_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "summary":
        print(summarize(args.out_dir))
        return 0
    if args.time_budget is not None:
        args.deadline = min(args.deadline or math.inf, time.time() + args.time_budget)
    env = setup(args)
    fn: Callable[[argparse.Namespace, Env], int] = run_correctness if args.mode == "correctness" else run_scaling
    try:
        rc = fn(args, env)
    except BaseException:
        if env.world > 1:  # peers may wait in a collective: no teardown, torchrun ends them when this rank exits
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        raise
    dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
