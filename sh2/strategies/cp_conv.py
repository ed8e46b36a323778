"""Context-parallel Hyena convolutions: p2p halo exchange (featurizer, SE, MR) and all-to-all (MR, SE, LI).

Local shards are zig-zag ordered (docs/design.md, "Zig-zag sharding"): rank r holds chunk A = r and chunk
B = 2cp-1-r of ``c`` tokens each, concatenated as ``[B, 2c, C]``. Every class computes exactly what the single-process
:class:`~sh2.models.seqops.SequenceOps` computes on the whole sequence, forward and backward, and calls the
public :mod:`sh2.kernels` functions for the local arithmetic (so the Triton backends are used on GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.autograd import Function

from sh2 import kernels
from sh2.strategies.cp_comm import (
    CPGroup,
    all_to_all,
    channel_to_seq,
    check_halo,
    halo_exchange,
    pack_channel_to_seq,
    seq_to_channel,
    start_halo_exchange,
    unpack_seq_to_channel,
)


def _chunks(t: torch.Tensor) -> torch.Tensor:
    """``[B, 2c, C]`` -> ``[2B, c, C]``: the two local chunks as independent sequences (a view when possible)."""
    B, S, C = t.shape
    return t.reshape(B * 2, S // 2, C)


def _extend(t: torch.Tensor, halo_a: torch.Tensor, halo_b: torch.Tensor) -> torch.Tensor:
    """Prepend each chunk's halo: ``[B, 2c, C]`` with halos ``[B, H, C]`` -> ``[2B, H + c, C]``."""
    B, S, C = t.shape
    H = halo_a.shape[1]
    ext = torch.cat([torch.stack([halo_a, halo_b], dim=1), t.reshape(B, 2, S // 2, C)], dim=2)
    return ext.reshape(2 * B, H + S // 2, C)


def _drop_halo(y: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """``[2B, H + c, C]`` -> ``[B, 2c, C]`` without the halo rows."""
    _, n, C = y.shape
    return y.reshape(B, 2, n, C)[:, :, H:].reshape(B, 2 * (n - H), C)


class HaloConv:
    """Causal FIR convolutions by point-to-point halo exchange (scheme ``p2p``; docs/design.md, "Halo exchange").

    A causal filter of K taps makes only the first ``H = K - 1`` outputs of a chunk depend on another
    chunk: they need the last H inputs of the chunk that precedes it in the *global* order. With zig-zag
    sharding the two local chunks have different predecessors:

    - chunk A = r follows chunk r - 1, which is chunk A of rank r - 1 (rank 0: nothing, a zero halo);
    - chunk B = 2cp-1-r follows chunk 2cp-2-r, which is chunk B of rank r + 1; on the last rank
      (r = cp - 1) it follows the rank's own chunk A, so no message is needed.

    So rank r sends the tail of A to rank r + 1 and the tail of B to rank r - 1, and receives the halo of
    A from r - 1 and the halo of B from r + 1, in one batch of isend/irecv. Each chunk is then extended
    with its halo and both are convolved as a batch of 2B independent sequences with the local kernel; the
    halo outputs are dropped. For the gated Hyena FIR ``q * (conv(k v) + Dskip k v)`` only k and v need a
    halo (sent together, ``2 H D`` values), q is padded with zeros.

    Backward: autograd runs the local kernel's backward; the gradient with respect to each received halo
    is sent back to the rank that owns those inputs (the reverse direction) and added to the gradient of
    its tail rows.

    Constraint: ``H <= c = L / (2 cp)`` (a halo comes from one chunk); otherwise a ValueError says so.
    Communication per layer and rank: ``2 H C`` values forward (featurizer C = 3D, FIR C = 2D), the same
    backward: independent of L.
    """

    def __init__(self, cpg: CPGroup) -> None:
        self.cpg = cpg

    def short_conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Featurizer: depthwise causal conv of ``x [B, 2c, C]`` with ``w [C, K]``."""
        H = w.shape[1] - 1
        if H == 0:
            return kernels.causal_depthwise_conv(x, w)
        check_halo(H, x.shape[1] // 2, "featurizer (featurizer_len)", self.cpg.size)
        halo_a, halo_b = halo_exchange(x, H, self.cpg)
        y = kernels.causal_depthwise_conv(_extend(x, halo_a, halo_b), w)
        return _drop_halo(y, x.shape[0], H)

    def fir(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        """Gated grouped FIR (Hyena-SE/MR) on ``[B, 2c, D]`` shards with ``h [G, K]``."""
        H = h.shape[1] - 1
        if H == 0:
            return kernels.gated_fir_conv(q, k, v, h, bias)
        D = q.shape[-1]
        check_halo(H, q.shape[1] // 2, f"Hyena FIR filter (K={H + 1})", self.cpg.size)
        halo_a, halo_b = halo_exchange(torch.cat([k, v], dim=-1), H, self.cpg)
        zeros = q.new_zeros(q.shape[0], H, D)
        y = kernels.gated_fir_conv(_extend(q, zeros, zeros), _extend(k, halo_a[..., :D], halo_b[..., :D]),
                                   _extend(v, halo_a[..., D:], halo_b[..., D:]), h, bias)
        return _drop_halo(y, q.shape[0], H)


class OverlappedHaloConv(HaloConv):
    """Halo exchange overlapped with the local convolution (scheme ``p2p_overlap``; docs/design.md, "Halo exchange").

    1. Post the halo isend/irecv of :class:`HaloConv` and return at once.
    2. While the halos travel, convolve each chunk alone (a zero halo): exact for all outputs except the
       first H of each chunk, which miss the taps that reach into the halo.
    3. Wait, then add the boundary correction: convolve the ``2H``-long sequence ``[halo, 0]`` (q padded
       as ``[0, q[:H]]``, no Dskip) and add its last H outputs to the first H outputs of the chunk. By
       linearity in the input this is exactly the missing contribution.

    The backward is autograd's: the correction's gradient flows back through the halo to the owners as
    in :class:`HaloConv`. Same constraint and communication volume; the latency of the exchange is hidden
    behind the local kernel in the forward pass.
    """

    def short_conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        H = w.shape[1] - 1
        if H == 0:
            return kernels.causal_depthwise_conv(x, w)
        B, S, C = x.shape
        check_halo(H, S // 2, "featurizer (featurizer_len)", self.cpg.size)
        halo_a, halo_b, pending = start_halo_exchange(x, H, self.cpg)
        y = kernels.causal_depthwise_conv(_chunks(x), w)
        pending.wait()
        halo = torch.stack([halo_a, halo_b], dim=1).reshape(2 * B, H, C)
        corr = kernels.causal_depthwise_conv(torch.cat([halo, torch.zeros_like(halo)], dim=1), w)[:, H:]
        return torch.cat([y[:, :H] + corr, y[:, H:]], dim=1).reshape(B, S, C)

    def fir(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        H = h.shape[1] - 1
        if H == 0:
            return kernels.gated_fir_conv(q, k, v, h, bias)
        B, S, D = q.shape
        check_halo(H, S // 2, f"Hyena FIR filter (K={H + 1})", self.cpg.size)
        halo_a, halo_b, pending = start_halo_exchange(torch.cat([k, v], dim=-1), H, self.cpg)
        qc = _chunks(q)
        y = kernels.gated_fir_conv(qc, _chunks(k), _chunks(v), h, bias)
        pending.wait()
        halo = torch.stack([halo_a, halo_b], dim=1).reshape(2 * B, H, 2 * D)
        zeros = halo.new_zeros(2 * B, H, D)
        corr = kernels.gated_fir_conv(torch.cat([zeros, qc[:, :H]], dim=1), torch.cat([halo[..., :D], zeros], dim=1),
                                      torch.cat([halo[..., D:], zeros], dim=1), h, None)[:, H:]
        return torch.cat([y[:, :H] + corr, y[:, H:]], dim=1).reshape(B, S, D)


# ------------------------------------------------------------------------------------------ all-to-all
def fir_on_channels(z: torch.Tensor, lo: int, hi: int, h: torch.Tensor, bias: torch.Tensor | None, *,
                    group_size: int) -> torch.Tensor:
    """``conv(z, h) + bias * z`` for channels ``[lo, hi)`` of the full width (z holds only those)."""
    one = torch.ones_like(z)
    return kernels.gated_fir_conv(one, z, one, h[lo // group_size:hi // group_size],
                                  None if bias is None else bias[lo:hi])


def li_on_channels(z: torch.Tensor, lo: int, hi: int, log_poles: torch.Tensor, residues: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Hyena-LI for channels ``[lo, hi)``: the modal filter built for those channels only, then FFT conv."""
    h = kernels.modal_filter(log_poles[lo:hi], residues[lo:hi], z.shape[1])
    one = torch.ones_like(z)
    return kernels.gated_fft_conv(one, z, one, h, None if bias is None else bias[lo:hi])


def li_modal_on_channels(z: torch.Tensor, lo: int, hi: int, log_poles: torch.Tensor, residues: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """Hyena-LI for channels ``[lo, hi)`` by the modal recurrence over the whole sequence."""
    one = torch.ones_like(z)
    return kernels.gated_modal_conv(one, z, one, log_poles[lo:hi], residues[lo:hi],
                                    None if bias is None else bias[lo:hi], check_values=False)


ChannelFn = Callable[..., torch.Tensor]


class AllToAllConv:
    """Hyena convolutions by sequence <-> channel all-to-all (scheme ``a2a``; docs/design.md, "All-to-all convolution").

    1. Gate before the exchange: ``z = k * v`` on the local shard, so one tensor travels instead of three.
    2. All-to-all ``[B, 2c, D] -> [B, L, D/cp]``: rank j receives channels ``[j D/cp, (j+1) D/cp)`` of the
       whole sequence, back in natural order (the zig-zag permutation is undone while unpacking).
    3. Local operator on the rank's channels with its own filters: MR/SE use the grouped taps of the
       rank's groups (G divisible by cp, so no group is split), LI builds the modal filter of its channels
       for the full length L and runs the FFT convolution. Dskip is applied here as well.
    4. All-to-all back to ``[B, 2c, D]`` (zig-zag), then gate with q on the local shard.

    Backward: autograd's. The backward of each all-to-all is the inverse all-to-all of the gradient.
    Communication per layer and rank: ``2 * B L D / cp * (cp - 1) / cp`` elements forward (z out, y back),
    the same backward. Works for any filter length (also MR filters longer than a chunk).
    """

    def __init__(self, cpg: CPGroup) -> None:
        self.cpg = cpg

    def _run(self, z: torch.Tensor, fn: ChannelFn, params: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        z_c = seq_to_channel(z, self.cpg)
        lo = self.cpg.rank * z_c.shape[-1]
        return channel_to_seq(fn(z_c, lo, lo + z_c.shape[-1], *params), self.cpg)

    def _check_groups(self, groups: int, width: int) -> None:
        if groups % self.cpg.size or width % self.cpg.size:
            raise ValueError(f"a2a convolution: filter groups ({groups}) and width ({width}) must be divisible by "
                             f"cp.size={self.cpg.size} so that no filter group is split")

    def fir(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        D = q.shape[-1]
        self._check_groups(h.shape[0], D)
        y = self._run(k * v, partial(fir_on_channels, group_size=D // h.shape[0]), (h, bias))
        return q * y

    def long_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                  residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._check_groups(q.shape[-1], q.shape[-1])
        y = self._run(k * v, li_on_channels, (log_poles, residues, bias))
        return q * y

    def modal_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._check_groups(q.shape[-1], q.shape[-1])
        return q * self._run(k * v, li_modal_on_channels, (log_poles, residues, bias))


class PipelinedAllToAllConv(AllToAllConv):
    """Channel-pipelined all-to-all convolution (scheme ``a2a_pipelined``; docs/design.md, "All-to-all
    convolution").

    The rank's channel slice (D/cp channels) is split into ``n`` sub-slices (``a2a_pipeline_chunks``,
    reduced to the largest count that keeps whole filter groups). Forward, for sub-slice i: wait for its
    incoming all-to-all, post the all-to-all of sub-slice i + 1, run the local operator on sub-slice i,
    post its return all-to-all. The exchange of one slice thus overlaps the compute of the next. The
    backward does the same with the gradients: incoming gradient of slice i + 1 in flight while slice i
    is differentiated (its local operator is recomputed from the saved channel-layout input, so no
    autograd graph is held across the exchange), and the input gradient of slice i travels back while
    slice i + 1 is processed. Same communication volume as :class:`AllToAllConv`, in n messages.
    """

    def __init__(self, cpg: CPGroup, chunks: int = 2) -> None:
        super().__init__(cpg)
        if chunks < 1:
            raise ValueError(f"a2a_pipeline_chunks must be >= 1, got {chunks}")
        self.chunks = chunks

    def _n_pipe(self, per_rank: int, group_size: int) -> int:
        groups = per_rank // group_size
        return max(n for n in range(1, min(self.chunks, groups) + 1) if groups % n == 0)

    def _run_pipelined(self, z: torch.Tensor, fn: ChannelFn, params: tuple[torch.Tensor | None, ...],
                       group_size: int) -> torch.Tensor:
        n = self._n_pipe(z.shape[-1] // self.cpg.size, group_size)
        return _PipelinedA2A.apply(self.cpg, n, fn, z, *params)

    def fir(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        D = q.shape[-1]
        self._check_groups(h.shape[0], D)
        dg = D // h.shape[0]
        return q * self._run_pipelined(k * v, partial(fir_on_channels, group_size=dg), (h, bias), dg)

    def long_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                  residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._check_groups(q.shape[-1], q.shape[-1])
        return q * self._run_pipelined(k * v, li_on_channels, (log_poles, residues, bias), 1)

    def modal_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._check_groups(q.shape[-1], q.shape[-1])
        return q * self._run_pipelined(k * v, li_modal_on_channels, (log_poles, residues, bias), 1)


def _post_slice(t: torch.Tensor, i: int, n: int, cpg: CPGroup) -> tuple[torch.Tensor, Any]:
    """Post the all-to-all of channel sub-slice i of every rank's slice of ``t [B, 2c, D]``."""
    B, S, D = t.shape
    buf = t.reshape(B, S, cpg.size, n, D // (cpg.size * n))[:, :, :, i].permute(2, 0, 1, 3).contiguous()
    return all_to_all(buf, cpg, async_op=True)


def _assemble(bufs: list[torch.Tensor], cpg: CPGroup) -> torch.Tensor:
    """Returned sub-slices ``n x [cp, B, 2c, e]`` -> ``[B, 2c, D]`` (rank-major, then sub-slice)."""
    cp, B, S, e = bufs[0].shape
    return torch.stack([b.permute(1, 2, 0, 3) for b in bufs], dim=3).reshape(B, S, cp * len(bufs) * e)


class _PipelinedA2A(Function):
    @staticmethod
    def forward(ctx: Any, cpg: CPGroup, n: int, fn: ChannelFn, z: torch.Tensor, *params: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.cpg, ctx.n, ctx.fn = cpg, n, fn
        e = z.shape[-1] // (cpg.size * n)
        inflight, outs, z_cs = _post_slice(z, 0, n, cpg), [], []
        for i in range(n):
            nxt = _post_slice(z, i + 1, n, cpg) if i + 1 < n else None
            buf, work = inflight
            if work is not None:
                work.wait()
            z_c = unpack_seq_to_channel(buf)
            lo = cpg.rank * e * n + i * e
            y_c = fn(z_c, lo, lo + e, *params)
            outs.append(all_to_all(pack_channel_to_seq(y_c, cpg.size), cpg, async_op=True))
            z_cs.append(z_c)
            inflight = nxt
        for _, work in outs:
            if work is not None:
                work.wait()
        ctx.save_for_backward(*z_cs, *params)
        return _assemble([b for b, _ in outs], cpg)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cpg, n, fn = ctx.cpg, ctx.n, ctx.fn
        saved = ctx.saved_tensors
        z_cs, params = saved[:n], saved[n:]
        leaves = [None if p is None else p.detach().requires_grad_(ctx.needs_input_grad[4 + j])
                  for j, p in enumerate(params)]
        wanted = [p for p in leaves if p is not None and p.requires_grad]
        pgrads: list[torch.Tensor | None] = [None] * len(wanted)
        e = z_cs[0].shape[-1]
        grad = grad.contiguous()
        inflight, outs = _post_slice(grad, 0, n, cpg), []
        for i in range(n):
            nxt = _post_slice(grad, i + 1, n, cpg) if i + 1 < n else None
            buf, work = inflight
            if work is not None:
                work.wait()
            g_c = unpack_seq_to_channel(buf)
            lo = cpg.rank * e * n + i * e
            with torch.enable_grad():
                z_c = z_cs[i].detach().requires_grad_(True)
                y_c = fn(z_c, lo, lo + e, *leaves)
                grads = torch.autograd.grad(y_c, [z_c, *wanted], g_c, allow_unused=True)
            outs.append(all_to_all(pack_channel_to_seq(grads[0], cpg.size), cpg, async_op=True))
            for j, g in enumerate(grads[1:]):
                if g is not None:
                    pgrads[j] = g if pgrads[j] is None else pgrads[j] + g
            inflight = nxt
        for _, work in outs:
            if work is not None:
                work.wait()
        it = iter(pgrads)
        param_grads = [next(it) if (p is not None and p.requires_grad) else None for p in leaves]
        return (None, None, None, _assemble([b for b, _ in outs], cpg), *param_grads)
