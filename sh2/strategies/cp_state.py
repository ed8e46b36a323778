"""Context parallelism for Hyena-LI by passing recurrence states (the LI scheme ``state``).

Hyena-LI is a diagonal linear recurrence with N fp32 states per channel (:func:`sh2.kernels.gated_modal_conv`),
so a rank needs nothing from the other ranks' tokens but the state they leave behind. With zig-zag sharding
rank r holds global chunks r and 2cp-1-r (pieces A and B, c tokens each). Per LI layer:

forward
  1. each rank runs its two pieces from a zero state and keeps their end states ``E_j`` ``[B, D, N]`` (the
     chunk end states inside a piece are kept too, so step 4 does not read k, v again);
  2. one all-gather of the ``2 cp`` end states (``2 B D N`` fp32 per rank);
  3. every rank scans them in global order, ``S_{j+1} = lambda^c S_j + E_j`` (``S_0 = 0``), and takes the start
     states of its own two chunks;
  4. each piece's outputs from its true start state (the kernel's ``initial_state``).
backward (the mirror image)
  1. each piece's reverse recurrence from its own outputs gives the gradient of its start state;
  2. one all-gather of those ``2 B D N`` gradients;
  3. a reverse scan in global order gives the gradient of every end state, ``dE_j = sum_{i>j} lambda^(c(i-1-j))
     dS_i``, and the decay powers of step 3 their share of ``d lambda`` (each rank counts its own chunks);
  4. each piece's input gradients, with ``dE_j`` entering as the gradient of the piece's final state (its
     z-dependence is the end state's) and ``dE_j . dE_j/dlambda`` added to ``d lambda``.

Communication per LI layer and step: two all-gathers of ``2 B D N`` fp32 values per rank, O(B D N cp) in all,
independent of the sequence length (the ``a2a`` scheme moves O(B L D)). The work per rank equals that of one
GPU on its tokens (the end states come from the kernel's own first pass), plus a scan over 2 cp states.

On CUDA the fused path uses the Triton kernel's passes directly; elsewhere (CPU, float64) the same algorithm is
composed from :func:`~sh2.kernels.gated_modal_conv` and differentiable collectives, with autograd doing the
backward.
"""

from __future__ import annotations

from typing import Any

import torch

from sh2 import kernels
from sh2.kernels.reference import gated_modal_conv_ref
from sh2.strategies.cp_comm import CPGroup, all_gather, all_gather_op, registered_group


def global_order(per_rank: torch.Tensor) -> torch.Tensor:
    """``[cp, 2, ...]`` (rank r: chunks r and 2cp-1-r) -> ``[2cp, ...]`` in sequence order."""
    return torch.cat([per_rank[:, 0], per_rank[:, 1].flip(0)], dim=0)


def own_chunks(cpg: CPGroup) -> tuple[int, int]:
    """Global chunk indices of this rank's two pieces."""
    return cpg.rank, 2 * cpg.size - 1 - cpg.rank


def start_states(ends: torch.Tensor, log_poles: torch.Tensor, chunk: int) -> torch.Tensor:
    """``S_j = sum_{i<j} lambda^(chunk (j-1-i)) E_i`` for ``ends [2cp, B, D, N]`` in sequence order."""
    decay = torch.exp(log_poles.to(ends.dtype) * chunk)
    state = torch.zeros_like(ends[0])
    out = []
    for end in ends:
        out.append(state)
        state = decay * state + end
    return torch.stack(out)


def _end_state_ref(k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor) -> torch.Tensor:
    """``sum_t lambda^(L-1-t) k_t v_t`` ``[B, D, N]`` by the reference (differentiable)."""
    _, state = gated_modal_conv_ref(k, k, v, log_poles, torch.zeros_like(log_poles), None, None, return_state=True)
    return state


def _state_passing_composed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                            residues: torch.Tensor, bias: torch.Tensor | None, cpg: CPGroup, backend: str
                            ) -> torch.Tensor:
    """The scheme from differentiable pieces (reference kernels and collectives); autograd does the backward."""
    c = q.shape[1] // 2
    ends = torch.stack([_end_state_ref(k[:, :c], v[:, :c], log_poles), _end_state_ref(k[:, c:], v[:, c:], log_poles)])
    starts = start_states(global_order(all_gather(ends, cpg)), log_poles, c)
    a, b = own_chunks(cpg)
    y_a = kernels.gated_modal_conv(q[:, :c], k[:, :c], v[:, :c], log_poles, residues, bias, starts[a],
                                   backend=backend, check_values=False)
    y_b = kernels.gated_modal_conv(q[:, c:], k[:, c:], v[:, c:], log_poles, residues, bias, starts[b],
                                   backend=backend, check_values=False)
    return torch.cat([y_a, y_b], dim=1)


def _empty(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(0, dtype=torch.float32)


# The scheme on the Triton kernel's passes, as a pair of custom operators (the forward returns what the backward
# reads): dynamo records them as calls, so a checkpointed LI block under CP compiles whole (docs/design.md,
# "Composition with FSDP2 and DeepSpeed"). Each pass runs once per piece, as on one GPU.
@torch.library.custom_op("sh2::cp_state_modal_conv", mutates_args=())
def state_modal_conv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                        residues: torch.Tensor, bias: torch.Tensor | None, group: str, save: bool
                        ) -> list[torch.Tensor]:
    """``[y, all_ends, (starts, sigma_starts, sigma_end, start_state) per piece]``; all but y empty unless
    ``save``."""
    from sh2.kernels import modal_conv as mc
    from sh2.kernels._tuning import channel_stride_one

    cpg = registered_group(group)
    q, k, v = (channel_stride_one(x) for x in (q, k, v))
    lp, res = log_poles.float().contiguous(), residues.float().contiguous()
    B, S, D = q.shape
    c = S // 2
    plan = mc.plan_chunks(B, c, D, q.device)
    pieces = (slice(0, c), slice(c, S))
    local = []  # per piece: (chunk ends, sigma ends, end state, sigma end state)
    for sl in pieces:
        ends, sig_ends = mc.chunk_ends(k[:, sl], v[:, sl], lp, plan, sigma=save)
        _, _, end, sig_end = mc.combine_states(ends.clone(), sig_ends.clone() if save else None, lp, None, plan, c)
        local.append((ends, sig_ends, end, sig_end))
    all_ends = global_order(all_gather_op(torch.stack([p[2] for p in local]), group))
    all_starts = start_states(all_ends, lp, c)
    mine = own_chunks(cpg)
    y = torch.empty(B, S, D, device=q.device, dtype=q.dtype)
    saved = []
    for i, sl in enumerate(pieces):
        ends, sig_ends, _, sig_end = local[i]
        s0 = all_starts[mine[i]].contiguous()
        starts, sig_starts, _, _ = mc.combine_states(ends, sig_ends, lp, s0, plan, c)
        mc.forward_output(q[:, sl], k[:, sl], v[:, sl], lp, res, bias, starts, plan, out=y[:, sl])
        # s0 and sig_end are views (of all_starts, of a scratch buffer): operator outputs may not alias
        saved += [starts, sig_starts, sig_end.clone(), s0.clone()] if save else [_empty(q) for _ in range(4)]
    return [y, all_ends if save else _empty(q), *saved]


@state_modal_conv_op.register_fake
def _(q, k, v, log_poles, residues, bias, group, save):
    from sh2.kernels import modal_conv as mc

    B, S, D = q.shape
    N = log_poles.shape[1]
    if not save:
        return [q.new_empty(q.shape)] + [_empty(q) for _ in range(9)]
    n_chunks = mc.plan_chunks(B, S // 2, D, q.device).n_chunks
    state = q.new_empty((B, D, N), dtype=torch.float32)
    chunks = q.new_empty((B, n_chunks, N, D), dtype=torch.float32)
    piece = [chunks, torch.empty_like(chunks), state, torch.empty_like(state)]
    ends = q.new_empty((2 * registered_group(group).size, B, D, N), dtype=torch.float32)
    return [q.new_empty(q.shape), ends, *piece, *(torch.empty_like(t) for t in piece)]


@torch.library.custom_op("sh2::cp_state_modal_conv_backward", mutates_args=())
def state_modal_conv_backward_op(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 log_poles: torch.Tensor, residues: torch.Tensor, bias: torch.Tensor | None,
                                 group: str, all_ends: torch.Tensor, saved: list[torch.Tensor]
                                 ) -> list[torch.Tensor]:
    """``[dq, dk, dv, dlog_poles, dresidues, dbias]`` (``dbias`` empty without a bias)."""
    from sh2.kernels import modal_conv as mc
    from sh2.kernels._tuning import channel_stride_one

    cpg = registered_group(group)
    q, k, v, dy = (channel_stride_one(x) for x in (q, k, v, dy))
    lp, res = log_poles.float().contiguous(), residues.float().contiguous()
    B, S, D = q.shape
    c = S // 2
    plan = mc.plan_chunks(B, c, D, q.device)
    pieces = (slice(0, c), slice(c, S))
    lam = torch.exp(lp)
    carries, r0 = zip(*(mc.adjoint_carries(dy[:, sl], q[:, sl], lp, plan) for sl in pieces))
    d_starts = global_order(all_gather_op(torch.stack([lam * res * r for r in r0]), group))
    # gradient of every end state through the start-state scan, and the scan's share of d lambda
    decay = torch.exp(lp * c)
    d_ends = torch.empty_like(d_starts)
    acc = torch.zeros_like(d_starts[0])
    for j in range(d_starts.shape[0] - 1, -1, -1):
        d_ends[j] = acc
        acc = decay * acc + d_starts[j]
    mine = own_chunks(cpg)
    dlam = torch.zeros_like(lp)
    for i in mine:  # d S_i / d lambda = sum_{j<i} m lambda^(m-1) E_j, m = c (i-1-j); m = 0 adds nothing
        for j in range(i - 1):
            m = c * (i - 1 - j)
            dlam += (d_starts[i] * all_ends[j]).sum(0) * m * torch.exp(lp * (m - 1))
    dq, dk, dv = (torch.empty(B, S, D, device=q.device, dtype=q.dtype) for _ in range(3))
    dr = torch.zeros_like(res)
    dskip = torch.zeros(D, device=q.device, dtype=torch.float32) if bias is not None else None
    for i, sl in enumerate(pieces):
        starts, sig_starts, sig_end, s0 = saved[4 * i:4 * i + 4]
        d_end = d_ends[mine[i]].contiguous()
        _, _, _, dlam_i, dr_i, dskip_i = mc.input_grads(
            dy[:, sl], q[:, sl], k[:, sl], v[:, sl], lp, res, bias, starts, sig_starts, carries[i], d_end, plan,
            out=(dq[:, sl], dk[:, sl], dv[:, sl]))
        dlam += dlam_i + (d_end * sig_end).sum(0)  # the end state's own dependence on lambda
        dr += dr_i + (lam * s0 * r0[i]).sum(0)  # outputs read R lambda^(t+1) S_start
        if dskip is not None:
            dskip += dskip_i
    return [dq, dk, dv, (dlam * lam).to(log_poles.dtype), dr.to(residues.dtype),
            dskip.to(bias.dtype) if dskip is not None else _empty(q)]


@state_modal_conv_backward_op.register_fake
def _(dy, q, k, v, log_poles, residues, bias, group, all_ends, saved):
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), torch.empty_like(log_poles),
            torch.empty_like(residues), torch.empty_like(bias) if bias is not None else _empty(q)]


def _state_setup(ctx: Any, inputs: tuple[Any, ...], output: list[torch.Tensor]) -> None:
    q, k, v, log_poles, residues, bias, group, _ = inputs
    ctx.save_for_backward(q, k, v, log_poles, residues, bias, *output[1:])
    ctx.mark_non_differentiable(*output[1:])  # what the backward reads: no gradient to allocate for them
    ctx.set_materialize_grads(False)
    ctx.group, ctx.has_bias = group, bias is not None


def _state_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple[Any, ...]:
    q, k, v, log_poles, residues, bias, all_ends, *saved = ctx.saved_tensors
    if all_ends.numel() == 0:
        raise RuntimeError("sh2::cp_state_modal_conv_backward needs the forward's saved states: run "
                           "sh2::cp_state_modal_conv with save=True when gradients are needed")
    if grads[0] is None:  # y unused
        return (None,) * 8
    dy = grads[0]
    dq, dk, dv, dlp, dr, dskip = state_modal_conv_backward_op(dy, q, k, v, log_poles, residues, bias, ctx.group,
                                                              all_ends, saved)
    return dq, dk, dv, dlp, dr, dskip if ctx.has_bias else None, None, None


state_modal_conv_op.register_autograd(_state_backward, setup_context=_state_setup)


def state_passing_modal_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                             residues: torch.Tensor, bias: torch.Tensor | None, cpg: CPGroup,
                             backend: str = "auto") -> torch.Tensor:
    """Hyena-LI (modal recurrence) on this rank's zig-zag shard ``[B, 2c, D]``: the single-process result.

    Args:
        q, k, v: ``[B, 2c, D]`` local activations (chunks r and 2cp-1-r).
        log_poles, residues: ``[D, N]``; bias: Dskip ``[D]`` or None.
        cpg: the context-parallel group.
        backend: ``auto`` (the fused Triton path on CUDA), ``triton`` or ``torch``.
    """
    if q.shape[1] % 2:
        raise ValueError(f"a zig-zag shard holds two equal chunks; got a local length of {q.shape[1]}")
    chosen = kernels.resolve_backend(backend, q)
    if chosen == "triton" and q.dtype != torch.float64:
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, log_poles, residues, bias))
        return state_modal_conv_op(q, k, v, log_poles, residues, bias, cpg.key, save)[0]
    return _state_passing_composed(q, k, v, log_poles, residues, bias, cpg, chosen)


class StateConv:
    """The LI scheme ``state``: Hyena-LI by its modal recurrence with end states passed between ranks.

    Either LI algorithm of the model (``modal`` or ``fft``) computes the same operator, so both run this way
    under the scheme.
    """

    def __init__(self, cpg: CPGroup) -> None:
        self.cpg = cpg

    def modal_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return state_passing_modal_conv(q, k, v, log_poles, residues, bias, self.cpg)

    long_conv = modal_conv
