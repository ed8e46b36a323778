"""The Lightning strategy for context parallelism on FSDP2: mesh, zig-zag batch sharding, loss, checkpoints."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig, check_sequence_length
from sh2.strategies.parallelize import (
    build_mesh,
    cp_group_of,
    mixed_precision_policy,
    parallelize,
)
from sh2.strategies.parallelize import context_parallel_loss as _cp_loss
from sh2.strategies.sharding import shard_batch

_SEQ_LEN_ATTRS = ("seq_len", "seq_length", "sequence_length")


class ContextParallelMixin:
    """What both CP strategies share: the CP group, batch sharding, loss reduction, data-parallel ranks.

    The host class sets ``_cp_size``, ``_cp_config`` and calls :meth:`_set_cp_group` once the processes
    are initialised.
    """

    _cp_size: int
    _cp_config: CPConfig
    _cpg: CPGroup | None = None
    _dp_rank: int = 0
    _dp_size: int = 1

    def _set_cp_group(self, cpg: CPGroup, dp_rank: int, dp_size: int) -> None:
        self._cpg, self._dp_rank, self._dp_size = cpg, dp_rank, dp_size

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
        """Check the sequence length against the CP size, then the base strategy's setup."""
        self._check_seq_len(trainer)
        super().setup(trainer)

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """Move the batch, then keep this rank's zig-zag shard of every sequence."""
        return self._shard_batch(super().batch_to_device(batch, device, dataloader_idx))

    def _check_seq_len(self, trainer: Any) -> None:
        """Fail at start when the datamodule's sequence length does not split into 2*cp chunks."""
        dm = getattr(trainer, "datamodule", None)
        for attr in _SEQ_LEN_ATTRS:
            length = getattr(dm, attr, None)
            if isinstance(length, int):
                check_sequence_length(length, self._cp_size)
                return

    @staticmethod
    def _per_rank_keys(checkpoint: dict[str, Any], trainer: Any) -> list[str]:
        keys = ["loops"]
        dm = getattr(trainer, "datamodule", None)
        if dm is not None:
            keys.append(type(dm).__qualname__)
        return [k for k in keys if k in checkpoint]


def _cp_config_from(li_scheme: str, fir_scheme: str, featurizer_scheme: str, attention_scheme: str,
                    a2a_pipeline_chunks: int, ring_attention_backend: str) -> CPConfig:
    return CPConfig(li_scheme=li_scheme, fir_scheme=fir_scheme, featurizer_scheme=featurizer_scheme,
                    attention_scheme=attention_scheme, a2a_pipeline_chunks=a2a_pipeline_chunks,
                    ring_attention_backend=ring_attention_backend)


class ContextParallelStrategy(ContextParallelMixin, ModelParallelStrategy):
    """Context parallelism plus FSDP2 for :class:`~sh2.models.model.SH2Model` (SPEC 3).

    Builds one DeviceMesh ``(dp_replicate, dp_shard, cp)`` over all ranks (CP innermost: neighbouring
    ranks share a sequence). The LightningModule stays CP-agnostic: it calls :meth:`parallelize_model`
    at the end of ``configure_model`` (CP operators on every mixer, then FSDP2 over dp x cp), batches are
    sharded in zig-zag order on their way to the device (with ``position_ids`` added for RoPE), and
    :meth:`reduce_loss` normalises the loss by the CP group's token count. The datamodule reads
    :attr:`data_parallel_rank` / :attr:`data_parallel_size`, so CP peers get the same samples.

    Args:
        context_parallel_size: ranks per sequence (``cp``); must divide the world size. ``"auto"``: all
            processes of a node.
        data_parallel_size: ``"auto"`` (world size / cp) or that number, as a check.
        data_parallel_replicate_size: HSDP replicas (parameters sharded within, replicated across);
            must divide the data-parallel size. 1 = plain FSDP over all dp x cp ranks.
        li_scheme: Hyena-LI: ``a2a`` (default), ``a2a_pipelined``, ``p2p_fft``.
        fir_scheme: Hyena-SE and -MR: ``p2p`` (default), ``p2p_overlap``, ``a2a``, ``a2a_pipelined``.
        featurizer_scheme: the featurizer: ``p2p`` (default) or ``p2p_overlap``.
        attention_scheme: MHA: ``a2a`` (Ulysses, default) or ``ring``.
        a2a_pipeline_chunks: channel slices of the ``a2a_pipelined`` schemes.
        ring_attention_backend: ``auto``, ``flash`` or ``math`` block kernel of ring attention.
        mixed_precision: FSDP2 parameter dtype for compute: ``None`` (keep the parameters' dtype), ``bf16``
            or ``fp16`` (gradients reduced in fp32; LI modal filters stay fp32). Use with
            ``trainer.precision: 32-true``.
        reshard_after_forward: FSDP2 frees gathered parameters after the forward (ZeRO-3 like); False
            keeps them until the backward (ZeRO-2 like, more memory, less communication).
        meta_init: the module builds the model on the meta device; it is materialised on the GPU after
            sharding and initialised with ``SH2Model.init_weights`` (needed for models that do not fit
            unsharded; weights differ from a non-meta init with the same seed).
        force_cp_ops: use the CP operators even with ``context_parallel_size=1`` (checks their code path).
        save_distributed_checkpoint: sharded checkpoint folder (one file per rank, plus every rank's data
            state) instead of one consolidated file.
        process_group_backend: ``nccl`` / ``gloo`` (default: by device).
        timeout: process-group timeout.
    """

    strategy_name = "sh2_cp"

    def __init__(self, context_parallel_size: int | str = 1, data_parallel_size: Literal["auto"] | int = "auto",
                 data_parallel_replicate_size: int = 1, li_scheme: str = "a2a", fir_scheme: str = "p2p",
                 featurizer_scheme: str = "p2p", attention_scheme: str = "a2a", a2a_pipeline_chunks: int = 2,
                 ring_attention_backend: str = "auto", mixed_precision: str | None = None,
                 reshard_after_forward: bool = True, meta_init: bool = False, force_cp_ops: bool = False,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if context_parallel_size != "auto" and (not isinstance(context_parallel_size, int)
                                                or context_parallel_size < 1):
            raise ValueError(f"context_parallel_size must be a positive integer or 'auto', got "
                             f"{context_parallel_size!r}")
        if not isinstance(data_parallel_replicate_size, int) or data_parallel_replicate_size < 1:
            raise ValueError(f"data_parallel_replicate_size must be a positive integer, got "
                             f"{data_parallel_replicate_size!r}")
        self._cp_size_arg = context_parallel_size
        self._cp_size = 1 if context_parallel_size == "auto" else context_parallel_size
        self._dp_replicate = data_parallel_replicate_size
        self._cp_config = _cp_config_from(li_scheme, fir_scheme, featurizer_scheme, attention_scheme,
                                          a2a_pipeline_chunks, ring_attention_backend)
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
    def supports_meta_init(self) -> bool:
        """Read by the module: build the model on the meta device (``meta_init``)."""
        return self._meta_init

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        if self._cp_size_arg == "auto":
            self._cp_size = self.num_processes
        world, cp = self.world_size, self._cp_size
        if world % cp:
            raise ValueError(f"the world size ({world} processes) is not divisible by context_parallel_size={cp}")
        dp = world // cp
        if self._data_parallel_size not in ("auto", dp):
            raise ValueError(f"data_parallel_size={self._data_parallel_size} but world size {world} / "
                             f"context_parallel_size {cp} = {dp}; use 'auto'")
        if dp % self._dp_replicate:
            raise ValueError(f"data_parallel_replicate_size={self._dp_replicate} does not divide the data-parallel "
                             f"size {dp} (= world size {world} / context_parallel_size {cp})")
        self._data_parallel_size = dp
        mesh = build_mesh(self.root_device.type, self._dp_replicate, dp // self._dp_replicate, cp)
        self._device_mesh = mesh
        self._set_cp_group(cp_group_of(mesh), mesh["dp"].get_local_rank(), dp)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = mesh
        rank_zero_info(f"sh2 context parallelism: world {world} = dp_replicate {self._dp_replicate} x dp_shard "
                       f"{dp // self._dp_replicate} x cp {cp}; {self._cp_config}")

    def parallelize_model(self, model: nn.Module) -> nn.Module:
        """Called by the module at the end of ``configure_model``: CP operators, then FSDP2 (idempotent)."""
        if getattr(model, "_sh2_parallelized", False):
            return model
        parallelize(model, self.device_mesh, self._cp_config, mp_policy=self._mp_policy,
                    reshard_after_forward=self._reshard_after_forward, force_cp_ops=self._force_cp_ops)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self.root_device)
            model.init_weights()
        model._sh2_parallelized = True
        return model

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        per_rank = {k: checkpoint[k] for k in self._per_rank_keys(checkpoint, self.lightning_module.trainer)}
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
