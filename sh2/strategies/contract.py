"""What sh2's LightningModule, datamodule and callbacks need from a strategy, for every Lightning strategy.

The training module, the datamodule and the reporting callbacks talk to the strategy only through
:class:`StrategyContract`:

- the module asks how to build the model (on the meta device? partitioned, as under ZeRO-3?), hands the
  built model over to be parallelized, and reduces the loss and clips gradients through it;
- the datamodule tells the strategy its :class:`DataLayout` and asks for its data-parallel coordinate;
- the callbacks read the parallel sizes, the parameter sharding and the compute precision.

sh2's context-parallel strategies implement the contract; any other Lightning strategy (single device, DDP,
``"auto"``, Lightning's own FSDP or DeepSpeed) gets a :class:`LightningStrategyAdapter` from
:func:`strategy_contract`. Information flows one way: the strategy never reads the datamodule or the module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ParallelStrategy, Strategy
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class DataLayout:
    """What the data looks like, as the datamodule tells the strategy.

    Attributes:
        seq_len: tokens per training sequence (context parallelism splits it into ``2 * cp`` chunks).
        micro_batch_size: sequences per batch and data-parallel rank.
        per_rank_state_keys: checkpoint entries that differ between ranks (the datamodule's stream
            position): a strategy that writes one checkpoint for all ranks saves them once per rank.
    """

    seq_len: int
    micro_batch_size: int
    per_rank_state_keys: tuple[str, ...] = ()


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global 2-norm to ``max_norm`` (``inf``: measure only) and return the norm.

    Sharded gradients (FSDP2 DTensors) give a sharded norm; it is made whole so every rank logs the same value.
    """
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class StrategyContract(ABC):
    """The strategy as the training module, the datamodule and the callbacks see it."""

    # ----------------------------------------------------------------- model construction
    @property
    @abstractmethod
    def meta_init(self) -> bool:
        """Build the model on the meta device; :meth:`parallelize_model` materialises and initialises it."""

    @property
    @abstractmethod
    def builds_partitioned_model(self) -> bool:
        """The model is built with partitioned parameters (ZeRO-3): initialise it inside
        :meth:`gathered_parameters`, one ``SH2Model.init_units()`` unit at a time."""

    @abstractmethod
    def gathered_parameters(self, module: nn.Module) -> AbstractContextManager:
        """A context in which ``module``'s parameters are whole; rank 0's values are kept on exit."""

    @abstractmethod
    def parallelize_model(self, model: nn.Module) -> nn.Module:
        """Apply the strategy's parallelism to the built model, in place (idempotent); return it."""

    # ----------------------------------------------------------------- training step
    @abstractmethod
    def reduce_loss(self, loss_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        """The token-weighted loss of this rank's share of the batch (``loss_sum / weight_sum``, over the
        whole sequence under context parallelism)."""

    @abstractmethod
    def clip_gradients(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
        """Clip the gradients' global norm to ``max_norm`` and return the norm; None when the strategy's
        engine clips by itself (DeepSpeed: ``gradient_clipping`` in its config)."""

    # ----------------------------------------------------------------- parallel layout
    @property
    @abstractmethod
    def context_parallel_size(self) -> int:
        """Ranks that share one sequence."""

    @property
    @abstractmethod
    def data_parallel_rank(self) -> int:
        """This rank's data stream; context-parallel peers share it and read the same samples."""

    @property
    @abstractmethod
    def data_parallel_size(self) -> int:
        """Number of distinct data streams."""

    @property
    @abstractmethod
    def shards_parameters(self) -> bool:
        """Parameters, gradients and optimizer states are sharded over the ranks (FSDP2, ZeRO)."""

    @property
    @abstractmethod
    def mixed_precision(self) -> str | None:
        """The compute dtype of sharded parameters (``"bf16"``, ``"fp16"``) or None (the parameters' own)."""

    # ----------------------------------------------------------------- data
    @abstractmethod
    def set_data_layout(self, layout: DataLayout) -> None:
        """Told by the datamodule in its ``setup``, before the model is built."""


class LightningStrategyAdapter(StrategyContract):
    """The contract for a strategy that is not sh2's: no meta or partitioned build, no parallelization of
    the model, the plain weighted loss, and the data-parallel coordinate of Lightning's distributed sampler.

    Args:
        strategy: the trainer's strategy, or None for a module used without a trainer.
    """

    def __init__(self, strategy: Strategy | None) -> None:
        self.strategy = strategy

    @property
    def meta_init(self) -> bool:
        return False

    @property
    def builds_partitioned_model(self) -> bool:
        return False

    def gathered_parameters(self, module: nn.Module) -> AbstractContextManager:
        return nullcontext()

    def parallelize_model(self, model: nn.Module) -> nn.Module:
        return model

    def reduce_loss(self, loss_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum / weight_sum.clamp_min(1.0)

    def clip_gradients(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
        if isinstance(self.strategy, DeepSpeedStrategy):
            return None
        return clip_grad_norm(parameters, max_norm)

    @property
    def context_parallel_size(self) -> int:
        return 1

    @property
    def data_parallel_rank(self) -> int:
        return self._sampler_coordinate()[0]

    @property
    def data_parallel_size(self) -> int:
        return self._sampler_coordinate()[1]

    def _sampler_coordinate(self) -> tuple[int, int]:
        if isinstance(self.strategy, ParallelStrategy):
            kwargs = self.strategy.distributed_sampler_kwargs
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        return 0, 1

    @property
    def shards_parameters(self) -> bool:
        return False

    @property
    def mixed_precision(self) -> str | None:
        return None

    def set_data_layout(self, layout: DataLayout) -> None:
        """Nothing to do: the strategy checks nothing against the data and saves one checkpoint per run."""


def strategy_contract(strategy: Strategy | StrategyContract | None) -> StrategyContract:
    """The contract of ``strategy``: the strategy itself if it implements it, else its adapter."""
    if isinstance(strategy, StrategyContract):
        return strategy
    return LightningStrategyAdapter(strategy)
