"""The Lightning strategy for context parallelism on FSDP2: mesh, zig-zag batch sharding, loss, checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from sh2.strategies.contract import DataLayout, StrategyContract, clip_grad_norm
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig, check_sequence_length, refuse_moved_strategy_keys
from sh2.strategies.parallelize import (
    build_mesh,
    cp_group_of,
    mixed_precision_policy,
    parallelize,
)
from sh2.strategies.parallelize import context_parallel_loss as _cp_loss
from sh2.strategies.sharding import shard_batch


class ContextParallelMixin(StrategyContract):
    """What both CP strategies share: the CP config and group, batch sharding, loss reduction, the
    data-parallel coordinate and the data layout they are told.

    The host strategy calls :meth:`_init_cp` in its ``__init__``, :meth:`_resolve_cp_size` once the
    processes are known and :meth:`_set_cp_group` once they are initialised.
    """

    _cp: CPConfig
    _cp_size: int = 1
    _cpg: CPGroup | None = None
    _dp_rank: int = 0
    _dp_size: int = 1
    _data_layout: DataLayout | None = None

    def _init_cp(self, cp: CPConfig | Mapping[str, Any] | None, moved: Mapping[str, Any]) -> None:
        refuse_moved_strategy_keys(moved)
        self._cp = CPConfig.of(cp)
        self._cp_size = 1 if self._cp.size == "auto" else self._cp.size

    def _resolve_cp_size(self, world_size: int, processes_per_node: int) -> int:
        """The CP size for this run (``"auto"``: the processes of a node); it must divide the world size."""
        cp = processes_per_node if self._cp.size == "auto" else self._cp.size
        if world_size % cp:
            raise ValueError(f"the world size ({world_size} processes) is not divisible by cp.size={cp}; choose "
                             f"a cp.size that divides it")
        self._cp_size = cp
        return cp

    def _set_cp_group(self, cpg: CPGroup, dp_rank: int, dp_size: int) -> None:
        self._cpg, self._dp_rank, self._dp_size = cpg, dp_rank, dp_size

    @property
    def cp_config(self) -> CPConfig:
        """The context-parallel settings (``cp`` argument)."""
        return self._cp

    @property
    def context_parallel_size(self) -> int:
        """Ranks that share one sequence."""
        return self._cp_size

    @property
    def context_parallel_rank(self) -> int:
        """This rank's place in its CP group (its zig-zag shard index)."""
        return self._cpg.rank if self._cpg is not None else 0

    @property
    def data_parallel_rank(self) -> int:
        """Data-parallel coordinate: CP peers share it and therefore read the same samples."""
        return self._dp_rank

    @property
    def data_parallel_size(self) -> int:
        """Number of distinct data streams (world size / context_parallel_size)."""
        return self._dp_size

    @property
    def cp_group(self) -> CPGroup | None:
        return self._cpg

    def set_data_layout(self, layout: DataLayout) -> None:
        """Remember the data layout: the sequence length is checked against the CP size in :meth:`setup`."""
        self._data_layout = layout

    def reduce_loss(self, loss_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        """Loss normalised by the CP group's token weight, with gradients equal to CP = 1 after FSDP averaging.

        See :func:`~sh2.strategies.parallelize.context_parallel_loss`.
        """
        return _cp_loss(loss_sum, weight_sum, self._cpg if self._cp_size > 1 else None)

    def _shard_batch(self, batch: Any) -> Any:
        if self._cp_size == 1 or not isinstance(batch, dict) or "input_ids" not in batch:
            return batch
        return shard_batch(batch, self._cp_size, self.context_parallel_rank)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Samplers split by the data-parallel rank only: the ranks of a CP group read the same samples."""
        return {"num_replicas": self._dp_size, "rank": self._dp_rank}

    def setup(self, trainer: Any) -> None:
        """Check the data's sequence length against the CP size, then the base strategy's setup."""
        if self._data_layout is not None:
            check_sequence_length(self._data_layout.seq_len, self._cp_size)
        super().setup(trainer)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """Move the batch, then keep this rank's zig-zag shard of every sequence."""
        return self._shard_batch(super().batch_to_device(batch, device, dataloader_idx))

    def _per_rank_keys(self, checkpoint: dict[str, Any]) -> list[str]:
        """Checkpoint entries that differ between ranks: the loops' progress and the data stream position."""
        keys = ["loops", *(self._data_layout.per_rank_state_keys if self._data_layout is not None else ())]
        return [k for k in keys if k in checkpoint]


class ContextParallelStrategy(ContextParallelMixin, ModelParallelStrategy):
    """Context parallelism plus FSDP2 for :class:`~sh2.models.model.SH2Model`.

    Builds one DeviceMesh ``(dp_replicate, dp_shard, cp)`` over all ranks (CP innermost: neighbouring
    ranks share a sequence). The LightningModule stays CP-agnostic: it calls :meth:`parallelize_model`
    at the end of ``configure_model`` (CP operators on every mixer, then FSDP2 over dp x cp), batches are
    sharded in zig-zag order on their way to the device (with ``position_ids`` added for RoPE), and
    :meth:`reduce_loss` normalises the loss by the CP group's token count. The datamodule reads
    :attr:`data_parallel_rank` / :attr:`data_parallel_size`, so CP peers get the same samples.

    Args:
        cp: the context-parallel settings (a :class:`~sh2.strategies.cp_ops.CPConfig` or a mapping of its
            fields, ``cp: {size: 2, li_scheme: a2a, ...}`` in YAML): the CP size (must divide the world
            size; ``"auto"``: all processes of a node) and the scheme of every operator type.
        data_parallel_size: ``"auto"`` (world size / cp) or that number, as a check.
        data_parallel_replicate_size: HSDP replicas (parameters sharded within, replicated across);
            must divide the data-parallel size. 1 = plain FSDP over all dp x cp ranks.
        mixed_precision: FSDP2 parameter dtype for compute: ``None`` (keep the parameters' dtype), ``bf16``
            or ``fp16`` (gradients reduced in fp32; LI modal filters stay fp32). Use with
            ``trainer.precision: 32-true``, or ``bf16-mixed`` when blocks are compiled and checkpointed: only
            under autocast can a compiled Hyena-LI block keep fp32 filters without a graph break (see
            ``sh2.strategies.parallelize.apply_fsdp``).
        reshard_after_forward: FSDP2 frees gathered parameters after the forward (ZeRO-3 like); False
            keeps them until the backward (ZeRO-2 like, more memory, less communication).
        meta_init: the module builds the model on the meta device; it is materialised on the GPU after
            sharding and initialised with ``SH2Model.init_weights`` (needed for models that do not fit
            unsharded; weights differ from a non-meta init with the same seed).
        force_cp_ops: use the CP operators even with ``cp.size`` 1 (checks their code path).
        save_distributed_checkpoint: sharded checkpoint folder (one file per rank, plus every rank's data
            state) instead of one consolidated file.
        process_group_backend: ``nccl`` / ``gloo`` (default: by device).
        timeout: process-group timeout.

    Raises:
        ValueError: for an argument that moved into ``cp`` (``context_parallel_size``, ``li_scheme``, ...),
            naming the new key.
    """

    strategy_name = "sh2_cp"

    def __init__(self, cp: CPConfig | dict[str, Any] | None = None, data_parallel_size: Literal["auto"] | int = "auto",
                 data_parallel_replicate_size: int = 1, mixed_precision: str | None = None,
                 reshard_after_forward: bool = True, meta_init: bool = False, force_cp_ops: bool = False,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, **moved: Any) -> None:
        self._init_cp(cp, moved)
        if moved:
            raise TypeError(f"ContextParallelStrategy got an unexpected keyword argument {next(iter(moved))!r}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if not isinstance(data_parallel_replicate_size, int) or data_parallel_replicate_size < 1:
            raise ValueError(f"data_parallel_replicate_size must be a positive integer, got "
                             f"{data_parallel_replicate_size!r}")
        self._dp_replicate = data_parallel_replicate_size
        self._mp_policy = mixed_precision_policy(mixed_precision)
        self._mixed_precision = mixed_precision
        self._reshard_after_forward = reshard_after_forward
        self._meta_init = meta_init
        self._force_cp_ops = force_cp_ops

    @property
    def mixed_precision(self) -> str | None:
        """FSDP2's parameter dtype for compute (``"bf16"``) or None (the parameters' own dtype)."""
        return self._mixed_precision

    @property
    def meta_init(self) -> bool:
        """The module builds the model on the meta device (``meta_init``)."""
        return self._meta_init

    @property
    def builds_partitioned_model(self) -> bool:
        """FSDP2 shards the model after it is built whole (or on the meta device), never during the build."""
        return False

    def gathered_parameters(self, module: nn.Module) -> AbstractContextManager:
        """A no-op: the module initialises its parameters before :meth:`parallelize_model` shards them."""
        return nullcontext()

    @property
    def shards_parameters(self) -> bool:
        """FSDP2 shards parameters, gradients and optimizer states over the dp x cp ranks."""
        return True

    def clip_gradients(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
        """Clip the global norm of the sharded gradients; every rank returns the whole norm."""
        return clip_grad_norm(parameters, max_norm)

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        world = self.world_size
        cp = self._resolve_cp_size(world, self.num_processes)
        dp = world // cp
        if self._data_parallel_size not in ("auto", dp):
            raise ValueError(f"data_parallel_size={self._data_parallel_size} but world size {world} / "
                             f"cp.size {cp} = {dp}; use 'auto'")
        if dp % self._dp_replicate:
            raise ValueError(f"data_parallel_replicate_size={self._dp_replicate} does not divide the data-parallel "
                             f"size {dp} (= world size {world} / cp.size {cp})")
        self._data_parallel_size = dp
        mesh = build_mesh(self.root_device.type, self._dp_replicate, dp // self._dp_replicate, cp)
        self._device_mesh = mesh
        self._set_cp_group(cp_group_of(mesh), mesh["dp"].get_local_rank(), dp)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = mesh
        rank_zero_info(f"sh2 context parallelism: world {world} = dp_replicate {self._dp_replicate} x dp_shard "
                       f"{dp // self._dp_replicate} x cp {cp}; {self._cp}")

    def parallelize_model(self, model: nn.Module) -> nn.Module:
        """Called by the module at the end of ``configure_model``: CP operators, then FSDP2; a model built on
        the meta device is then materialised on this rank's device and initialised. Idempotent: every step
        checks the state it creates."""
        autocast = str(getattr(self.precision_plugin, "precision", "")).endswith("-mixed")
        parallelize(model, self.device_mesh, self._cp, mp_policy=self._mp_policy,
                    reshard_after_forward=self._reshard_after_forward, force_cp_ops=self._force_cp_ops,
                    autocast=autocast)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self.root_device)
            model.init_weights()
        return model

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        per_rank = {k: checkpoint[k] for k in self._per_rank_keys(checkpoint)}
        super().save_checkpoint(checkpoint, filepath, storage_options)
        if self._save_distributed_checkpoint:
            path = Path(self.broadcast(filepath))
            torch.save(per_rank, path / f"data_state_rank{self.global_rank}.pt")
            self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(checkpoint_path)) / f"data_state_rank{self.global_rank}.pt"
        if path.is_file():
            checkpoint.update(torch.load(path, map_location="cpu", weights_only=False))
        elif Path(checkpoint_path).is_dir():
            rank_zero_warn(f"{path.name} not found in the checkpoint: data state of rank 0 is used on every rank "
                           f"(was the checkpoint saved with another world size?)")
        return checkpoint
