"""The LI ``state`` scheme (state passing of the modal recurrence) equals the single-process operator.

Each spawned job (gloo, CPU) builds the same seeded inputs on every rank, runs ``gated_modal_conv`` on the whole
sequence, then the scheme on the zig-zag shards, and compares outputs, the gathered input gradients and the
rank-summed parameter gradients (log poles, residues, Dskip). Both paths of the scheme run: the fused one on the
Triton kernel's passes (here under the interpreter) and the composed one (reference kernel, autograd). Tolerance
1e-5: fp32 sums reordered across chunk boundaries; float64 runs of the composed path agree to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from cp_harness import gather_seq, rel_err, run_distributed

from sh2.kernels import gated_modal_conv
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_state import global_order, start_states, state_passing_modal_conv
from sh2.strategies.sharding import shard_sequence


def _state_job(rank: int, world: int, backend: str, dtype: torch.dtype, c: int) -> None:
    import torch.distributed as dist

    cp = world
    cpg = CPGroup.from_group(None)
    g = torch.Generator().manual_seed(0)
    B, D, N = 2, 8, 16
    L = 2 * cp * c
    q, k, v = (torch.randn(B, L, D, generator=g, dtype=dtype) for _ in range(3))
    lp = -torch.exp(torch.randn(D, N, generator=g, dtype=dtype)) * 0.2  # slow decays: states matter far away
    res = torch.randn(D, N, generator=g, dtype=dtype) / 4
    bias = torch.randn(D, generator=g, dtype=dtype)
    params = [lp, res, bias]

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_p = [p.clone().requires_grad_() for p in params]
    out = gated_modal_conv(*ref_in, *ref_p, backend="torch")
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    (out * gout).sum().backward()

    my_in = [shard_sequence(t, cp, rank).clone().requires_grad_() for t in (q, k, v)]
    my_p = [p.clone().requires_grad_() for p in params]
    o = state_passing_modal_conv(*my_in, *my_p, cpg, backend=backend)
    (o * shard_sequence(gout, cp, rank)).sum().backward()

    tol = 1e-11 if dtype == torch.float64 else 1e-5
    errs = {"out": rel_err(gather_seq(o.detach()), out)}
    for name, a, b in zip("qkv", my_in, ref_in):
        errs[f"d{name}"] = rel_err(gather_seq(a.grad), b.grad)
    for name, a, b in zip(("log_poles", "residues", "bias"), my_p, ref_p):
        grad = a.grad.clone()
        dist.all_reduce(grad)
        errs[f"d{name}"] = rel_err(grad, b.grad)
    bad = {key: err for key, err in errs.items() if not err < tol}
    assert not bad, f"cp={cp} rank={rank} backend={backend} {dtype}: relative errors {bad} exceed {tol}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_state_scheme_matches_single_process_fused(world):
    run_distributed(_state_job, world, "triton", torch.float32, 5)  # 5-token chunks: not a multiple of 8


@pytest.mark.slow
@pytest.mark.parametrize("world,dtype", [(2, torch.float64), (4, torch.float32)])
def test_state_scheme_matches_single_process_composed(world, dtype):
    run_distributed(_state_job, world, "torch", dtype, 6)


def test_start_states_scan_and_global_order():
    """Rank r holds chunks r and 2cp-1-r; start states are the decayed sums of all earlier end states."""
    cp, B, D, N, c = 3, 1, 2, 3, 4
    g = torch.Generator().manual_seed(1)
    ends = torch.randn(2 * cp, B, D, N, generator=g, dtype=torch.float64)
    per_rank = torch.stack([torch.stack([ends[r], ends[2 * cp - 1 - r]]) for r in range(cp)])
    assert torch.equal(global_order(per_rank), ends)
    lp = -torch.rand(D, N, generator=g, dtype=torch.float64)
    starts = start_states(ends, lp, c)
    lam = torch.exp(lp)
    for j in range(2 * cp):
        expected = sum((lam ** (c * (j - 1 - i)) * ends[i] for i in range(j)), torch.zeros_like(ends[0]))
        assert torch.allclose(starts[j], expected)
