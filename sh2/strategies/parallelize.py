"""Apply activation checkpointing, compilation, context parallelism and FSDP2 to an SH2Model from outside.

torchtitan style: the model is plain PyTorch, and every training technique is a function that changes it in
place, applied in a fixed order from ``SH2LightningModule.configure_model``:

1. :func:`apply_activation_checkpointing`: every block recomputes its activations in the backward pass;
2. :func:`apply_compile`: every block is compiled with ``torch.compile``;
3. the strategy's :meth:`parallelize_model` (:func:`parallelize` for FSDP2), which builds on the named
   DeviceMesh ``dp_replicate`` x ``dp_shard`` x ``cp`` (CP innermost, so a CP group is a set of neighbouring
   ranks) and

   a. sets a :class:`~sh2.strategies.cp_ops.CPSequenceOps` on every mixer (:func:`apply_context_parallel`,
      undone by :func:`remove_context_parallel`), then
   b. shards parameters with FSDP2 ``fully_shard`` per block, then the root, over the data-parallel x
      context-parallel ranks (``dp_shard`` and ``cp`` flattened; HSDP when ``dp_replicate > 1``).

Each function is idempotent: it checks the state it creates (the blocks' class, their compiled call, the
mixers' operators, ``FSDPModule``) instead of marking the model. With a low-precision ``MixedPrecisionPolicy``
every Hyena-LI mixer becomes its own FSDP unit with an fp32 policy (see :func:`apply_fsdp`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from sh2.models.filters import ModalFilter
from sh2.models.seqops import LOCAL_OPS
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig, CPSequenceOps, validate_cp_settings

MESH_DIMS = ("dp_replicate", "dp_shard", "cp")


def build_mesh(device_type: str, dp_replicate: int, dp_shard: int, cp: int) -> Any:
    """The named 3-D DeviceMesh ``(dp_replicate, dp_shard, cp)`` over all ranks.

    Raises:
        ValueError: if the product of the sizes is not the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if dp_replicate * dp_shard * cp != world:
        raise ValueError(f"data_parallel_replicate_size ({dp_replicate}) x data_parallel_shard_size ({dp_shard}) x "
                         f"cp.size ({cp}) = {dp_replicate * dp_shard * cp} must equal the world size "
                         f"({world})")
    mesh = init_device_mesh(device_type, (dp_replicate, dp_shard, cp), mesh_dim_names=MESH_DIMS)
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


def fsdp_mesh(mesh: Any) -> Any:
    """The mesh FSDP2 shards over: ``dp_shard_cp`` (1-D), or ``(dp_replicate, dp_shard_cp)`` for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def cp_group_of(mesh: Any) -> CPGroup:
    """The :class:`CPGroup` of this rank from the mesh's ``cp`` dimension."""
    sub = mesh["cp"]
    return CPGroup(group=sub.get_group(), rank=sub.get_local_rank(), size=sub.size(),
                   global_ranks=[int(r) for r in sub.mesh.flatten().tolist()])


class _CheckpointedBlock(nn.Module):
    """Runs the block's forward under ``torch.utils.checkpoint`` while training with gradients enabled."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Make every block of ``model`` recompute its activations in the backward pass (idempotent).

    Each block's class is swapped for a subclass whose forward runs under non-reentrant
    ``torch.utils.checkpoint`` (as FSDP2's ``fully_shard`` swaps classes): unlike a wrapper module, parameter
    names, state-dict keys and ``model.blocks[i]`` stay what they are, so checkpoints, parameter groups, FSDP
    units and DeepSpeed registrations see the same model. Evaluation and ``no_grad`` calls run normally.
    """
    for block in model.blocks:
        cls = type(block)
        if issubclass(cls, _CheckpointedBlock):
            continue
        if cls not in _CHECKPOINTED_CLASSES:
            _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_CheckpointedBlock, cls), {})
        block.__class__ = _CHECKPOINTED_CLASSES[cls]


def apply_compile(model: nn.Module, **compile_kwargs: Any) -> None:
    """Compile every block of ``model`` with ``torch.compile``, in place (idempotent).

    Blocks are compiled one by one (as torchtitan does): they repeat, so the compiled code is reused, and the
    embedding and head stay eager. ``nn.Module.compile`` compiles the block's call in place, so parameter names
    and state-dict keys are unchanged. Compile after activation checkpointing (the checkpointed forward is
    compiled) and before FSDP2 (its hooks, registered later, run eagerly around the compiled code).

    Args:
        model: an :class:`~sh2.models.model.SH2Model`.
        **compile_kwargs: arguments of ``torch.compile`` (``backend``, ``mode``, ``fullgraph``, ...).
    """
    for block in model.blocks:
        if block._compiled_call_impl is None:  # what nn.Module.compile sets; None: not compiled yet
            block.compile(**compile_kwargs)


def apply_context_parallel(model: nn.Module, cpg: CPGroup, cp_config: CPConfig | None = None) -> CPSequenceOps:
    """Validate the settings against the model config and set the CP ops on every mixer (idempotent).

    Returns:
        The operators every mixer now holds; the ones already set when they run on ``cpg`` with ``cp_config``.
    """
    cp_config = cp_config or CPConfig()
    held = {id(block.mixer.ops): block.mixer.ops for block in model.blocks}
    if len(held) == 1:
        (ops,) = held.values()
        if isinstance(ops, CPSequenceOps) and ops.cpg == cpg and ops.config == cp_config:
            return ops
    validate_cp_settings(model.config, cpg.size, cp_config)
    ops = CPSequenceOps(cpg, cp_config)
    for block in model.blocks:
        block.mixer.ops = ops
    return ops


def remove_context_parallel(model: nn.Module) -> None:
    """Undo :func:`apply_context_parallel`: every mixer runs the single-process operators again."""
    for block in model.blocks:
        block.mixer.ops = LOCAL_OPS


def apply_fsdp(model: nn.Module, mesh: Any, mp_policy: Any = None, reshard_after_forward: bool = True,
               autocast: bool = False) -> None:
    """FSDP2 per block, then the root; Hyena-LI mixers in their own fp32 unit under a low-precision policy
    (compiled blocks: the whole LI block is one fp32 unit).

    The LI poles and residues must not be rounded to bf16 (the filter decays over up to 1M taps), so under a
    bf16/fp16 policy each LI mixer is its own FSDP unit that gathers fp32 parameters and computes in fp32
    (under autocast its projections still run in bf16), returning the policy's dtype. The unit is the
    mixer module, entered through a normal call with arguments: a unit on the filter alone would need FSDP
    forward hooks on its argument-less methods, and torch 2.11's root pre-forward fails on an empty
    argument tuple when activation checkpointing recomputes a block in the backward pass (IndexError in
    ``_root_pre_forward``, seen on 4 H100s). A compiled block (``apply_compile`` before this) cannot hold a
    nested unit without a graph break, and under activation checkpointing one break runs the whole block
    eagerly. So when the training step runs under ``autocast`` (``bf16-mixed`` precision), a compiled LI block is
    sharded whole with fp32 parameters instead: its matmuls still run in bf16 (autocast casts the weights as
    FSDP would), its input and output keep their dtype, and only its gathered weights double in size. Without
    autocast that would move the block's matmuls to fp32, so the nested unit stays (and the block runs eagerly
    under checkpointing).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    low_precision = policy.param_dtype not in (None, torch.float32)
    # inputs cast to fp32 on entry, the output back to the policy's dtype for the rest of the block
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                output_dtype=policy.param_dtype, cast_forward_inputs=True)
    fp32_block = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in model.blocks:
        if low_precision and isinstance(getattr(block.mixer, "filter", None), ModalFilter):
            if autocast and block._compiled_call_impl is not None:
                fully_shard(block, mesh=mesh, mp_policy=fp32_block, reshard_after_forward=reshard_after_forward)
                continue
            fully_shard(block.mixer, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def mixed_precision_policy(name: str | None) -> Any:
    """``None`` / ``"fp32"`` (no policy), ``"bf16"`` or ``"fp16"`` (params cast for compute, fp32 reduction)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if name in (None, "fp32", "32", "none"):
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"mixed_precision must be one of None, 'fp32', 'bf16', 'fp16'; got {name!r}")
    return MixedPrecisionPolicy(param_dtype=dtypes[name], reduce_dtype=torch.float32)


def parallelize(model: nn.Module, mesh: Any, cp_config: CPConfig | None = None, *, mp_policy: Any = None,
                shard_parameters: bool = True, reshard_after_forward: bool = True,
                force_cp_ops: bool = False, autocast: bool = False) -> nn.Module:
    """Apply CP ops and FSDP2 to ``model`` in place (fixed order: CP, then FSDP) and return it (idempotent).

    Args:
        model: an :class:`~sh2.models.model.SH2Model` (materialised or on the meta device).
        mesh: the mesh of :func:`build_mesh`.
        cp_config: the scheme per operator type.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (see :func:`mixed_precision_policy`).
        shard_parameters: apply FSDP2 (False leaves parameters replicated, e.g. under DeepSpeed).
        reshard_after_forward: FSDP2 ``reshard_after_forward`` for every unit.
        force_cp_ops: use the CP operators even with cp = 1 (to exercise their code path on one rank).
        autocast: the training step runs under autocast (mixed precision), which :func:`apply_fsdp` needs to know.
    """
    from torch.distributed.fsdp import FSDPModule

    cpg = cp_group_of(mesh)
    if cpg.size > 1 or force_cp_ops:
        apply_context_parallel(model, cpg, cp_config)
    if shard_parameters and not isinstance(model, FSDPModule):
        apply_fsdp(model, fsdp_mesh(mesh), mp_policy, reshard_after_forward, autocast)
    return model


def context_parallel_loss(loss_sum: torch.Tensor, weight_sum: torch.Tensor, cpg: CPGroup | None,
                          min_weight: float = 1.0) -> torch.Tensor:
    """Token-weighted loss of a CP group whose gradients match the single-process ones.

    Every CP rank holds ``loss_sum`` and ``weight_sum`` of its shard. The value returned is the loss of
    the whole sequence, ``sum_j loss_sum_j / sum_j weight_sum_j`` (the same on every CP rank, so logging
    is CP-agnostic). Its gradient on rank j is ``cp * d(loss_sum_j) / W``: FSDP (or DeepSpeed) averages
    gradients over the data-parallel x context-parallel ranks, so the cp factor cancels the averaging over
    the CP ranks and the result equals the gradient of the single-process loss, averaged over dp.
    The total weight is clamped to ``min_weight`` like the single-process ``loss_sum / max(weight_sum, 1)``.
    """
    if cpg is None or cpg.size == 1:
        return loss_sum / weight_sum.clamp_min(min_weight)
    stats = torch.stack([loss_sum.detach().float(), weight_sum.detach().float()])
    dist.all_reduce(stats, group=cpg.group)
    total = stats[1].clamp_min(min_weight)
    local = loss_sum * (cpg.size / total)
    return local + (stats[0] / total - local).detach()
