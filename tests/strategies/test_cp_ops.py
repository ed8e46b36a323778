"""Every context-parallel operator equals the single-process operator, forward and backward.

Each spawned job (gloo, CPU) builds the same seeded inputs on every rank, runs the local reference on the
whole sequence, then the CP operator on the zig-zag shards, and compares outputs, input gradients
(gathered) and parameter gradients (summed over ranks). Tolerance: relative error 1e-5 in fp32 (the
schemes reorder fp32 sums; the FFT path uses a different transform, both well inside 1e-5 at these sizes).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from cp_harness import gather_seq, rel_err, run_distributed

from sh2.models.seqops import LOCAL_OPS
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_ops import CPConfig, CPSequenceOps
from sh2.strategies.sharding import shard_sequence

TOL = 1e-5


def _compare(name: str, ref_fn: Callable, cp_fn: Callable, seq_inputs: list[torch.Tensor],
             params: list[torch.Tensor | None], cp: int, rank: int, tol: float = TOL) -> None:
    ref_in = [t.clone().requires_grad_() for t in seq_inputs]
    ref_p = [None if p is None else p.clone().requires_grad_() for p in params]
    out = ref_fn(*ref_in, *ref_p)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * gout).sum().backward()

    my_in = [shard_sequence(t, cp, rank).clone().requires_grad_() for t in seq_inputs]
    my_p = [None if p is None else p.clone().requires_grad_() for p in params]
    o = cp_fn(*my_in, *my_p)
    (o * shard_sequence(gout, cp, rank)).sum().backward()

    errs = {"out": rel_err(gather_seq(o.detach()), out)}
    for i, (a, b) in enumerate(zip(my_in, ref_in)):
        errs[f"d_in{i}"] = rel_err(gather_seq(a.grad), b.grad)
    for i, (a, b) in enumerate(zip(my_p, ref_p)):
        if a is not None:
            g = a.grad.clone()
            dist.all_reduce(g)
            errs[f"d_param{i}"] = rel_err(g, b.grad)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"cp={cp} rank={rank} {name}: relative errors {bad} exceed {tol}"


def _ops_job(rank: int, world: int) -> None:
    cp = world
    cpg = CPGroup.from_group(None)
    g = torch.Generator().manual_seed(0)
    B, D, G, c = 2, 16, 4, 8
    L = 2 * cp * c

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    # featurizer (3 taps over 3D channels)
    x, w = rnd(B, L, 3 * D), rnd(3 * D, 3)
    for scheme in ("p2p", "p2p_overlap"):
        ops = CPSequenceOps(cpg, CPConfig(featurizer_scheme=scheme))
        _compare(f"featurizer/{scheme}", LOCAL_OPS.short_conv, ops.short_conv, [x], [w], cp, rank)

    # Hyena-SE (7 taps, no Dskip) and Hyena-MR (8 taps, Dskip), every FIR scheme
    q, k, v = rnd(B, L, D), rnd(B, L, D), rnd(B, L, D)
    for K, bias in ((7, None), (c, rnd(D))):
        h = rnd(G, K, scale=0.3)
        for scheme in ("p2p", "p2p_overlap", "a2a", "a2a_pipelined"):
            ops = CPSequenceOps(cpg, CPConfig(fir_scheme=scheme, a2a_pipeline_chunks=2))
            _compare(f"fir K={K}/{scheme}", LOCAL_OPS.fir, ops.fir, [q, k, v], [h, bias], cp, rank)

    # MR filter longer than a chunk: p2p refuses with a clear message, a2a is exact
    h_long = rnd(G, c + 4, scale=0.3)
    bias = rnd(D)
    with pytest.raises(ValueError, match="zig-zag chunk holds only"):
        CPSequenceOps(cpg, CPConfig(fir_scheme="p2p")).fir(*(shard_sequence(t, cp, rank) for t in (q, k, v)),
                                                           h_long, bias)
    for scheme in ("a2a", "a2a_pipelined"):
        ops = CPSequenceOps(cpg, CPConfig(fir_scheme=scheme))
        _compare(f"fir long/{scheme}", LOCAL_OPS.fir, ops.fir, [q, k, v], [h_long, bias], cp, rank)

    # Hyena-LI (modal filter over the whole sequence), every scheme
    log_poles = -torch.exp(rnd(D, 4, scale=0.5) - 2.0)
    residues = rnd(D, 4, scale=0.25)
    for scheme in ("state", "a2a", "a2a_pipelined", "p2p_fft"):
        ops = CPSequenceOps(cpg, CPConfig(li_scheme=scheme, a2a_pipeline_chunks=3))
        _compare(f"li/{scheme}", LOCAL_OPS.long_conv, ops.long_conv, [q, k, v], [log_poles, residues, bias],
                 cp, rank)
        _compare(f"li modal/{scheme}", LOCAL_OPS.modal_conv, ops.modal_conv, [q, k, v], [log_poles, residues, bias],
                 cp, rank)

    # attention: MHA and GQA, Ulysses and ring (flash and math block kernels)
    H, hd = 4, 8
    for kv_heads in (4, 2):
        qa, ka, va = rnd(B, L, H, hd), rnd(B, L, kv_heads, hd), rnd(B, L, kv_heads, hd)
        for scheme, backend in (("a2a", "auto"), ("ring", "flash"), ("ring", "math")):
            ops = CPSequenceOps(cpg, CPConfig(attention_scheme=scheme, ring_attention_backend=backend))
            _compare(f"attention kv={kv_heads}/{scheme}/{backend}", LOCAL_OPS.attention, ops.attention,
                     [qa, ka, va], [], cp, rank)


@pytest.mark.parametrize("world", [2, 4])
def test_cp_operators_match_single_process(world: int) -> None:
    run_distributed(_ops_job, world)
