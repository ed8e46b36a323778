"""Context parallelism on DeepSpeed ZeRO (stages 1-3) instead of FSDP2; CUDA only.

The ``deepspeed`` package is imported only when this strategy is instantiated, so sh2 works without it
and selecting the strategy without it fails with an install hint.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from sh2.strategies.context_parallel import ContextParallelMixin
from sh2.strategies.cp_ops import CPConfig
from sh2.strategies.parallelize import apply_context_parallel, cp_group_of


def require_deepspeed() -> None:
    """Raise an ImportError with an install hint when the ``deepspeed`` package is missing."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError("ContextParallelDeepSpeedStrategy (strategy 'sh2_cp_deepspeed') needs the deepspeed "
                          "package: pip install 'sh2[deepspeed]' (or pip install deepspeed), or use the FSDP2 "
                          "strategy 'sh2_cp' (ContextParallelStrategy).") from err


class ContextParallelDeepSpeedStrategy(ContextParallelMixin, DeepSpeedStrategy):
    """Context parallelism with DeepSpeed ZeRO over the data-parallel x context-parallel ranks.

    DeepSpeed's data-parallel group is the whole world: it averages gradients over dp x cp ranks, which
    the CP loss reduction (:meth:`reduce_loss`, a factor cp on the local loss) turns into the gradient of
    the whole sequences. CP groups are neighbouring ranks (``cp`` innermost), built from a 2-D DeviceMesh
    ``(dp, cp)``. Batches are sharded in zig-zag order, the CP operators are set on every mixer in
    :meth:`parallelize_model` (no FSDP), and ZeRO-3 is told about the parameters that mixers read from
    their filter submodules (and the tied embedding the LM head reads), which would otherwise stay
    partitioned outside their module's forward.

    Args:
        cp: the context-parallel settings, as for :class:`~sh2.strategies.ContextParallelStrategy`
            (``cp: {size: 2, li_scheme: a2a, ...}``; ``size: auto``: all processes of a node).
        stage: ZeRO stage 1, 2 or 3.
        force_cp_ops: use the CP operators even with ``cp.size`` 1.
        **kwargs: any other argument of Lightning's ``DeepSpeedStrategy`` (offload, buckets, config, ...).

    Raises:
        ValueError: for an argument that moved into ``cp`` (``context_parallel_size``, ``li_scheme``, ...),
            naming the new key.
    """

    strategy_name = "sh2_cp_deepspeed"

    def __init__(self, cp: CPConfig | dict[str, Any] | None = None, stage: int = 2, force_cp_ops: bool = False,
                 **kwargs: Any) -> None:
        require_deepspeed()
        self._init_cp(cp, kwargs)
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3 (ZeRO stage), got {stage!r}")
        super().__init__(stage=stage, **kwargs)
        self._force_cp_ops = force_cp_ops
        self._zero_stage = stage

    @property
    def meta_init(self) -> bool:
        """Never: DeepSpeed builds the model itself (partitioned under ZeRO-3, whole otherwise)."""
        return False

    @property
    def builds_partitioned_model(self) -> bool:
        """ZeRO-3 (by argument or by a passed DeepSpeed config): ``configure_model`` runs under
        ``deepspeed.zero.Init`` and the parameters are partitioned placeholders until gathered."""
        return bool(self.zero_stage_3)

    def gathered_parameters(self, module: nn.Module) -> AbstractContextManager:
        """A context in which ``module``'s parameters are whole; rank 0's values are kept on exit.

        With ZeRO-3 the model is built partitioned, so sh2's initialisation and ``init_from`` write into
        gathered parameters, one :meth:`SH2Model.init_units` unit at a time
        (``SH2LightningModule.configure_model``). Without ZeRO-3: a no-op.
        """
        if not self.builds_partitioned_model:
            return nullcontext()
        from deepspeed.runtime.zero import GatheredParameters

        return GatheredParameters(list(module.parameters()), modifier_rank=0)

    @property
    def shards_parameters(self) -> bool:
        """ZeRO shards optimizer states (stage 1), gradients (2) and parameters (3) over all ranks."""
        return True

    @property
    def mixed_precision(self) -> str | None:
        """``"bf16"`` under a bf16 trainer precision (DeepSpeed keeps fp32 master weights), else None."""
        return "bf16" if "bf16" in str(self.precision_plugin.precision) else None

    def clip_gradients(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
        """None: DeepSpeed clips inside its engine (``gradient_clipping`` in its config)."""
        return None

    @override
    def _auto_select_batch_size(self) -> int:
        """DeepSpeed's (logging-only) micro-batch size for ``logging_batch_size_per_gpu="auto"``.

        Lightning reads ``train_dataloader.batch_sampler.batch_size``, which sh2's streaming loaders do not
        have (``batch_sampler`` is None: batches come whole from the iterable dataset); the micro-batch is the
        one of the data layout the datamodule told the strategy, else Lightning's rule.
        """
        if self._data_layout is not None:
            return self._data_layout.micro_batch_size
        return super()._auto_select_batch_size()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        world = self.world_size
        cp = self._resolve_cp_size(world, self.num_processes)
        mesh = init_device_mesh(self.root_device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
        self._set_cp_group(cp_group_of(mesh), mesh["dp"].get_local_rank(), world // cp)
        stage = (self.config.get("zero_optimization") or {}).get("stage", self._zero_stage)
        rank_zero_info(f"sh2 context parallelism on DeepSpeed ZeRO-{stage}: world {world} = dp "
                       f"{world // cp} x cp {cp}; {self._cp}")

    def parallelize_model(self, model: nn.Module) -> nn.Module:
        """Set the CP operators (no parameter sharding here: ZeRO does it in ``setup``); idempotent."""
        if self._cpg is not None and (self._cp_size > 1 or self._force_cp_ops):
            apply_context_parallel(model, self._cpg, self._cp)
        if self.builds_partitioned_model:
            from deepspeed.runtime.zero import register_external_parameter

            for block in model.blocks:
                filt = getattr(block.mixer, "filter", None)
                if filt is not None:
                    for p in filt.parameters():
                        register_external_parameter(block.mixer, p)
            # SH2Model.head reads the LM-head matrix (tied: the embedding) without calling that module
            head = model.embedding if model.lm_head is None else model.lm_head
            register_external_parameter(model, head.weight)
        return model

