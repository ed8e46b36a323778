"""Everything distributed: context parallelism on FSDP2 or DeepSpeed, and the strategy contract.

Strategies (Lightning), selectable in YAML by ``class_path`` or by registered name:

- :class:`ContextParallelStrategy` (``strategy: sh2_cp``): CP + FSDP2 over a named DeviceMesh.
- :class:`~sh2.strategies.deepspeed.ContextParallelDeepSpeedStrategy` (``strategy: sh2_cp_deepspeed``):
  CP + DeepSpeed ZeRO; imported lazily, needs the ``deepspeed`` package.

Both take their context-parallel settings as one :class:`CPConfig` (``cp: {size: 2, li_scheme: a2a, ...}``)
and implement :class:`~sh2.strategies.contract.StrategyContract`, through which the training module and the
datamodule use any strategy (:func:`~sh2.strategies.contract.strategy_contract`). The registered names
``sh2_cp`` and ``sh2_cp_deepspeed`` use ``cp: {size: auto}`` (all processes of a node share a sequence);
``sh2_deepspeed_stage_{1,2,3}`` are plain ZeRO data parallelism (CP = 1).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from sh2.strategies.context_parallel import ContextParallelMixin, ContextParallelStrategy
from sh2.strategies.contract import DataLayout, StrategyContract, strategy_contract
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig, CPSequenceOps
from sh2.strategies.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_context_parallel,
    context_parallel_loss,
    parallelize,
    remove_context_parallel,
)
from sh2.strategies.sharding import shard_batch, shard_sequence, unshard_sequence, zigzag_indices


def __getattr__(name: str) -> Any:
    if name == "ContextParallelDeepSpeedStrategy":
        from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy

        return ContextParallelDeepSpeedStrategy
    raise AttributeError(f"module 'sh2.strategies' has no attribute {name!r}")


def _cp_deepspeed(**kwargs: Any) -> Any:
    from sh2.strategies.deepspeed import ContextParallelDeepSpeedStrategy

    return ContextParallelDeepSpeedStrategy(**kwargs)


def register_strategies() -> None:
    """Register ``sh2_cp`` and ``sh2_cp_deepspeed`` with Lightning's StrategyRegistry (idempotent)."""
    if "sh2_cp" not in StrategyRegistry:
        StrategyRegistry.register("sh2_cp", ContextParallelStrategy,
                                  description="sh2 context parallelism + FSDP2", cp={"size": "auto"})
    if "sh2_cp_deepspeed" not in StrategyRegistry:
        StrategyRegistry.register("sh2_cp_deepspeed", _cp_deepspeed,
                                  description="sh2 context parallelism + DeepSpeed ZeRO-2", cp={"size": "auto"})
    for stage in (1, 2, 3):  # plain DeepSpeed ZeRO (no context parallelism): the switch of the GPU configs
        name = f"sh2_deepspeed_stage_{stage}"
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, _cp_deepspeed, description=f"DeepSpeed ZeRO-{stage} for sh2 (CP = 1)",
                                      cp={"size": 1}, stage=stage)


register_strategies()

__all__ = ["ContextParallelStrategy", "ContextParallelDeepSpeedStrategy", "ContextParallelMixin", "CPConfig",
           "CPGroup", "CPSequenceOps", "DataLayout", "StrategyContract", "apply_activation_checkpointing",
           "apply_compile", "apply_context_parallel", "context_parallel_loss", "parallelize",
           "register_strategies", "remove_context_parallel", "shard_batch", "shard_sequence", "strategy_contract",
           "unshard_sequence", "zigzag_indices"]
