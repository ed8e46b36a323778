"""Context-parallel causal attention: all-to-all over heads (Ulysses) and ring attention (docs/design.md)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd import Function

from sh2.models.seqops import LOCAL_OPS
from sh2.strategies.cp_comm import CPGroup, batch_p2p, channel_to_seq, seq_to_channel, wait_all


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[2] == heads:
        return k, v
    rep = heads // k.shape[2]
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


class UlyssesAttention:
    """Attention by all-to-all over heads (scheme ``a2a``; DeepSpeed-Ulysses).

    q, k, v ``[B, 2c, H, hd]`` (zig-zag sequence shards, RoPE already applied with the shard's positions)
    are packed so that rank j's slice holds heads ``[j H/cp, (j+1) H/cp)`` of q, k and v, and one
    all-to-all turns them into the whole sequence (natural order) for H/cp heads. Each rank runs ordinary
    causal attention (SDPA: flash / cuDNN on GPUs) on its heads, and a second all-to-all returns the
    output to zig-zag sequence shards. The backward is the inverse exchange of the gradients.

    Constraint: num_heads divisible by cp (kv heads of GQA are repeated first when they are not).
    Communication per layer and rank: ``(H + 2 H_kv) hd`` values per token out, ``H hd`` back, each times
    ``B L / cp * (cp - 1) / cp``; the same backward.
    """

    def __init__(self, cpg: CPGroup) -> None:
        self.cpg = cpg

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cp = self.cpg.size
        B, S, H, hd = q.shape
        if H % cp:
            raise ValueError(f"attention_scheme='a2a' needs num_heads ({H}) divisible by cp.size={cp}")
        if k.shape[2] % cp:
            k, v = _expand_kv(k, v, H)
        Hk = k.shape[2]
        packed = torch.cat([t.reshape(B, S, cp, -1) for t in (q, k, v)], dim=-1).reshape(B, S, -1)
        x = seq_to_channel(packed, self.cpg)
        L = x.shape[1]
        qc, kc, vc = x.split([H // cp * hd, Hk // cp * hd, Hk // cp * hd], dim=-1)
        out = LOCAL_OPS.attention(qc.reshape(B, L, H // cp, hd), kc.reshape(B, L, Hk // cp, hd),
                                  vc.reshape(B, L, Hk // cp, hd))
        return channel_to_seq(out.reshape(B, L, H // cp * hd), self.cpg).reshape(B, S, H, hd)


# ------------------------------------------------------------------------------------ block attention
def _block_backend(q: torch.Tensor, backend: str) -> str:
    if backend == "auto":
        if q.is_cuda:
            return "flash" if q.dtype in (torch.float16, torch.bfloat16) else "math"
        return "flash"
    return backend


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Attention of one block ``[B, H, S, hd]``: ``(out, logsumexp [B, H, Sq] fp32, aux for backward)``."""
    if backend == "flash" and q.is_cuda:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1][..., :q.shape[2]].float(), res[2:8]
    if backend == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float(), None
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()), lse, None


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, scale: float, backend: str, aux: Any
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *merged* output and logsumexp of its query rows."""
    if backend == "flash" and q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        dout, q, k, v, out, lse = (t.contiguous() for t in (dout, q, k, v, out, lse))
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    qf, kf, vf, dof = q.float(), k.float(), v.float(), dout.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    p = torch.exp(s - lse[..., None])
    if causal:
        p = p.masked_fill(torch.ones_like(p, dtype=torch.bool).triu(1), 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = p * (dp - (dof * out.float()).sum(-1, keepdim=True))
    return torch.matmul(ds, kf) * scale, torch.matmul(ds.transpose(-1, -2), qf) * scale, dv


def _merge(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of a block result into the running (output, logsumexp)."""
    new = torch.logaddexp(acc_lse, lse)
    acc = acc * torch.exp(acc_lse - new)[..., None] + out.float() * torch.exp(lse - new)[..., None]
    return acc, new


def _schedule(r: int, src: int, c: int) -> list[tuple[slice, slice, bool]]:
    """Blocks (query rows, key rows, causal) of local q against the kv shard of rank ``src``.

    Local rows ``[0, c)`` are chunk A = r, ``[c, 2c)`` chunk B = 2cp-1-r; the same for the kv shard of src.
    Pairs whose key chunk lies after the query chunk are skipped (fully masked).
    """
    a, b, both = slice(0, c), slice(c, 2 * c), slice(0, 2 * c)
    if src == r:
        return [(a, a, True), (b, a, False), (b, b, True)]
    if src < r:  # only the kv chunk A (= src < r) is visible, to both query chunks
        return [(both, a, False)]
    return [(b, both, False)]  # src > r: only query chunk B sees anything, and it sees all of it


class _RingAttention(Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cpg: CPGroup, backend: str
                ) -> torch.Tensor:
        r, cp = cpg.rank, cpg.size
        c = q.shape[2] // 2
        scale = 1.0 / math.sqrt(q.shape[-1])
        acc = q.new_zeros(q.shape, dtype=torch.float32)
        acc_lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        kv, aux = torch.stack([k, v]).contiguous(), []
        for step in range(cp):
            works, nxt = [], None
            if step < cp - 1:
                nxt = torch.empty_like(kv)
                works = batch_p2p([(kv, (r + 1) % cp)], [(nxt, (r - 1) % cp)], cpg, tag=21)
            for rows, cols, causal in _schedule(r, (r - step) % cp, c):
                out, lse, a = block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal, scale,
                                            backend)
                aux.append(a)
                acc[:, :, rows], acc_lse[:, :, rows] = _merge(acc[:, :, rows], acc_lse[:, :, rows], out, lse)
            wait_all(works)
            kv = nxt if nxt is not None else kv
        out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.cpg, ctx.backend, ctx.scale, ctx.aux = cpg, backend, scale, aux
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        cpg, backend, scale = ctx.cpg, ctx.backend, ctx.scale
        r, cp = cpg.rank, cpg.size
        c = q.shape[2] // 2
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v]).contiguous()
        incoming: torch.Tensor | None = None
        dkv_works: list[Any] = []
        aux = iter(ctx.aux)
        for step in range(cp):
            kv_works, nxt = [], None
            if step < cp - 1:
                nxt = torch.empty_like(kv)
                kv_works = batch_p2p([(kv, (r + 1) % cp)], [(nxt, (r - 1) % cp)], cpg, tag=22)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for rows, cols, causal in _schedule(r, (r - step) % cp, c):
                gq, gk, gv = block_backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                            out[:, :, rows], lse[:, :, rows], causal, scale, backend, next(aux))
                dq[:, :, rows] += gq.float()
                dkv[0][:, :, cols] += gk.float()
                dkv[1][:, :, cols] += gv.float()
            wait_all(dkv_works)
            if incoming is not None:
                dkv = dkv + incoming
            if cp > 1:  # pass the accumulated gradient of this kv shard on, towards its owner
                incoming = torch.empty_like(dkv)
                dkv_works = batch_p2p([(dkv, (r + 1) % cp)], [(incoming, (r - 1) % cp)], cpg, tag=23)
            wait_all(kv_works)
            kv = nxt if nxt is not None else kv
        if cp > 1:
            wait_all(dkv_works)
            dkv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


class RingAttention:
    """Ring attention with an online softmax over zig-zag shards (scheme ``ring``).

    Each rank keeps its query rows and passes its K/V shard around the ring (to rank r + 1, from rank
    r - 1), so at step s it holds the K/V of rank ``src = r - s``. With zig-zag shards (chunks r and
    2cp-1-r) the causal structure per step is:

    - s = 0 (own shard): A x A causal, B x A full, B x B causal;
    - src < r: only the kv chunk A of src is visible, fully, to both query chunks (one [2c x c] block);
    - src > r: only the query chunk B sees it, fully (one [c x 2c] block).

    Fully masked halves are never computed, and every step costs every rank the same (balanced). Block
    results are merged with the running output through their log-sum-exp (online softmax, fp32). The
    next K/V shard travels while the current block is computed.

    Backward (flash-attention style): each block's gradients are computed from the *merged* output and
    log-sum-exp; dQ accumulates locally, while the dK/dV of a shard travel around the ring with it,
    accumulating each rank's contribution, and reach the owner after cp hops. Block kernels:
    ``flash`` (aten flash attention with log-sum-exp, CUDA half precision or CPU) or ``math`` (fp32
    matmuls, any device; ``auto`` picks flash where it applies).

    Communication per layer and rank: ``(cp - 1) * 2 B H (L / cp) hd`` values forward, twice that backward
    (K/V again, plus dK/dV). GQA heads are repeated before the ring.
    """

    def __init__(self, cpg: CPGroup, backend: str = "auto") -> None:
        if backend not in ("auto", "flash", "math"):
            raise ValueError(f"ring_attention_backend must be 'auto', 'flash' or 'math', got {backend!r}")
        self.cpg, self.backend = cpg, backend

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = _expand_kv(k, v, q.shape[2])
        backend = _block_backend(q, self.backend)
        out = _RingAttention.apply(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                   v.transpose(1, 2).contiguous(), self.cpg, backend)
        return out.transpose(1, 2)
