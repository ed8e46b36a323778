"""Communication primitives of context parallelism, each differentiable.

Every helper works on the zig-zag layout (docs/design.md, "Zig-zag sharding"): a sequence of length ``L``
is cut into ``2*cp`` chunks of ``c = L / (2*cp)`` tokens and rank ``r`` holds chunks ``r`` and ``2*cp-1-r``
(called A and B below), concatenated, so a local activation is ``[B, 2c, C]``.

- :func:`seq_to_channel` / :func:`channel_to_seq`: the all-to-all that turns ``[B, 2c, C]`` (sequence
  shards) into ``[B, L, C/cp]`` (the whole sequence in natural order, a contiguous channel slice) and back.
  Each is the adjoint of the other, so each one's backward is the other.
- :func:`exchange`: swap a tensor with a partner rank (a pairwise butterfly exchange); self-adjoint.
- :func:`halo_exchange` / :func:`start_halo_exchange`: the last ``H`` rows of the causally preceding
  chunk, for each of the two local chunks; the backward returns the halo gradients to their owners.

All collectives go through ``torch.distributed`` on the group of a :class:`CPGroup`, with NCCL on GPUs and
gloo on CPU (both support all-to-all and batched point-to-point). The blocking ones (the all-to-all and the
halo exchange) are ``sh2::`` custom operators, which dynamo records as calls instead of breaking the graph at
``torch.distributed``: under activation checkpointing a graph break inside a block makes dynamo run the whole
block eagerly (docs/design.md, "Composition with FSDP2 and DeepSpeed").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import Function

_KEYS = itertools.count()
_GROUPS: dict[str, CPGroup] = {}


def registered_group(key: str) -> CPGroup:
    """The CPGroup registered under ``key`` in this process (the custom operators' group argument)."""
    try:
        return _GROUPS[key]
    except KeyError:
        raise RuntimeError(f"no CPGroup is registered as {key!r} in this process: build the CPGroup in the process "
                           "that communicates (CPGroup.from_group), not in another one") from None


@dataclass
class CPGroup:
    """A context-parallel process group and this process's place in it.

    Attributes:
        group: the process group of the CP ranks (``None`` = the default group).
        rank: rank inside the group (its zig-zag index).
        size: number of ranks ``cp``.
        global_ranks: global rank of every group rank (for point-to-point peers).
    """

    group: Any
    rank: int
    size: int
    global_ranks: list[int] = field(default_factory=list)
    # The name the custom operators know this group by: operators take strings, not process groups. Registered
    # when the group is built (eagerly), never from traced code, where the registration would be a side effect.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.key = f"cp{next(_KEYS)}"
        _GROUPS[self.key] = self

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy (or an unpickled group in another process) registers itself under a key of its own
        return type(self), (self.group, self.rank, self.size, list(self.global_ranks))

    @classmethod
    def from_group(cls, group: Any = None) -> CPGroup:
        """Describe an initialised process group (``None`` = world)."""
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        ranks = [dist.get_global_rank(group, i) if group is not None else i for i in range(size)]
        return cls(group=group, rank=rank, size=size, global_ranks=ranks)

    def peer(self, group_rank: int) -> int:
        """Global rank of a group rank."""
        return self.global_ranks[group_rank]


# ----------------------------------------------------------------------------------------------- layouts
def pack_seq_to_channel(x: torch.Tensor, cp: int) -> torch.Tensor:
    """``[B, 2c, C]`` -> send buffer ``[cp, B, 2c, C/cp]`` (slice j goes to rank j)."""
    B, S, C = x.shape
    return x.reshape(B, S, cp, C // cp).permute(2, 0, 1, 3).contiguous()


def unpack_seq_to_channel(buf: torch.Tensor) -> torch.Tensor:
    """Received ``[cp, B, 2c, d]`` (row = source rank) -> ``[B, L, d]`` in natural sequence order."""
    cp, B, S, d = buf.shape
    c = S // 2
    chunks = torch.cat([buf[:, :, :c], buf[:, :, c:].flip(0)], dim=0)  # chunk i = row i of [2cp, B, c, d]
    return chunks.permute(1, 0, 2, 3).reshape(B, 2 * cp * c, d)


def pack_channel_to_seq(y: torch.Tensor, cp: int) -> torch.Tensor:
    """``[B, L, d]`` natural order -> send buffer ``[cp, B, 2c, d]`` (row j = chunks j and 2cp-1-j)."""
    B, L, d = y.shape
    c = L // (2 * cp)
    chunks = y.reshape(B, 2 * cp, c, d).permute(1, 0, 2, 3)
    return torch.cat([chunks[:cp], chunks[cp:].flip(0)], dim=2).contiguous()


def unpack_channel_to_seq(buf: torch.Tensor) -> torch.Tensor:
    """Received ``[cp, B, 2c, d]`` (row = source rank's channel slice) -> ``[B, 2c, cp*d]``."""
    cp, B, S, d = buf.shape
    return buf.permute(1, 2, 0, 3).reshape(B, S, cp * d)


def all_to_all(buf: torch.Tensor, cpg: CPGroup, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """All-to-all over dim 0 of a contiguous ``[cp, ...]`` buffer; returns ``(received, work or None)``.

    A 1-rank group still calls the collective (so ``force_cp_ops`` exercises the NCCL path on one GPU).
    """
    out = torch.empty_like(buf)
    work = dist.all_to_all_single(out, buf, group=cpg.group, async_op=async_op)
    return out, work


@torch.library.custom_op("sh2::cp_all_to_all", mutates_args=())
def all_to_all_op(buf: torch.Tensor, group: str) -> torch.Tensor:
    """All-to-all over dim 0 of ``buf [cp, ...]`` in the registered CPGroup ``group`` (self-adjoint)."""
    return all_to_all(buf.contiguous(), registered_group(group))[0]


@all_to_all_op.register_fake
def _(buf, group):
    return torch.empty_like(buf, memory_format=torch.contiguous_format)


def _all_to_all_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    # chunk j of rank i goes to chunk i of rank j: the adjoint sends every gradient chunk back the same way
    return all_to_all_op(grad, ctx.group), None


def _all_to_all_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group = inputs[1]


all_to_all_op.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


@torch.library.custom_op("sh2::cp_all_gather", mutates_args=())
def all_gather_op(x: torch.Tensor, group: str) -> torch.Tensor:
    """``[cp, *x.shape]``, row i from group rank i of the registered CPGroup ``group``."""
    cpg = registered_group(group)
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(cpg.size)]
    dist.all_gather(out, x.contiguous(), group=cpg.group)
    return torch.stack(out)


@all_gather_op.register_fake
def _(x, group):
    return x.new_empty(registered_group(group).size, *x.shape)


@torch.library.custom_op("sh2::cp_all_gather_backward", mutates_args=())
def all_gather_backward_op(grad: torch.Tensor, group: str) -> torch.Tensor:
    """The gradient of a rank's slice of :func:`all_gather_op`: every rank's gradient for it, summed."""
    cpg = registered_group(group)
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=cpg.group)
    return grad[cpg.rank].clone()


@all_gather_backward_op.register_fake
def _(grad, group):
    return grad.new_empty(grad.shape[1:])


def _all_gather_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.group = inputs[1]


all_gather_op.register_autograd(lambda ctx, grad: (all_gather_backward_op(grad, ctx.group), None),
                                setup_context=_all_gather_setup)


def all_gather(x: torch.Tensor, cpg: CPGroup) -> torch.Tensor:
    """Differentiable all-gather: ``[cp, *x.shape]``, row i from group rank i; the gradient of a rank's slice is
    the sum of every rank's gradient for it."""
    return all_gather_op(x, cpg.key)


def seq_to_channel(x: torch.Tensor, cpg: CPGroup) -> torch.Tensor:
    """Zig-zag sequence shards ``[B, 2c, C]`` -> whole sequence, channel slice ``[B, L, C/cp]``."""
    if x.shape[-1] % cpg.size:
        raise ValueError(f"seq_to_channel: width {x.shape[-1]} is not divisible by cp={cpg.size}")
    return unpack_seq_to_channel(all_to_all_op(pack_seq_to_channel(x, cpg.size), cpg.key))


def channel_to_seq(y: torch.Tensor, cpg: CPGroup) -> torch.Tensor:
    """Whole sequence, channel slice ``[B, L, C/cp]`` -> zig-zag sequence shards ``[B, 2c, C]``."""
    return unpack_channel_to_seq(all_to_all_op(pack_channel_to_seq(y, cpg.size), cpg.key))


# ------------------------------------------------------------------------------------- point to point
def _real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def batch_p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], cpg: CPGroup,
              tag: int = 0) -> list[Any]:
    """Post isend/irecv pairs (peers are group ranks) as one batch; returns the work handles."""
    ops = [dist.P2POp(dist.isend, _real_view(t), cpg.peer(p), cpg.group, tag) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, _real_view(t), cpg.peer(p), cpg.group, tag) for t, p in recvs]
    if not ops:
        return []
    return list(dist.batch_isend_irecv(ops))


def wait_all(works: list[Any]) -> None:
    for w in works:
        w.wait()


def _sendrecv(x: torch.Tensor, peer: int, cpg: CPGroup) -> torch.Tensor:
    if peer == cpg.rank:
        return x
    x = x.contiguous()
    out = torch.empty_like(x)
    wait_all(batch_p2p([(x, peer)], [(out, peer)], cpg))
    return out


class _Exchange(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, peer: int, cpg: CPGroup) -> torch.Tensor:
        ctx.peer, ctx.cpg = peer, cpg
        out = _sendrecv(x, peer, cpg)
        return out.clone() if out is x else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _sendrecv(grad, ctx.peer, ctx.cpg), None, None


def exchange(x: torch.Tensor, peer: int, cpg: CPGroup) -> torch.Tensor:
    """Send ``x`` to group rank ``peer`` and return the peer's tensor of the same shape (a swap)."""
    return _Exchange.apply(x, peer, cpg)


# ------------------------------------------------------------------------------------------------ halos
class PendingWork:
    """Work handles of an exchange still in flight; :meth:`wait` before reading its buffers."""

    def __init__(self) -> None:
        self.works: list[Any] = []

    def wait(self) -> None:
        wait_all(self.works)
        self.works = []


def _post_halos(u: torch.Tensor, H: int, cpg: CPGroup) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """Start the forward halo exchange of ``u [B, 2c, C]``; returns the (still filling) halos and works."""
    r, cp = cpg.rank, cpg.size
    B, S, C = u.shape
    c = S // 2
    tail_a, tail_b = u[:, c - H:c].contiguous(), u[:, S - H:].contiguous()
    halo_a = u.new_zeros(B, H, C)
    halo_b = tail_a.clone() if r == cp - 1 else u.new_empty(B, H, C)
    sends, recvs = [], []
    if r < cp - 1:  # my chunk A precedes rank r+1's chunk A; rank r+1's chunk B precedes my chunk B
        sends.append((tail_a, r + 1))
        recvs.append((halo_b, r + 1))
    if r > 0:
        sends.append((tail_b, r - 1))
        recvs.append((halo_a, r - 1))
    return halo_a, halo_b, batch_p2p(sends, recvs, cpg, tag=11)


def _halo_backward(g_a: torch.Tensor, g_b: torch.Tensor, S: int, cpg: CPGroup) -> torch.Tensor:
    """Return the halo gradients to their owners; the gradient of the local ``[B, 2c, C]`` input."""
    r, cp = cpg.rank, cpg.size
    B, H, C = g_a.shape
    c = S // 2
    grad = g_a.new_zeros(B, S, C)
    got_a, got_b = g_a.new_zeros(B, H, C), g_a.new_zeros(B, H, C)
    sends, recvs = [], []
    if r > 0:
        sends.append((g_a.contiguous(), r - 1))
        recvs.append((got_b, r - 1))
    if r < cp - 1:
        sends.append((g_b.contiguous(), r + 1))
        recvs.append((got_a, r + 1))
    wait_all(batch_p2p(sends, recvs, cpg, tag=12))
    if r == cp - 1:
        got_a = got_a + g_b
    grad[:, c - H:c] += got_a
    grad[:, S - H:] += got_b
    return grad


class _HaloExchange(Function):
    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, H: int, cpg: CPGroup, pending: PendingWork | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.H, ctx.cpg, ctx.S = H, cpg, u.shape[1]
        halo_a, halo_b, works = _post_halos(u, H, cpg)
        if pending is None:
            wait_all(works)
        else:
            pending.works.extend(works)
        return halo_a, halo_b

    @staticmethod
    def backward(ctx: Any, g_a: torch.Tensor, g_b: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _halo_backward(g_a, g_b, ctx.S, ctx.cpg), None, None, None


def check_halo(H: int, chunk: int, what: str, cp: int) -> None:
    """Raise a clear error when a halo of ``H`` rows needs more than one preceding chunk."""
    if H > chunk:
        raise ValueError(
            f"{what}: a filter of {H + 1} taps needs the {H} preceding tokens, but each zig-zag chunk holds only "
            f"{chunk} tokens (sequence length {2 * cp * chunk}, cp.size={cp}). Use sequences of at "
            f"least {2 * cp * H} tokens, or the 'a2a' scheme for this operator.")


@torch.library.custom_op("sh2::cp_halo_exchange", mutates_args=())
def halo_exchange_op(u: torch.Tensor, H: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocking halo exchange of ``u [B, 2c, C]`` in the registered CPGroup ``group``."""
    halo_a, halo_b, works = _post_halos(u, H, registered_group(group))
    wait_all(works)
    return halo_a, halo_b


@halo_exchange_op.register_fake
def _(u, H, group):
    return u.new_empty(u.shape[0], H, u.shape[2]), u.new_empty(u.shape[0], H, u.shape[2])


@torch.library.custom_op("sh2::cp_halo_exchange_backward", mutates_args=())
def halo_exchange_backward_op(g_a: torch.Tensor, g_b: torch.Tensor, S: int, group: str) -> torch.Tensor:
    """The gradient of the local ``[B, S, C]`` input of :func:`halo_exchange_op` from the halo gradients."""
    return _halo_backward(g_a, g_b, S, registered_group(group))


@halo_exchange_backward_op.register_fake
def _(g_a, g_b, S, group):
    return g_a.new_empty(g_a.shape[0], S, g_a.shape[2])


def _halo_op_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.S, ctx.group = inputs[0].shape[1], inputs[2]


def _halo_op_backward(ctx: Any, g_a: torch.Tensor, g_b: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    return halo_exchange_backward_op(g_a, g_b, ctx.S, ctx.group), None, None


halo_exchange_op.register_autograd(_halo_op_backward, setup_context=_halo_op_setup)


def halo_exchange(u: torch.Tensor, H: int, cpg: CPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``H`` rows preceding each local chunk of ``u [B, 2c, C]`` (zeros before the first token).

    Returns:
        ``(halo_a, halo_b)``, each ``[B, H, C]``: the inputs that causally precede chunk A and chunk B.
    """
    return halo_exchange_op(u, H, cpg.key)


def start_halo_exchange(u: torch.Tensor, H: int, cpg: CPGroup) -> tuple[torch.Tensor, torch.Tensor, PendingWork]:
    """Like :func:`halo_exchange` but returns at once; call ``pending.wait()`` before reading the halos."""
    pending = PendingWork()
    halo_a, halo_b = _HaloExchange.apply(u, H, cpg, pending)
    return halo_a, halo_b, pending
