"""Zig-zag sequence sharding for context parallelism (docs/design.md, "Zig-zag sharding").

A sequence of length L is cut into ``2*cp`` chunks of ``c = L / (2*cp)`` tokens; rank r of the CP group
holds chunks r and ``2*cp-1-r``, concatenated. Causal attention work is then balanced across ranks.
Inputs, labels (already shifted), loss weights and RoPE positions are all permuted the same way.
"""

from __future__ import annotations

from typing import Any

import torch

SEQUENCE_KEYS = ("input_ids", "labels", "loss_weights", "position_ids")
"""Batch entries of shape ``[B, L, ...]`` that are sharded along dim 1."""


def zigzag_indices(length: int, cp: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions held by ``rank``: chunk ``rank`` then chunk ``2*cp-1-rank``, ``[L / cp]`` int64.

    Raises:
        ValueError: if ``length`` is not divisible by ``2*cp`` or the rank is out of range.
    """
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is not in a context-parallel group of size {cp}")
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2 * cp.size = {2 * cp}; "
                         f"choose seq_len as a multiple of {2 * cp}")
    c = length // (2 * cp)
    ar = torch.arange(c, device=device)
    return torch.cat([rank * c + ar, (2 * cp - 1 - rank) * c + ar])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zig-zag shard of ``x`` along ``dim`` (a copy)."""
    if cp == 1:
        return x
    return x.index_select(dim, zigzag_indices(x.shape[dim], cp, rank, x.device))


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from the shards of all ranks (in rank order)."""
    cp = len(shards)
    n = shards[0].shape[dim]
    c = n // 2
    first = [s.narrow(dim, 0, c) for s in shards]
    second = [s.narrow(dim, c, c) for s in reversed(shards)]
    return torch.cat(first + second, dim=dim) if cp > 1 else shards[0]


def shard_batch(batch: dict[str, Any], cp: int, rank: int, keys: tuple[str, ...] = SEQUENCE_KEYS,
                add_positions: bool = True) -> dict[str, Any]:
    """Shard the sequence entries of a batch dict and add ``position_ids`` ``[L / cp]`` for RoPE.

    Entries not in ``keys`` (and non-tensors) pass through. If the batch has its own ``position_ids``
    ``[B, L]`` (e.g. positions restarting at document boundaries), they are sharded like the rest.

    Raises:
        ValueError: if the sequence length is not divisible by ``2*cp`` or entries disagree on it.
    """
    if "input_ids" not in batch:
        raise KeyError(f"a context-parallel batch needs 'input_ids'; got keys {sorted(batch)}")
    ids = batch["input_ids"]
    length = ids.shape[1]
    out = dict(batch)
    index = zigzag_indices(length, cp, rank, ids.device)
    for key in keys:
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            if value.dim() < 2 or value.shape[1] != length:
                raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}; expected [B, {length}, ...] like "
                                 f"input_ids")
            out[key] = value.index_select(1, index) if cp > 1 else value
    if add_positions and "position_ids" not in batch:
        out["position_ids"] = index
    return out
