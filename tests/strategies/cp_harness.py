"""Spawn helpers for the context-parallel tests: N gloo processes on CPU, failures re-raised in pytest."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, env: bool, args: tuple) -> None:
    torch.set_num_threads(1)
    if env:  # Lightning reads these (LightningEnvironment: processes created externally)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                          RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size))
        fn(rank, world_size, *args)
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, lightning_env: bool = False) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Without ``lightning_env`` a gloo process group is initialised around the call; with it, only the
    environment variables a launcher would set are exported (Lightning initialises the group itself).
    """
    mp.spawn(_entry, args=(fn, world_size, free_port(), lightning_env, args), nprocs=world_size, join=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def gather_seq(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-gather zig-zag shards ``[B, 2c, ...]`` of a CP group and undo the permutation."""
    from sh2.strategies.sharding import unshard_sequence

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard_sequence(parts, dim=1)
