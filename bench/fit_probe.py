"""Measure ``sh2 fit`` runs from outside: tokens/s, MFU and peak memory, the same way for every configuration.

Add the callback on the command line of any fit, then tabulate the JSON records of several runs::

    python -m sh2 fit --config configs/evo2_1b_8k.yaml --trainer.max_steps 30 \\
        --trainer.callbacks+='{"class_path": "bench.fit_probe.FitProbe",
                               "init_args": {"out": "OUT/fit_1b.json", "name": "1b", "skip_steps": 10}}'
    python bench/fit_probe.py OUT/fit_*.json          # one markdown table

The probe starts its clock when ``skip_steps`` optimizer steps are done (compilation, autotuning and the
allocator's warm-up happen in those) and stops it when training ends, synchronising the device at both ends
only, so it does not slow the steps it times. Tokens are counted from the batches every rank trains on (a
context-parallel rank holds its shard of each sequence) and summed over ranks. MFU = tokens/s x analytic
training FLOPs per token (``sh2.training.flops.model_flops_per_token`` at the data's sequence length) / (the
bf16 matmul peak measured by this process when training starts x number of GPUs). Peak memory is the largest
``torch.cuda.max_memory_allocated`` over ranks during training. The module's own figures (``perf/*`` metrics,
where it logs them) are recorded beside for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from bench.common import fmt, matmul_peak_tflops, print_table, run_info, sync, write_json
from sh2.training.flops import model_flops_per_token


def _seq_len(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """The full training sequence length (before any context-parallel sharding)."""
    for owner in (getattr(trainer, "datamodule", None), getattr(pl_module, "hparams", None)):
        value = getattr(owner, "seq_len", None)
        if isinstance(value, int) and value > 0:
            return value
    raise RuntimeError("FitProbe: neither the datamodule nor the module has an integer seq_len")


def _reduce(value: float, op: Any, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t)


class FitProbe(L.Callback):
    """Tokens/s, MFU and peak memory of the steps after ``skip_steps``; a JSON record and one log line.

    Args:
        out: JSON file for the record (written by rank 0); none: only the log line.
        name: the run's name in the record and the table.
        skip_steps: optimizer steps left untimed at the start.
    """

    def __init__(self, out: str | None = None, name: str = "fit", skip_steps: int = 5) -> None:
        self.out, self.name, self.skip_steps = out, name, skip_steps
        self._t0: float | None = None
        self._step0 = 0
        self._tokens = 0
        self._peak_tflops: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            self._peak_tflops = matmul_peak_tflops(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        self._t0, self._tokens = None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is not None:
            ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
            self._tokens += int(ids.numel())
        elif trainer.global_step >= self.skip_steps:
            sync(pl_module.device)
            self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        sync(device)
        record: dict[str, Any] = {"name": self.name, **run_info(device), "world_size": trainer.world_size,
                                  "strategy": type(trainer.strategy).__name__,
                                  "context_parallel_size": getattr(trainer.strategy, "context_parallel_size", 1),
                                  "precision": str(trainer.precision), "skip_steps": self.skip_steps}
        hp = dict(getattr(pl_module, "hparams", {}) or {})
        for key in ("preset", "overrides", "compile", "activation_checkpointing"):
            if key in hp:
                record[key] = hp[key]
        dm = getattr(trainer, "datamodule", None)
        record["batch_size"] = getattr(dm, "batch_size", None)
        seq_len = _seq_len(trainer, pl_module)
        record["seq_len"] = seq_len
        config = getattr(pl_module, "config", None)
        if config is not None and hasattr(config, "li_algorithm"):
            record["li_algorithm"] = config.li_algorithm
        started = self._t0 is not None
        seconds = time.perf_counter() - self._t0 if started else 0.0
        tokens = _reduce(float(self._tokens), dist.ReduceOp.SUM, device)
        seconds = _reduce(seconds, dist.ReduceOp.MAX, device)
        record.update(steps_timed=trainer.global_step - self._step0 if started else 0, tokens=int(tokens),
                      seconds=seconds)
        if not started or tokens == 0 or seconds <= 0:
            record["status"] = f"nothing timed: max_steps must exceed skip_steps={self.skip_steps}"
        else:
            tps = tokens / seconds
            record.update(status="ok", tokens_per_s=tps)
            if config is not None:
                record["flops_per_token"] = model_flops_per_token(config, seq_len)
            if self._peak_tflops and "flops_per_token" in record:
                record["matmul_bf16_TFLOPs"] = self._peak_tflops
                record["mfu"] = tps * record["flops_per_token"] / (self._peak_tflops * 1e12 * trainer.world_size)
        if device.type == "cuda":
            record["peak_mem_gib"] = _reduce(torch.cuda.max_memory_allocated(device) / 2**30, dist.ReduceOp.MAX,
                                             device)
        record["module_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                    if k.startswith("perf/") or "mfu" in k.lower() or "per_sec" in k.lower()}
        if trainer.is_global_zero:
            write_json(self.out, record)
            print(f"[bench] {self.name}: {status_line(record)}", flush=True)


def status_line(r: dict[str, Any]) -> str:
    """One line of a record: throughput, MFU, memory, or why there is none."""
    if r.get("status") != "ok":
        return str(r.get("status"))
    mfu = f", MFU {r['mfu']:.1%} (bf16 peak {r['matmul_bf16_TFLOPs']:.0f} TFLOP/s)" if "mfu" in r else ""
    mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    return (f"{r['tokens_per_s']:,.0f} tokens/s over {r['world_size']} device(s){mfu}{mem}; {r['steps_timed']} steps "
            f"timed after {r['skip_steps']}")


FIT_HEADER = ["run", "strategy", "GPUs", "CP", "L", "micro-batch", "compile", "act. ckpt", "LI", "tokens/s", "MFU",
              "peak GiB", "steps timed", "module tokens/s", "module MFU", "status"]


def read_records(paths: list[str]) -> list[dict[str, Any]]:
    """The FitProbe records of ``paths`` that can be read (the others are named on stderr)."""
    records = []
    for path in paths:
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, ValueError) as err:
            print(f"{path}: {err}", file=sys.stderr)
    return records


def fit_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Table cells (``FIT_HEADER``) of FitProbe records."""
    rows = []
    for r in records:
        mm = r.get("module_metrics", {})
        rows.append([str(r.get("name")), str(r.get("strategy")), fmt(r.get("world_size")),
                     fmt(r.get("context_parallel_size")), fmt(r.get("seq_len")), fmt(r.get("batch_size")),
                     fmt(r.get("compile")), fmt(r.get("activation_checkpointing")), fmt(r.get("li_algorithm")),
                     fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("mfu"), ".1%"), fmt(r.get("peak_mem_gib"), ".1f"),
                     fmt(r.get("steps_timed")), fmt(mm.get("perf/tokens_per_s"), ",.0f"),
                     fmt(mm.get("perf/mfu"), ".1%"), str(r.get("status"))])
    return rows


def table(paths: list[str]) -> int:
    """Print one markdown table of the records in ``paths``; 1 if none could be read."""
    records = read_records(paths)
    if not records:
        return 1
    print_table(f"sh2 fit runs ({records[0].get('device')}, {records[0].get('date')})", FIT_HEADER, fit_rows(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", help="JSON records written by FitProbe")
    return table(p.parse_args(argv).records)


if __name__ == "__main__":
    sys.exit(main())
