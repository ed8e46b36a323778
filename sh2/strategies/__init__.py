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


_DEEPSPEED = "sh2.strategies.deepspeed.ContextParallelDeepSpeedStrategy"

# name -> (class path, its arguments, description): the strategies a config may name instead of a class_path
STRATEGY_ALIASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "sh2_cp": ("sh2.strategies.ContextParallelStrategy", {"cp": {"size": "auto"}},
               "sh2 context parallelism + FSDP2"),
    "sh2_cp_deepspeed": (_DEEPSPEED, {"cp": {"size": "auto"}}, "sh2 context parallelism + DeepSpeed ZeRO-2"),
    # plain DeepSpeed ZeRO (no context parallelism): the switch of the GPU configs
    **{f"sh2_deepspeed_stage_{stage}": (_DEEPSPEED, {"cp": {"size": 1}, "stage": stage},
                                        f"DeepSpeed ZeRO-{stage} for sh2 (CP = 1)") for stage in (1, 2, 3)},
}


def register_strategies() -> None:
    """Register the names of :data:`STRATEGY_ALIASES` with Lightning's StrategyRegistry (idempotent)."""
    for name, (class_path, kwargs, description) in STRATEGY_ALIASES.items():
        if name not in StrategyRegistry:
            cls = ContextParallelStrategy if class_path.endswith(".ContextParallelStrategy") else _cp_deepspeed
            StrategyRegistry.register(name, cls, description=description, **kwargs)


register_strategies()

__all__ = ["ContextParallelStrategy", "ContextParallelDeepSpeedStrategy", "ContextParallelMixin", "CPConfig",
           "CPGroup", "CPSequenceOps", "DataLayout", "StrategyContract", "apply_activation_checkpointing",
           "apply_compile", "apply_context_parallel", "context_parallel_loss", "parallelize",
           "register_strategies", "remove_context_parallel", "STRATEGY_ALIASES", "shard_batch", "shard_sequence",
           "strategy_contract", "unshard_sequence", "zigzag_indices"]
