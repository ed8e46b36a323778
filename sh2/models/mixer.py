"""The contract of an operator kind: the :class:`Mixer` base class and the declarations it carries.

Every layer of an SH2 model mixes along the sequence with one operator kind (Hyena-SE, -MR, -LI or MHA). A
kind is one :class:`Mixer` subclass, its home, which holds everything the rest of sh2 needs to know about it:

- what it computes: the parallel ``forward`` (training, scoring, prefill logits);
- its decoding: ``prefill`` (the parallel forward on a prompt plus the state after it) and ``step`` (one
  token from that state), pure PyTorch;
- its cost: ``flops_per_token`` (analytic FLOPs from the config) and ``block_working_set`` (the activation
  memory coefficient of a block of this kind);
- its :class:`OperatorKind`: the name and layout symbol, the sequence operation a context-parallel scheme
  replaces, and where Evo 2's checkpoint formats keep its tensors (:class:`Evo2Names`, data that the
  converters in ``sh2.checkpoints`` read).

:mod:`sh2.models.operators` lists the kinds; configs, inference, checkpoints, FLOPs and memory accounting
look a kind up there instead of comparing operator names.

Hyena streams are called ``q, k, v`` everywhere from the model to the kernels: ``q`` is the post-gate (Evo 2's
``x1``), ``k`` the pre-gate (``x2``), ``v`` the value, and every Hyena kind computes
``q * (conv_h(k * v) + Dskip * k * v)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sh2.models.seqops import LOCAL_OPS, SequenceOps

if TYPE_CHECKING:
    from sh2.models.config import SH2Config


class TensorForm(Enum):
    """How Evo 2's checkpoints store a mixer tensor relative to sh2's; each converter implements every form.

    Attributes:
        MATRIX: the same matrix under another name.
        VECTOR: the same vector under another name.
        STREAM_ROWS: the ``[3D, D]`` Hyena input projection. sh2 stores the streams stream-major (rows
            ``p*D + c`` for stream p = q, k, v) so that they are plain slices; Evo 2 interleaves them (row
            ``3c + p``).
        STREAM_TAPS: the ``[3D, K]`` featurizer: rows as :attr:`STREAM_ROWS`, taps in ``conv1d``
            orientation in Evo 2 (the last tap multiplies the current token) and causal in sh2.
        HEAD_ROWS: the fused attention projection: sh2 ``[q heads | k heads | v heads]``, Evo 2 per head
            ``[heads, (q, k, v), head_dim]``.
        FIR_TAPS: free grouped FIR taps ``[G, K]``, causal in sh2. Vortex stores filters shorter than 128
            taps in ``conv1d`` orientation (and gives longer ones a Dskip vector, zero here); Savanna always
            in ``conv1d`` orientation.
        DECAYED_FIR_TAPS: grouped taps ``hhat`` of a filter ``h = hhat * decay`` (the decay of sh2's
            :class:`~sh2.models.filters.DecayedFilter` for the config). Vortex stores ``h``, oriented as
            :attr:`FIR_TAPS`; Savanna stores ``hhat`` (longer than K) and its own decay.
        FIR_SKIP: the Dskip vector of a FIR filter. Vortex has one only for filters of 128 taps or more
            (shorter ones must have a zero skip); Savanna stores it as a vector.
        MODAL_RATE: ``p`` of the modal filter, ``log_poles = -exp(p) * exp(gamma)``. Vortex stores
            ``log_poles [D, N, 1]``; Savanna ``p`` itself (flattened).
        MODAL_SCALE: ``gamma`` of the modal filter: folded into Vortex's ``log_poles`` (read as 0);
            Savanna stores it (flattened).
        MODAL_RESIDUES: the residues ``R [D, N]`` (fp32 in every format; flattened in Savanna).
    """

    MATRIX = "matrix"
    VECTOR = "vector"
    STREAM_ROWS = "stream_rows"
    STREAM_TAPS = "stream_taps"
    HEAD_ROWS = "head_rows"
    FIR_TAPS = "fir_taps"
    DECAYED_FIR_TAPS = "decayed_fir_taps"
    FIR_SKIP = "fir_skip"
    MODAL_RATE = "modal_rate"
    MODAL_SCALE = "modal_scale"
    MODAL_RESIDUES = "modal_residues"


@dataclass(frozen=True)
class Evo2Tensor:
    """One mixer parameter and where Evo 2's two checkpoint formats keep it.

    Attributes:
        sh2: parameter name under ``blocks.{i}.mixer.``.
        vortex: key under ``blocks.{i}.`` in a Vortex (evo2 package) state dict.
        savanna: key under ``sequential.{i + 2}.`` in a Savanna (Evo 2 training code) state dict.
        form: how the stored tensor relates to sh2's.
        when: the boolean :class:`~sh2.models.SH2Config` field the parameter exists under (output biases),
            or None when it always exists.
    """

    sh2: str
    vortex: str
    savanna: str
    form: TensorForm
    when: str | None = None


@dataclass(frozen=True)
class ShapeField:
    """A config field that a checkpoint without a config reveals through a tensor shape: ``shape[dim]`` of
    the tensor under ``key`` (a key relative to the block, in the format's own names)."""

    field: str
    key: str
    dim: int


@dataclass(frozen=True)
class Evo2Names:
    """Where Evo 2 checkpoints keep the tensors of one operator kind.

    Attributes:
        vortex_layers: the Vortex config list of the layers of this kind (``hcs_layer_idxs``, ...).
        tensors: every parameter of the mixer, each once.
        vortex_keys: Vortex block keys that are all present only in a block of this kind (kinds with
            more keys are tried first: Vortex tells MR from SE by its Dskip vector).
        savanna_keys: the same for Savanna blocks; a kind with none is the one left when no other matches.
        vortex_sizes: config fields a Vortex block of this kind reveals by its shapes.
        savanna_sizes: config fields a Savanna block of this kind reveals by its shapes.
    """

    vortex_layers: str
    tensors: tuple[Evo2Tensor, ...]
    vortex_keys: tuple[str, ...]
    savanna_keys: tuple[str, ...]
    vortex_sizes: tuple[ShapeField, ...] = ()
    savanna_sizes: tuple[ShapeField, ...] = ()


@dataclass(frozen=True)
class OperatorKind:
    """What an operator kind is called and how the rest of sh2 refers to it, declared on its mixer class.

    Attributes:
        name: the canonical name, as in ``SH2Config.operators`` (``"SE"``).
        symbol: its character in the compact layout (``"S"``).
        aliases: other layout words for it (Evo 2's ``HCS``, ...).
        summary: what it computes, in one line.
        sequence_op: the :class:`~sh2.models.seqops.SequenceOps` method that mixes along the sequence
            (``"fir"``, ``"long_conv"`` or ``"attention"``): the operation a context-parallel scheme replaces.
        channel_groups: the :class:`~sh2.models.SH2Config` field counting the independent channel groups of
            that operation (filter groups, heads): a scheme that splits channels over ranks needs it divisible
            by the context-parallel size.
        evo2: where Evo 2 checkpoints keep its tensors.
    """

    name: str
    symbol: str
    aliases: tuple[str, ...]
    summary: str
    sequence_op: str
    channel_groups: str
    evo2: Evo2Names


class DecodeState(Protocol):
    """The decoding state of one layer (what :meth:`Mixer.prefill` returns and :meth:`Mixer.step` advances)."""

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some samples finished)."""


class Mixer(nn.Module):
    """Base class of the sequence mixers, one subclass per operator kind (see the module docstring).

    Sequence mixing goes through ``self.ops`` (single-process by default); context parallelism replaces it
    from outside (``sh2.strategies.parallelize``), so a mixer never sees ``torch.distributed``.
    """

    kind: ClassVar[OperatorKind]

    def __init__(self) -> None:
        super().__init__()
        self.ops: SequenceOps = LOCAL_OPS

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The parallel forward: ``x [B, L, D]`` -> ``[B, L, D]`` (``position_ids``: RoPE positions)."""
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, *, positions: torch.Tensor, valid: torch.Tensor | None = None,
                capacity: int = 0) -> tuple[torch.Tensor, DecodeState]:
        """The parallel forward on a prompt and the decoding state after it.

        Args:
            x: normalised block input ``[B, L, D]``.
            positions: RoPE positions ``[L]`` or ``[B, L]`` (real tokens counted, left padding excluded).
            valid: ``[B, L]``, False at left padding (None: nothing is padded). Padded positions must act as
                the zero history before a sequence.
            capacity: tokens the state should have room for (prompt + new tokens), where that matters.

        Returns:
            ``(out [B, L, D], state)``; without ``valid`` the output equals :meth:`forward` bit for bit.
        """
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: DecodeState, *, position: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step: ``x [B, 1, D]`` -> ``[B, 1, D]``, advancing ``state`` in place.

        Args:
            position: RoPE position of the new token per sample, ``[B]``.
            valid: ``[B, tokens so far + 1]`` key validity (False at left padding), or None.
        """
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, config: SH2Config, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token of this mixer at sequence length ``seq_len`` (a multiply-add is 2), by part:
        ``projections`` and ``mixer`` (plus ``featurizer`` for Hyena kinds)."""
        raise NotImplementedError

    @classmethod
    def block_working_set(cls, config: SH2Config) -> float:
        """Bytes per token and model channel of recomputing and back-propagating one block of this kind
        (mixer and MLP) under bf16 autocast: the activation-memory coefficient of ``sh2.training.memory``."""
        raise NotImplementedError

    @classmethod
    def context_window(cls, config: SH2Config) -> int | None:
        """Tokens each output of the sequence operation reads (current one included) when that is bounded
        (a FIR filter: its taps; a point-to-point CP scheme exchanges ``window - 1`` of them); None when an
        output reads its whole prefix."""
        return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of decoding, as in the reference kernels: float64 stays float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def last_steps(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` steps of ``x [B, L, C]`` as ``[B, C, n]``, oldest first (zero-padded on the left if
    L < n).

    Always a copy: a view would keep the whole prompt-length tensor alive in a decoding state (GBs per layer).
    """
    x = x[:, -n:].transpose(1, 2) if n > 0 else x[:, :0].transpose(1, 2)
    return F.pad(x, (n - x.shape[-1], 0)) if x.shape[-1] < n else x.clone(memory_format=torch.contiguous_format)
