"""Context parallelism on DeepSpeed ZeRO (stages 1-3) instead of FSDP2; CUDA only.

The ``deepspeed`` package is imported only when this strategy is instantiated, so sh2 works without it
and selecting the strategy without it fails with an install hint.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from sh2.strategies.context_parallel import ContextParallelMixin, _cp_config_from
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
        context_parallel_size: ranks per sequence (``"auto"``: all processes of a node).
        stage: ZeRO stage 1, 2 or 3.
        li_scheme, fir_scheme, featurizer_scheme, attention_scheme, a2a_pipeline_chunks,
            ring_attention_backend: as for :class:`~sh2.strategies.ContextParallelStrategy`.
        force_cp_ops: use the CP operators even with ``context_parallel_size=1``.
        **kwargs: any other argument of Lightning's ``DeepSpeedStrategy`` (offload, buckets, config, ...).
    """

    strategy_name = "sh2_cp_deepspeed"

    def __init__(self, context_parallel_size: int | str = 1, stage: int = 2, li_scheme: str = "a2a",
                 fir_scheme: str = "p2p", featurizer_scheme: str = "p2p", attention_scheme: str = "a2a",
                 a2a_pipeline_chunks: int = 2, ring_attention_backend: str = "auto", force_cp_ops: bool = False,
                 **kwargs: Any) -> None:
        require_deepspeed()
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3 (ZeRO stage), got {stage!r}")
        if context_parallel_size != "auto" and (not isinstance(context_parallel_size, int)
                                                or context_parallel_size < 1):
            raise ValueError(f"context_parallel_size must be a positive integer or 'auto', got "
                             f"{context_parallel_size!r}")
        super().__init__(stage=stage, **kwargs)
        self._cp_size_arg = context_parallel_size
        self._cp_size = 1 if context_parallel_size == "auto" else context_parallel_size
        self._cp_config = _cp_config_from(li_scheme, fir_scheme, featurizer_scheme, attention_scheme,
                                          a2a_pipeline_chunks, ring_attention_backend)
        self._force_cp_ops = force_cp_ops
        self._zero_stage = stage

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

    @override
    def _auto_select_batch_size(self) -> int:
        """DeepSpeed's (logging-only) micro-batch size for ``logging_batch_size_per_gpu="auto"``.

        Lightning reads ``train_dataloader.batch_sampler.batch_size``, which sh2's streaming loaders do not
        have (``batch_sampler`` is None: batches come whole from the iterable dataset); the micro-batch is the
        datamodule's ``batch_size``.
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        return int(batch_size) if isinstance(batch_size, int) and batch_size > 0 else 1

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        world = self.world_size
        cp = self.num_processes if self._cp_size_arg == "auto" else self._cp_size
        if world % cp:
            raise ValueError(f"the world size ({world} processes) is not divisible by context_parallel_size={cp}")
        self._cp_size = cp
        mesh = init_device_mesh(self.root_device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
        self._set_cp_group(cp_group_of(mesh), mesh["dp"].get_local_rank(), world // cp)
        stage = (self.config.get("zero_optimization") or {}).get("stage", self._zero_stage)
        rank_zero_info(f"sh2 context parallelism on DeepSpeed ZeRO-{stage}: world {world} = dp "
                       f"{world // cp} x cp {cp}; {self._cp_config}")

    def parallelize_model(self, model: nn.Module) -> nn.Module:
        """Set the CP operators (no parameter sharding here: ZeRO does it in ``setup``)."""
        if self._cpg is not None and (self._cp_size > 1 or self._force_cp_ops):
            apply_context_parallel(model, self._cpg, self._cp_config)
        if self.builds_partitioned_model:
            from deepspeed.runtime.zero import register_external_parameter

            for block in model.blocks:
                filt = getattr(block.mixer, "filter", None)
                if filt is not None:
                    for p in filt.parameters():
                        register_external_parameter(block.mixer, p)
            # SH2Model.head reads the LM-head matrix (tied: the embedding) without calling that module
            head = model.embedding if getattr(model, "lm_head", None) is None else model.lm_head
            register_external_parameter(model, head.weight)
        return model

