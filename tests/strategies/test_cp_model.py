"""The whole SH2 model with CP = 2 and 4 gives the loss and gradients of the single-process model.

Every rank builds the same seeded model and batch; the reference runs the whole sequence, the CP run
shards the batch in zig-zag order, swaps in the CP operators and reduces the loss with
:func:`context_parallel_loss`. Parameter gradients are averaged over the CP ranks, as FSDP's
reduce-scatter does, and must equal the reference (fp32, relative error < 1e-5 per parameter).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cp_harness import rel_err, run_distributed
from torch._dynamo.utils import counters

from sh2.models.config import SH2Config
from sh2.models.model import SH2Model
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig
from sh2.strategies.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_context_parallel,
    context_parallel_loss,
    remove_context_parallel,
)
from sh2.strategies.sharding import shard_batch

CONFIG = dict(hidden_size=32, num_layers=5, num_heads=4, mlp_hidden_size=64, se_groups=4, mr_groups=4,
              layout="SDH*D", mr_filter_len=8, li_state_size=4, mr_ref_len=64, max_seq_len=64)
SCHEMES = [CPConfig(),  # LI by state passing (the default)
           CPConfig(li_scheme="p2p_fft", fir_scheme="a2a_pipelined", featurizer_scheme="p2p_overlap",
                    attention_scheme="ring"),
           CPConfig(li_scheme="a2a_pipelined", fir_scheme="p2p_overlap", attention_scheme="ring",
                    ring_attention_backend="math")]


def _loss_sums(model: SH2Model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["input_ids"], batch.get("position_ids"))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
    w = batch["loss_weights"].flatten()
    return (ce * w).sum(), w.sum()


def _model_job(rank: int, world: int) -> None:
    cp = world
    cpg = CPGroup.from_group(None)
    g = torch.Generator().manual_seed(3)
    B, L = 2, 64
    ids = torch.randint(2, 256, (B, L + 1), generator=g)
    weights = (torch.rand(B, L, generator=g) > 0.2).float()
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_weights": weights}

    torch.manual_seed(0)
    base = SH2Model(SH2Config(**CONFIG))
    ref = copy.deepcopy(base)
    loss_sum, weight_sum = _loss_sums(ref, batch)
    ref_loss = loss_sum / weight_sum
    ref_loss.backward()

    # (scheme, transforms): the CP schemes eager; with activation checkpointing (the backward re-runs the
    # exchanges of the forward); the default scheme in compiled blocks (the configure_model order: checkpointing,
    # compile, then the CP operators, which dynamo meets when it traces the first call)
    runs = [(s, ()) for s in SCHEMES] + [(SCHEMES[1], ("checkpoint",))]
    if world == 2:  # dynamo's tracing is what is tested; one world size keeps the suite's time down
        runs.append((SCHEMES[0], ("checkpoint", "compile")))
    for scheme, transforms in runs:
        model = copy.deepcopy(base)
        if "checkpoint" in transforms:
            apply_activation_checkpointing(model)
        if "compile" in transforms:
            apply_compile(model, backend="aot_eager")  # traces without inductor's C++ code generation
        apply_context_parallel(model, cpg, scheme)
        local = shard_batch(batch, cp, rank)
        loss = context_parallel_loss(*_loss_sums(model, local), cpg)
        loss.backward()
        assert rel_err(loss, ref_loss) < 1e-6, (scheme, float(loss), float(ref_loss))
        bad = {}
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)
            err = rel_err(grad, p_ref.grad)
            if not err < 1e-5:
                bad[name] = err
        assert not bad, f"cp={cp} {scheme} {transforms}: gradient relative errors {bad}"
        if "compile" in transforms:  # the blocks ran compiled code
            assert counters["frames"]["ok"] >= 1, dict(counters["frames"])

    # without its CP operators the model is the single-process model again, on the whole sequence
    remove_context_parallel(model)
    with torch.no_grad():
        loss_sum, weight_sum = _loss_sums(model, batch)
    assert rel_err(loss_sum / weight_sum, ref_loss) < 1e-6


@pytest.mark.parametrize("world", [2, 4])
def test_model_with_cp_matches_single_process(world: int) -> None:
    run_distributed(_model_job, world)


def _fullgraph_job(rank: int, world: int) -> None:
    from sh2.kernels import use_backend

    cpg = CPGroup.from_group(None)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 256, (2, 33), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_weights": torch.ones(2, 32)}
    torch.manual_seed(0)
    base = SH2Model(SH2Config(**{**CONFIG, "layout": "SDH*", "num_layers": 4}))
    ref = copy.deepcopy(base)
    loss_sum, weight_sum = _loss_sums(ref, batch)
    ref_loss = loss_sum / weight_sum
    ref_loss.backward()
    # the Triton path (interpreted here) is the one with the fused LI state operator
    for schemes in (CPConfig(), CPConfig(fir_scheme="a2a", li_scheme="a2a")):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model)
        apply_compile(model, backend="aot_eager", fullgraph=True)  # a graph break is an error
        apply_context_parallel(model, cpg, schemes)
        torch._dynamo.reset()
        with use_backend("triton"):
            loss = context_parallel_loss(*_loss_sums(model, shard_batch(batch, world, rank)), cpg)
            loss.backward()
        assert rel_err(loss, ref_loss) < 1e-5, schemes
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.AVG)
            assert rel_err(grad, p_ref.grad) < 1e-4, (schemes, name, rel_err(grad, p_ref.grad))


def test_checkpointed_blocks_compile_whole_with_the_cp_exchanges() -> None:
    """SE, MR, LI and attention blocks with their CP exchanges (halo p2p, LI state passing, all-to-all for FIR,
    LI and Ulysses) trace as one graph each under activation checkpointing; a graph break there would run the
    whole block eagerly."""
    run_distributed(_fullgraph_job, 2)
