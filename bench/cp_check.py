"""Context-parallel check on one device: CP operators in a 1-rank group, then a few training steps.

On the single-GPU machine (NCCL)::

    PYTHONPATH=$PWD python bench/cp_check.py                       # ops + FSDP2 steps (+ DeepSpeed if installed)
    PYTHONPATH=$PWD python bench/cp_check.py --layers 8 --seq-len 8192 --steps 5 --out cp_check.json
    PYTHONPATH=$PWD python bench/cp_check.py --skip-ops --activation-checkpointing --compile   # compiled blocks

On CPU (gloo, tiny shapes)::

    PYTHONPATH=$PWD python bench/cp_check.py --device cpu --preset tiny --seq-len 256 --steps 3

Part 1 runs every CP operator scheme through ``CPSequenceOps`` with ``cp = 1`` (all-to-all collectives
really run, on the device's backend; p2p exchanges degenerate to local copies) on fp32 and bf16 device
tensors, and compares output and input/parameter gradients with the single-process ops. Part 2 trains the
1B-shape model (``--preset``, ``--layers`` to shrink it) for ``--steps`` steps with
``ContextParallelStrategy`` (cp = 1, FSDP2, ``force_cp_ops``) and, if deepspeed is importable, with
``ContextParallelDeepSpeedStrategy`` (ZeRO-2), printing losses, step time and peak memory. Exit status 1
if an operator check fails or a loss is not finite.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch

from bench.common import init_single_rank, rel_err, run_info, write_json
from sh2.models.seqops import LOCAL_OPS
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig, CPSequenceOps

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _check(name: str, ref_fn: Any, cp_fn: Any, inputs: list[torch.Tensor], params: list[torch.Tensor | None],
           tol: float) -> dict[str, Any]:
    results = []
    for fn in (ref_fn, cp_fn):
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        ps = [None if p is None else p.detach().clone().requires_grad_() for p in params]
        out = fn(*xs, *ps)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
        (out.float() * g.float()).sum().backward()
        results.append([out] + [t.grad for t in xs] + [p.grad for p in ps if p is not None])
    err = max(rel_err(a, b) for a, b in zip(results[1], results[0]))
    ok = math.isfinite(err) and err < tol
    print(f"  {name:<44s} max rel err {err:.2e}  {'ok' if ok else 'FAIL'}", flush=True)
    return {"name": name, "rel_err": err, "ok": ok}


def check_ops(device: torch.device, seq_len: int, width: int) -> list[dict[str, Any]]:
    """Every scheme of every operator vs the local op, fp32 and bf16."""
    cpg = CPGroup.from_group(None)
    out = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tol = TOL[dtype]

        def rnd(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device, dt)

        B, L, D, G = 1, seq_len, width, max(1, width // 16)
        print(f"CP operators on {device} ({dtype}, B={B}, L={L}, D={D}):", flush=True)
        x, w = rnd(B, L, 3 * D), rnd(3 * D, 3, scale=0.5)
        for s in ("p2p", "p2p_overlap"):
            ops = CPSequenceOps(cpg, CPConfig(featurizer_scheme=s))
            out.append(_check(f"featurizer/{s}/{dtype}", LOCAL_OPS.short_conv, ops.short_conv, [x], [w], tol))
        q, k, v = rnd(B, L, D), rnd(B, L, D), rnd(B, L, D)
        bias = rnd(D)
        for K in (7, 128):
            h = rnd(G, K, scale=0.1)
            for s in ("p2p", "p2p_overlap", "a2a", "a2a_pipelined"):
                ops = CPSequenceOps(cpg, CPConfig(fir_scheme=s))
                out.append(_check(f"fir K={K}/{s}/{dtype}", LOCAL_OPS.fir, ops.fir, [q, k, v], [h, bias], tol))
        lp = -torch.exp(rnd(D, 16, scale=0.5, dt=torch.float32) - 3.0)
        res = rnd(D, 16, scale=0.05, dt=torch.float32)
        for s in ("a2a", "a2a_pipelined", "p2p_fft"):
            ops = CPSequenceOps(cpg, CPConfig(li_scheme=s))
            out.append(_check(f"li/{s}/{dtype}", LOCAL_OPS.long_conv, ops.long_conv, [q, k, v], [lp, res, bias],
                              tol))
        ops = CPSequenceOps(cpg, CPConfig(li_scheme="state"))  # the default: the modal recurrence, states passed
        out.append(_check(f"li/state/{dtype}", LOCAL_OPS.modal_conv, ops.modal_conv, [q, k, v], [lp, res, bias], tol))
        H, hd = max(1, D // 128), min(128, D)
        qa, ka, va = rnd(B, L, H, hd), rnd(B, L, H, hd), rnd(B, L, H, hd)
        for s, backend in (("a2a", "auto"), ("ring", "auto"), ("ring", "math")):
            ops = CPSequenceOps(cpg, CPConfig(attention_scheme=s, ring_attention_backend=backend))
            out.append(_check(f"attention/{s}/{backend}/{dtype}", LOCAL_OPS.attention, ops.attention,
                              [qa, ka, va], [], tol))
    return out


class _RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 256, (n, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:],
                "loss_weights": torch.ones(self.ids.shape[1] - 1)}


def train(strategy: Any, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """A few steps of SH2LightningModule with ``strategy``; losses, seconds per step, peak memory."""
    import lightning as L

    from sh2.training.module import SH2LightningModule

    overrides = {"num_layers": args.layers} if args.layers else {}
    if args.layers:
        from sh2.models.config import SH2Config, stripe_layout

        base = SH2Config.from_name(args.preset)
        attn = tuple(i for i, op in enumerate(base.operators) if op == "MHA")
        overrides["layout"] = stripe_layout(args.layers, tuple(i for i in attn if i < args.layers))
    module = SH2LightningModule(preset=args.preset, overrides=overrides, seq_len=args.seq_len, lr=1e-4,
                                warmup_steps=1, activation_checkpointing=args.activation_checkpointing,
                                compile=args.compile)
    losses: list[float] = []
    times: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *a: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss.detach()))

    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, precision=precision,
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()], use_distributed_sampler=False)
    loader = torch.utils.data.DataLoader(_RandomTokens(args.steps, args.seq_len), batch_size=1)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from torch._dynamo.utils import counters

    counters.clear()  # graph breaks of this run only
    trainer.fit(module, loader)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    ok = len(losses) == args.steps and all(math.isfinite(x) for x in losses)
    breaks = int(sum(counters["graph_break"].values()))  # compiled blocks: any break ran a block eagerly
    print(f"  {type(strategy).__name__}: losses {[round(x, 4) for x in losses]}, s/step "
          f"{[round(t, 3) for t in times]}, peak {peak:.1f} GiB, graph breaks {breaks}  {'ok' if ok else 'FAIL'}",
          flush=True)
    return {"strategy": type(strategy).__name__, "losses": losses, "step_s": times, "peak_gib": peak, "ok": ok,
            "graph_breaks": breaks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="evo2_1b_8k")
    p.add_argument("--layers", type=int, default=4, help="truncate the preset's stripe to this many layers (0 = all)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--op-seq-len", type=int, default=4096)
    p.add_argument("--op-width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="compile the blocks (model.compile) in the training part")
    p.add_argument("--skip-ops", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.op_seq_len > 512:
        args.op_seq_len, args.op_width = 256, 64
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    init_single_rank("nccl" if device.type == "cuda" else "gloo")
    report: dict[str, Any] = run_info(device)
    ok = True
    if not args.skip_ops:
        report["ops"] = check_ops(device, args.op_seq_len, args.op_width)
        ok &= all(r["ok"] for r in report["ops"])
    if not args.skip_train:
        from sh2.strategies import ContextParallelStrategy

        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        print(f"training {args.preset} ({args.layers or 'all'} layers, L={args.seq_len}) for {args.steps} steps:")
        report["train"] = [train(ContextParallelStrategy(cp={"size": 1}, force_cp_ops=True,
                                                         mixed_precision="bf16" if device.type == "cuda" else None),
                                 args, precision)]
        if device.type == "cuda" and not args.no_deepspeed:
            try:
                from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy, require_deepspeed

                require_deepspeed()
            except ImportError as err:
                print(f"  DeepSpeed skipped: {err}")
            else:
                report["train"].append(train(ContextParallelDeepSpeedStrategy(cp={"size": 1}, stage=2,
                                                                              force_cp_ops=True), args, precision))
        ok &= all(r["ok"] for r in report["train"])
    write_json(args.out, report)
    print("cp_check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
