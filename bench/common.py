"""Helpers shared by the benchmark scripts: timing, device ceilings, output, accuracy verdicts, models, torchrun.

Measurement protocol (``shared/ANCHORS.md``): time with ``triton.testing.do_bench`` (CUDA events, warm-up
excluded) and report its median; measure the device ceilings (copy bandwidth counting bytes read plus written,
bf16 matmul rate) in the same run as the thing they are compared with; draw fresh random inputs, never zeros.
On the CPU the same code runs with a plain timer and tiny sizes, so that every script can be smoke-tested
without a GPU (its numbers are then meaningless).

Model seams used by several scripts (:func:`remove_context_parallel`, :func:`apply_compile`,
:func:`set_activation_checkpointing`) call the function of ``sh2.strategies.parallelize`` when the tree has
it and fall back to the equivalent direct change otherwise, so that the scripts run on trees before and after
those functions exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import importlib
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import torch
import torch.distributed as dist

from sh2.models.config import SH2Config, parse_layout, stripe_layout

# ------------------------------------------------------------------------------------------ records, output


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_info(device: torch.device) -> dict[str, Any]:
    """What a result needs to be reproducible: device, versions, UTC time, command line."""
    info: dict[str, Any] = {"device": device_name(device), "torch": torch.__version__,
                            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                            "autotune": os.environ.get("SH2_AUTOTUNE", "1") not in ("0", "false", "off")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton ships with torch on Linux
        info["triton"] = None
    return info


def write_json(path: str | os.PathLike | None, data: Any) -> None:
    """Write ``data`` atomically (a reader, or a run cut short, never sees half a file)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def fmt(x: Any, spec: str = ".3g") -> str:
    """A table cell: ``-`` for None, NaN and infinities, yes/no for booleans."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a markdown table (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print ``## title`` and a markdown table. The GPU scripts show stdout from the first ``## `` line on."""
    print(f"\n## {title}")
    print("\n".join(markdown_table(header, rows)), flush=True)


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 10, rep_ms: float = 100,
             cpu_reps: int = 3) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, a plain timer elsewhere.

    ``do_bench`` flushes the L2 cache before every repetition and times with CUDA events; its warm-up and
    repetition arguments are milliseconds of work, so a slow ``fn`` runs about seven times (five for its
    estimate, one warm-up, one timed) and a fast one many more.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Budget:
    """A wall-clock allowance: a deadline ``seconds`` from now (None: unlimited), with sub-budgets per phase.

    Scripts check :meth:`allows` before each measurement and record what they skip, so a run always ends
    with its JSON and table written instead of being killed by the device call's time limit.
    """

    def __init__(self, seconds: float | None, deadline: float | None = None) -> None:
        now = time.monotonic()
        own = None if seconds is None else now + seconds
        ends = [t for t in (own, deadline) if t is not None]
        self.deadline: float | None = min(ends) if ends else None

    def left(self) -> float:
        """Seconds left (infinite without a deadline)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, need_s: float) -> bool:
        """Whether ``need_s`` seconds of work still fit."""
        return self.left() >= need_s

    def phase(self, seconds: float | None) -> Budget:
        """A sub-budget of at most ``seconds`` that also ends with this one."""
        return Budget(seconds, self.deadline)


# --------------------------------------------------------------------------------------------- ceilings


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written (bf16 random data)."""
    a = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    return 2 * nbytes / ms / 1e6


def matmul_peak_tflops(device: torch.device, size: int = 8192, rounds: int = 3) -> float:
    """bf16 matmul rate in TFLOP/s of a ``size``-cubed product on random data: the best of ``rounds`` medians (one
    median varies by 10% or more between processes on the same GPU, and a low one flatters every MFU)."""
    x, y = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = min(bench_ms(lambda: x @ y, device) for _ in range(rounds))
    return 2 * size**3 / ms / 1e9


def measure_ceilings(device: torch.device, copy_bytes: int | None = None, matmul_size: int | None = None
                     ) -> dict[str, Any]:
    """Copy bandwidth and bf16 matmul peak of ``device``, measured now (1 GiB copy, 8192^3 on a GPU).

    On the CPU the sizes default to 16 MiB and 256^3: a smoke value of the same code, not a ceiling.
    """
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or ((1 << 30) if cuda else (1 << 24))
    matmul_size = matmul_size or (8192 if cuda else 256)
    out = {"copy_GBps": copy_bandwidth_gbps(device, copy_bytes),
           "matmul_bf16_TFLOPs": matmul_peak_tflops(device, matmul_size),
           "copy_bytes": copy_bytes, "matmul_size": matmul_size,
           "method": "triton.testing.do_bench median" if cuda else "CPU timer (smoke value)"}
    free_memory(device)
    return out


def byte_floor_ms(tensors: int, tokens: int, width: int, copy_gbps: float, elem_bytes: int = 2) -> float:
    """Milliseconds to move ``tensors`` activations of ``tokens x width`` elements once at the copy ceiling."""
    return tensors * tokens * width * elem_bytes / (copy_gbps * 1e9) * 1e3


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks, so the next measurement starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- accuracy verdicts

TOL = {"fp32": 1e-4, "bf16": 2e-2}
BF16_RATIO = 2.0  # bf16 also passes when within this factor of the reference's own bf16 error, both vs fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN if either holds a NaN)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def worst(values: Iterable[float]) -> float:
    """The largest error, NaN counted as infinite (Python's max drops a NaN that is not first)."""
    return max((math.inf if math.isnan(v) else v for v in values), default=0.0)


def judge_bf16(row: dict[str, Any], got: list[torch.Tensor], ref: list[torch.Tensor],
               ref_fp32: list[torch.Tensor], names: list[str]) -> None:
    """Add the fp32-anchored bf16 verdict to a bf16 ``row`` (in place).

    A bf16 result passes if it is within ``TOL["bf16"]`` of the reference bf16 result, or, per tensor, no
    further from the reference fp32 result than ``BF16_RATIO`` times the reference bf16 result is (the
    criterion of the FlashAttention tests): where bf16 itself is off by more than the fixed tolerance
    (gradients of wide layers summed over many tokens), the result only has to be as accurate as bf16 allows.
    """
    got_vs = {n: rel_err(a, b) for n, a, b in zip(names, got, ref_fp32)}
    ref_vs = {n: rel_err(a, b) for n, a, b in zip(names, ref, ref_fp32)}
    # errors under 1e-3 (a quarter of one bf16 rounding) are not judged by ratio: both sides are exact there
    ratio = worst(got_vs[n] / max(ref_vs[n], 1e-3) for n in names)
    row.update(ref_bf16_vs_fp32=worst(ref_vs.values()), cp_bf16_vs_fp32=worst(got_vs.values()), bf16_ratio=ratio)
    row["ok"] = bool(row["ok"] or (math.isfinite(ratio) and ratio <= BF16_RATIO))


def bf16_note(row: dict[str, Any]) -> str:
    """The bf16 verdict's numbers for a log line (empty for fp32 rows)."""
    if "bf16_ratio" not in row:
        return ""
    return (f"  (vs fp32: CP bf16 {row['cp_bf16_vs_fp32']:.1e}, one-GPU bf16 {row['ref_bf16_vs_fp32']:.1e}; "
            f"worst tensor ratio {row['bf16_ratio']:.2f})")


# --------------------------------------------------------------------------------------------- models


def add_shape_args(p: argparse.ArgumentParser, preset: str, layout: str | None) -> None:
    """Options that pick a model shape: a preset, a layout and field overrides."""
    p.add_argument("--preset", default=preset, help=f"SH2Config preset (default {preset})")
    p.add_argument("--layout", default=layout, help="layer layout (S=SE, D=MR, H=LI, *=MHA)"
                   + (f"; default {layout}" if layout else "; default: the preset's"))
    p.add_argument("--width", type=int, default=None, help="override hidden_size")
    p.add_argument("--heads", type=int, default=None, help="override num_heads")
    p.add_argument("--groups", type=int, default=None, help="override se_groups and mr_groups")
    p.add_argument("--mlp", type=int, default=None, help="override mlp_hidden_size")
    p.add_argument("--mr-filter-len", type=int, default=None, help="override mr_filter_len")
    p.add_argument("--li-state", type=int, default=None, help="override li_state_size")
    p.add_argument("--li-algorithm", default=None, help="Hyena-LI path (modal | fft) where SH2Config has the "
                   "li_algorithm field; default: the config's")


def shape_config(args: argparse.Namespace) -> SH2Config:
    """The preset with the layout and shape overrides of :func:`add_shape_args`."""
    over: dict[str, Any] = {}
    if args.layout:
        over.update(layout=args.layout, num_layers=len(parse_layout(args.layout)))
    for name, field in (("width", "hidden_size"), ("heads", "num_heads"), ("mlp", "mlp_hidden_size"),
                        ("mr_filter_len", "mr_filter_len"), ("li_state", "li_state_size")):
        if getattr(args, name, None) is not None:
            over[field] = getattr(args, name)
    if getattr(args, "groups", None) is not None:
        over["se_groups"] = over["mr_groups"] = args.groups
    return with_li_algorithm(SH2Config.from_name(args.preset, **over), getattr(args, "li_algorithm", None))


def bench_layouts(layers: int) -> dict[str, str]:
    """The two layouts the end-to-end benchmark compares at one depth: the Evo 2 stripe (attention at every
    seventh layer from the fourth) and the Transformer layout of the same width and depth."""
    return {"sh2": stripe_layout(layers, tuple(i for i in range(layers) if i % 7 == 3)), "transformer": "*" * layers}


def _has_field(cfg: SH2Config, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cfg)}


def li_algorithm_of(cfg: SH2Config) -> str:
    """The Hyena-LI path a config runs: its ``li_algorithm`` field, or ``"fft"`` (a tree without the field)."""
    return str(getattr(cfg, "li_algorithm", "fft")) if _has_field(cfg, "li_algorithm") else "fft"


def with_li_algorithm(cfg: SH2Config, algorithm: str | None) -> SH2Config:
    """``cfg`` with its Hyena-LI path set (None: unchanged).

    Raises:
        ValueError: ``algorithm`` is not ``"fft"`` and this tree's SH2Config has no ``li_algorithm`` field.
    """
    if algorithm is None:
        return cfg
    if not _has_field(cfg, "li_algorithm"):
        if algorithm == "fft":
            return cfg
        raise ValueError(f"--li-algorithm {algorithm}: this tree's SH2Config has no li_algorithm field (only the "
                         f"FFT path exists); leave the option out")
    return cfg.replace(li_algorithm=algorithm)


def _parallelize_fn(name: str) -> Callable[..., Any] | None:
    # the module, not the function of the same name that sh2.strategies exports
    return getattr(importlib.import_module("sh2.strategies.parallelize"), name, None)


def remove_context_parallel(model: torch.nn.Module) -> None:
    """Give every mixer its single-process operators back (the inverse of ``apply_context_parallel``).

    Calls ``sh2.strategies.parallelize.remove_context_parallel`` where the tree has it; otherwise sets
    ``sh2.models.seqops.LOCAL_OPS`` on every ``block.mixer.ops``, which is what that function undoes.
    """
    fn = _parallelize_fn("remove_context_parallel")
    if fn is not None:
        fn(model)
        return
    from sh2.models.seqops import LOCAL_OPS

    for block in model.blocks:
        block.mixer.ops = LOCAL_OPS


def apply_compile(model: torch.nn.Module) -> str:
    """Compile every block of ``model`` in place with ``torch.compile``; returns which code did it.

    ``sh2.strategies.parallelize.apply_compile`` where the tree has it (the path ``model.compile`` takes in
    training); otherwise ``block.compile()`` on each block, which compiles the block's forward in place and
    keeps the module (and its parameters) as it is, as torchtitan does before sharding.
    """
    fn = _parallelize_fn("apply_compile")
    if fn is not None:
        fn(model)
        return "sh2.strategies.parallelize.apply_compile"
    for block in model.blocks:
        block.compile()
    return "per-block torch.compile (bench.common fallback)"


_CHECKPOINTED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Recompute every block in the backward pass (or not).

    Uses ``sh2.strategies.parallelize.apply_activation_checkpointing`` where the tree has it, else the model's
    ``activation_checkpointing`` switch.

    Raises:
        RuntimeError: the tree has neither (checkpointing moved somewhere this helper does not know).
        ValueError: switching it off on a model whose blocks ``apply_activation_checkpointing`` wrapped.
    """
    fn = _parallelize_fn("apply_activation_checkpointing")
    if fn is not None:
        if model in _CHECKPOINTED:
            if not enabled:
                raise ValueError("activation checkpointing was applied to this model and cannot be removed: "
                                 "build a new model")
        elif enabled:
            fn(model)
            _CHECKPOINTED.add(model)
        return
    if not hasattr(model, "activation_checkpointing"):
        raise RuntimeError("this tree has neither sh2.strategies.parallelize.apply_activation_checkpointing nor "
                           "SH2Model.activation_checkpointing: update bench.common.set_activation_checkpointing")
    model.activation_checkpointing = enabled


def static_training_gib(n_params: int) -> float:
    """GiB of fp32 weights, gradients and both AdamW moments: the part of a step's memory that does not grow
    with the number of tokens (used to extrapolate peak memory to longer sequences)."""
    return 16 * n_params / 2**30


def predict_peak_gib(points: list[tuple[int, float]], tokens: int, static_gib: float) -> float | None:
    """Peak memory at ``tokens`` tokens per step from measured ``(tokens, peak GiB)`` points (linear in tokens)."""
    pts = sorted(points)
    if not pts:
        return None
    if len(pts) >= 2 and pts[-1][0] != pts[-2][0]:
        (t0, m0), (t1, m1) = pts[-2], pts[-1]
        return m1 + (m1 - m0) * (tokens - t1) / (t1 - t0)
    t1, m1 = pts[-1]
    return static_gib + (m1 - static_gib) * tokens / t1


# ------------------------------------------------------------------------------------- torchrun groups

# NVLink multicast must stay off on the shared multi-GPU hosts; NCCL reads these when a communicator is created.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Env:
    """This process's place in a torchrun job: device, CP group (the whole world) and rank.

    Attributes:
        device: the torch device of this rank.
        cpg: the context-parallel group (all ranks).
        rank: global rank (= CP rank).
        world: number of processes (= CP size).
    """

    def __init__(self, device: torch.device, cpg: Any) -> None:
        self.device, self.cpg = device, cpg
        self.rank, self.world = cpg.rank, cpg.size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        """Wait for this rank's device work."""
        sync(self.device)

    def device_name(self) -> str:
        return device_name(self.device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank(backend: str) -> None:
    """A 1-rank process group (also what Lightning will find and reuse)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend, rank=0, world_size=1)


def setup_distributed(device_type: str, timeout_s: int = 300) -> Env:
    """Initialise the process group from torchrun's environment (NCCL on CUDA, gloo on CPU), or one rank."""
    from sh2.strategies.cp_comm import CPGroup

    os.environ.update(NO_MULTICAST)
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
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            init_single_rank(backend)
    env = Env(device, CPGroup.from_group(None))
    barrier(env)  # creates the communicator with every rank before the first point-to-point exchange
    return env


def add_torchrun_args(p: argparse.ArgumentParser) -> None:
    """Options of the scripts launched by torchrun: device, output, ``--resume`` and the process-group timeout."""
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device())
    p.add_argument("--out", default=None, help="JSON output (written by rank 0)")
    p.add_argument("--resume", action="store_true", help="keep the rows of --out and record where it died")
    p.add_argument("--pg-timeout", type=int, default=300, help="process-group timeout, seconds")
    p.add_argument("--pipeline-chunks", type=int, default=2, help="a2a_pipeline_chunks of the CP schemes")


def run_on_ranks(run: Callable[[argparse.Namespace, Env], int], args: argparse.Namespace) -> int:
    """Set the process group up (``args.device``, ``args.pg_timeout``), return ``run(args, env)``, tear it down.

    A failure on one rank of several ends this process at once, without teardown: the peers may wait in a
    collective this rank will never join, and torchrun stops them when one rank exits.
    """
    env = setup_distributed(args.device, args.pg_timeout)
    try:
        rc = run(args, env)
    except BaseException:
        if env.world > 1:
            traceback.print_exc()
            exit_now(1)
        raise
    dist.destroy_process_group()
    return rc


def barrier(env: Env) -> None:
    """A barrier that is a plain all-reduce on the device (works the same on NCCL and gloo)."""
    dist.all_reduce(torch.ones(1, device=env.device))


def broadcast_obj(env: Env, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions that must be identical everywhere)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


def tf32_off() -> None:
    """Exact fp32 matmuls and convolutions for fp32 comparisons."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def exit_now(code: int) -> None:
    """End this rank without tearing the process group down (peers blocked in a collective would hang it);
    torchrun stops the other ranks when one exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def record_error(out: str | None, rank: int, key: str, message: str) -> None:
    """Leave ``OUT.rankR.err`` for a ``--resume`` run: this rank dies in configuration ``key`` with ``message``."""
    if out:
        with open(f"{out}.rank{rank}.err", "w") as f:
            json.dump({"key": key, "rank": rank, "error": message[:300]}, f)


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (for records and logs)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def consume_errors(out: str) -> dict[str, str]:
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

