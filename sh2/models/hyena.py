"""The Hyena operator kinds: Hyena-SE, Hyena-MR and Hyena-LI, each with its decoding and its cost.

Shared path (:class:`HyenaOperator`): ``W_in`` (D -> 3D) -> featurizer (depthwise causal conv, 3 taps) -> split
into the streams ``q`` (post-gate), ``k`` (pre-gate) and ``v`` (value) -> ``y = q * (conv_h(k * v) + Dskip * k * v)``
-> ``W_out`` (D -> D, bias). Evo 2 calls the streams ``x1, x2, v``; sh2 uses the kernels' ``q, k, v``
throughout. The kinds differ in the filter h:

- :class:`HyenaSE`: short explicit grouped filters (K = 7), no Dskip: FIR.
- :class:`HyenaMR`: medium grouped filters (K = 128) with a fixed exponential decay, Dskip: FIR.
- :class:`HyenaLI`: one modal filter per channel, as long as the sequence, Dskip: its exact recurrence (or an
  FFT convolution, ``li_algorithm: fft``).

Stream order. Evo 2 interleaves the three streams (projected channel ``3c + p`` is stream p). sh2 stores the
projection rows and featurizer taps *stream-major* instead (rows ``p*D + c``) so the three streams are plain
slices of one tensor and reach the kernels without a copy. The two orders are the same model; the checkpoint
converters permute rows (see :class:`~sh2.models.mixer.TensorForm`).

Decoding. With ``z = k * v``, a FIR kind keeps the last ``K - 1`` values of z; LI keeps its exact recurrence
``s_n <- lambda_n s_n + z_t``, ``conv_h(z)_t = sum_n R_n s_n`` with ``lambda_n = exp(log_pole_n)``, a state
``[B, D, N]``. Both keep the featurizer's last ``K_f - 1`` projected inputs. Steps use the same parameters in
the same precision as the reference kernels (fp32 accumulation), so stepwise outputs agree with the parallel
forward to fp32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from sh2.kernels.reference import expand_groups
from sh2.models.filters import DecayedFilter, ExplicitFilter, ModalFilter
from sh2.models.mixer import (
    Evo2Names,
    Evo2Tensor,
    Mixer,
    OperatorKind,
    ShapeField,
    TensorForm,
    compute_dtype,
    last_steps,
)

if TYPE_CHECKING:
    from sh2.models.config import SH2Config

# FLOPs of the pointwise work per channel and token of a Hyena operator: z = k*v, skip add, gate.
_GATE_FLOPS = 4
# LI prefill reduces the prompt in chunks of T tokens with D * N * T filter values at most.
_LI_CHUNK_ELEMENTS = 1 << 24

# The tensors every Hyena kind has, and where Evo 2 keeps them.
_HYENA_TENSORS = (
    Evo2Tensor("in_proj.weight", "projections.weight", "mixer.dense_projection.weight", TensorForm.STREAM_ROWS),
    Evo2Tensor("short_filter", "filter.short_filter_weight", "mixer.hyena_proj_conv.short_conv_weight",
               TensorForm.STREAM_TAPS),
    Evo2Tensor("out_proj.weight", "out_filter_dense.weight", "mixer.dense.weight", TensorForm.MATRIX),
    Evo2Tensor("out_proj.bias", "out_filter_dense.bias", "mixer.dense.bias", TensorForm.VECTOR, when="hyena_out_bias"),
)
_FEATURIZER_SIZE = (ShapeField("featurizer_len", "filter.short_filter_weight", -1),)


@dataclass
class FIRState:
    """Decoding state of a FIR filter (SE, MR): the last ``K - 1`` values of z, ``window [B, D, K - 1]``
    (fp32, oldest first), and the per-channel taps reversed (oldest first), ``taps [D, K]``."""

    window: torch.Tensor
    taps: torch.Tensor

    def select(self, index: torch.Tensor) -> None:
        self.window = self.window[index]


@dataclass
class ModalState:
    """Decoding state of the modal filter (LI): ``s [B, D, N]`` (fp32) and the filter's per-token decays
    ``lam = exp(log_poles)`` and residues, ``[D, N]`` each."""

    s: torch.Tensor
    lam: torch.Tensor
    residues: torch.Tensor

    def select(self, index: torch.Tensor) -> None:
        self.s = self.s[index]


@dataclass
class HyenaCache:
    """Decoding state of one Hyena layer.

    Attributes:
        featurizer: the last ``K_f - 1`` projected inputs per channel, ``[B, 3D, K_f - 1]``, oldest first.
        filter: the state of the inner filter (:class:`FIRState` or :class:`ModalState`).
    """

    featurizer: torch.Tensor
    filter: FIRState | ModalState

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some samples finished)."""
        self.featurizer = self.featurizer[index]
        self.filter.select(index)


def li_prefill_state(z: torch.Tensor, log_poles: torch.Tensor) -> torch.Tensor:
    """LI state after a prompt: ``s[b, d, n] = sum_t exp(log_poles[d, n] * (L - 1 - t)) * z[b, t, d]``.

    Args:
        z: gated input ``[B, L, D]`` (fp32/fp64). Padded positions must already be zero.
        log_poles: ``[D, N]`` (negative).

    Returns:
        ``[B, D, N]`` in the dtype of ``z``. Computed in chunks of T tokens with ``D * N * T <= 2^24``: never
        a ``[B, D, N, L]`` tensor.
    """
    B, L, D = z.shape
    N = log_poles.shape[1]
    lp = log_poles.to(z.dtype)
    state = torch.zeros(B, D, N, dtype=z.dtype, device=z.device)
    step = max(1, _LI_CHUNK_ELEMENTS // max(1, D * N))
    for t0 in range(0, L, step):
        t1 = min(L, t0 + step)
        age = (L - 1 - torch.arange(t0, t1, device=z.device, dtype=z.dtype))
        weights = torch.exp(lp[:, :, None] * age)  # [D, N, T]
        state += torch.einsum("btd,dnt->bdn", z[:, t0:t1], weights)
    return state


def fft_conv_flops_per_token(seq_len: int) -> float:
    """Per channel and token: a real FFT and an inverse real FFT of size 2L (2.5 N log2 N each) plus the
    complex product of the spectra (6 FLOPs per bin). The filter's FFT is amortised over the batch."""
    n = 2 * seq_len
    return (2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / seq_len


class HyenaOperator(Mixer):
    """Base class of the Hyena kinds: projection, featurizer, gate-conv-gate, output projection.

    A subclass makes its filter and defines the three things that depend on it: :meth:`mix` (the parallel
    gated convolution), :meth:`mix_with_state` (the same plus the filter's decoding state after it) and
    :meth:`filter_step` (one token of the convolution from that state).
    """

    has_skip: ClassVar[bool] = True

    def __init__(self, config: SH2Config, out_std: float) -> None:
        super().__init__()
        D = config.hidden_size
        self.hidden_size = D
        self.in_proj = nn.Linear(D, 3 * D, bias=False)
        self.short_filter = nn.Parameter(torch.empty(3 * D, config.featurizer_len))
        self.filter = self.make_filter(config)
        self.skip = nn.Parameter(torch.empty(D)) if self.has_skip else None
        self.out_proj = nn.Linear(D, D, bias=config.hyena_out_bias)
        self.init_std, self.out_std = config.init_std, out_std
        self.reset_parameters()

    def make_filter(self, config: SH2Config) -> nn.Module:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, std=self.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.out_std)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        bound = 1.0 / math.sqrt(self.short_filter.shape[1])
        nn.init.uniform_(self.short_filter, -bound, bound)
        if self.skip is not None:
            nn.init.ones_(self.skip)

    def streams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projection and featurizer; returns the views ``(q, k, v)``, each ``[B, L, D]``."""
        u = self.ops.short_conv(self.in_proj(x), self.short_filter)
        return u.split(self.hidden_size, dim=-1)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q * (conv_h(k * v) + Dskip * k * v)`` over the whole sequence, ``[B, L, D]``."""
        raise NotImplementedError

    def mix_with_state(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                       ) -> tuple[torch.Tensor, FIRState | ModalState]:
        """:meth:`mix` and the filter's decoding state after the last token (prefill)."""
        raise NotImplementedError

    def filter_step(self, z: torch.Tensor, state: FIRState | ModalState) -> torch.Tensor:
        """``conv_h(z)`` at a new token from ``z [B, D]`` (compute dtype), advancing ``state`` in place."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.streams(x)
        return self.out_proj(self.mix(q, k, v))

    def prefill(self, x: torch.Tensor, *, positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                capacity: int = 0) -> tuple[torch.Tensor, HyenaCache]:
        # Zeroing the projected inputs at left padding gives every convolution the zero history it has at the
        # start of a sequence. A Hyena state has a fixed size and no positions: positions and capacity are unused.
        p = self.in_proj(x)
        if valid is not None:
            p = p * valid[..., None].to(p.dtype)
        q, k, v = self.ops.short_conv(p, self.short_filter).split(self.hidden_size, dim=-1)
        y, filter_state = self.mix_with_state(q, k, v)
        return self.out_proj(y), HyenaCache(last_steps(p, self.short_filter.shape[1] - 1), filter_state)

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: HyenaCache, *, position: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        cd = compute_dtype(x.dtype)
        p = self.in_proj(x)[:, 0]  # [B, 3D]
        window = torch.cat([state.featurizer, p[..., None]], dim=-1)  # [B, 3D, K_f], oldest first
        state.featurizer = window[..., 1:]
        u = (window.to(cd) * self.short_filter.to(cd).flip(-1)).sum(-1).to(x.dtype)
        q, k, v = u.split(self.hidden_size, dim=-1)
        z = k.to(cd) * v.to(cd)  # [B, D]
        y = self.filter_step(z, state.filter)
        if self.skip is not None:
            y = y + self.skip.to(cd) * z
        return self.out_proj((q.to(cd) * y).to(x.dtype)[:, None])

    @classmethod
    def filter_flops_per_channel(cls, config: SH2Config, seq_len: int) -> float:
        """FLOPs per token and channel of ``conv_h``."""
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, config: SH2Config, seq_len: int) -> dict[str, float]:
        D = config.hidden_size
        return {"projections": 2 * D * 3 * D + 2 * D * D, "featurizer": 2 * 3 * D * config.featurizer_len,
                "mixer": D * (cls.filter_flops_per_channel(config, seq_len) + _GATE_FLOPS)}

    @classmethod
    def block_working_set(cls, config: SH2Config) -> float:
        # Not measured alone for SE and MR: taken as attention's (same MLP, a lighter mixer).
        return 49.7


class HyenaFIR(HyenaOperator):
    """A Hyena kind whose filter is a grouped FIR filter ``h [G, K]`` (SE, MR): the gated FIR kernels in
    parallel, a window of the last ``K - 1`` values of z when decoding."""

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ops.fir(q, k, v, self.filter.weight(), self.skip)

    def mix_with_state(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, FIRState]:
        y = self.mix(q, k, v)
        cd = compute_dtype(q.dtype)
        h = self.filter.weight().to(cd)
        z = k.to(cd) * v.to(cd)
        return y, FIRState(window=last_steps(z, h.shape[1] - 1), taps=expand_groups(h, self.hidden_size).flip(-1))

    def filter_step(self, z: torch.Tensor, state: FIRState) -> torch.Tensor:
        window = torch.cat([state.window, z[..., None]], dim=-1)  # [B, D, K]
        state.window = window[..., 1:]
        return (window * state.taps).sum(-1)

    @classmethod
    def filter_flops_per_channel(cls, config: SH2Config, seq_len: int) -> float:
        return 2 * cls.context_window(config)


class HyenaSE(HyenaFIR):
    """Hyena-SE: short explicit filters (K = 7), grouped; no Dskip."""

    kind = OperatorKind(
        name="SE", symbol="S", aliases=("HCS",), summary="Hyena-SE: short explicit grouped FIR filters, no Dskip",
        sequence_op="fir", channel_groups="se_groups",
        evo2=Evo2Names(
            vortex_layers="hcs_layer_idxs",
            tensors=(*_HYENA_TENSORS,
                     Evo2Tensor("filter.h", "filter.h", "mixer.mixer.short_conv.short_conv_weight",
                                TensorForm.FIR_TAPS)),
            vortex_keys=("filter.h",),
            savanna_keys=("mixer.mixer.short_conv.short_conv_weight",),
            vortex_sizes=(*_FEATURIZER_SIZE, ShapeField("se_groups", "filter.h", 0),
                          ShapeField("se_filter_len", "filter.h", -1)),
            savanna_sizes=(ShapeField("se_groups", "mixer.mixer.short_conv.short_conv_weight", 0),
                           ShapeField("se_filter_len", "mixer.mixer.short_conv.short_conv_weight", -1))))
    has_skip = False

    def make_filter(self, config: SH2Config) -> nn.Module:
        return ExplicitFilter(config.se_groups, config.se_filter_len)

    @classmethod
    def context_window(cls, config: SH2Config) -> int:
        return config.se_filter_len


class HyenaMR(HyenaFIR):
    """Hyena-MR: medium regularized filters (K = 128) with a fixed exponential decay, grouped; Dskip."""

    kind = OperatorKind(
        name="MR", symbol="D", aliases=("HCM",),
        summary="Hyena-MR: medium grouped FIR filters with a fixed exponential decay, Dskip",
        sequence_op="fir", channel_groups="mr_groups",
        evo2=Evo2Names(
            vortex_layers="hcm_layer_idxs",
            tensors=(*_HYENA_TENSORS,
                     Evo2Tensor("filter.h", "filter.h", "mixer.mixer.filter.h", TensorForm.DECAYED_FIR_TAPS),
                     Evo2Tensor("skip", "filter.D", "mixer.mixer.conv_bias", TensorForm.FIR_SKIP)),
            vortex_keys=("filter.h", "filter.D"),
            savanna_keys=("mixer.mixer.filter.h",),
            vortex_sizes=(*_FEATURIZER_SIZE, ShapeField("mr_groups", "filter.h", 0),
                          ShapeField("mr_filter_len", "filter.h", -1)),
            savanna_sizes=(ShapeField("mr_groups", "mixer.mixer.filter.h", 0),)))

    def make_filter(self, config: SH2Config) -> nn.Module:
        return DecayedFilter(config.mr_groups, config.mr_filter_len, config.mr_decay, config.mr_ref_len)

    @classmethod
    def context_window(cls, config: SH2Config) -> int:
        return config.mr_filter_len


class HyenaLI(HyenaOperator):
    """Hyena-LI: long implicit filters (modal, one per channel, as long as the sequence); Dskip.

    The filter is ``h[c, t] = sum_n R[c, n] * lambda[c, n]^t``, so the convolution has an exact recurrence
    (see the module docstring). With ``li_algorithm: modal`` (the default) training, scoring and prefill run
    that recurrence (:meth:`SequenceOps.modal_conv <sh2.models.seqops.SequenceOps.modal_conv>`), and prefill hands
    its final state to decoding; with ``fft`` they run an fp32 FFT convolution with the materialised filter
    (:meth:`SequenceOps.long_conv <sh2.models.seqops.SequenceOps.long_conv>`). Decoding always steps the
    recurrence.
    """

    kind = OperatorKind(
        name="LI", symbol="H", aliases=("HCL",), summary="Hyena-LI: one modal filter per channel, sequence-long, Dskip",
        sequence_op="long_conv", channel_groups="hidden_size",
        evo2=Evo2Names(
            vortex_layers="hcl_layer_idxs",
            tensors=(*_HYENA_TENSORS,
                     Evo2Tensor("filter.p", "filter.log_poles", "mixer.mixer.filter.p", TensorForm.MODAL_RATE),
                     Evo2Tensor("filter.gamma", "filter.log_poles", "mixer.mixer.filter.gamma", TensorForm.MODAL_SCALE),
                     Evo2Tensor("filter.R", "filter.residues", "mixer.mixer.filter.R", TensorForm.MODAL_RESIDUES),
                     Evo2Tensor("skip", "filter.D", "mixer.mixer.conv_bias", TensorForm.VECTOR)),
            vortex_keys=("filter.log_poles",),
            savanna_keys=("mixer.mixer.filter.R",),
            vortex_sizes=(*_FEATURIZER_SIZE, ShapeField("li_state_size", "filter.log_poles", 1))))

    def make_filter(self, config: SH2Config) -> nn.Module:
        return ModalFilter(config.hidden_size, config.li_state_size)

    def __init__(self, config: SH2Config, out_std: float) -> None:
        super().__init__(config, out_std)
        self.algorithm = config.li_algorithm

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.algorithm == "modal":
            return self.ops.modal_conv(q, k, v, self.filter.log_poles(), self.filter.residues(), self.skip)
        return self.ops.long_conv(q, k, v, self.filter.log_poles(), self.filter.residues(), self.skip)

    def mix_with_state(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ModalState]:
        cd = compute_dtype(q.dtype)
        log_poles = self.filter.log_poles().to(cd)
        residues = self.filter.residues().to(cd)
        if self.algorithm == "modal":  # the recurrence hands its final state to decoding
            y, s = self.ops.modal_conv(q, k, v, self.filter.log_poles(), self.filter.residues(), self.skip,
                                       return_state=True)
            return y, ModalState(s.to(cd), torch.exp(log_poles), residues)
        # The FFT convolution does not produce the recurrent state: it is reduced from z separately, in chunks.
        y = self.mix(q, k, v)
        z = k.to(cd) * v.to(cd)
        return y, ModalState(li_prefill_state(z, log_poles), torch.exp(log_poles), residues)

    def filter_step(self, z: torch.Tensor, state: ModalState) -> torch.Tensor:
        state.s = state.lam * state.s + z[..., None]
        return (state.s * state.residues).sum(-1)

    @classmethod
    def filter_flops_per_channel(cls, config: SH2Config, seq_len: int) -> float:
        if config.li_algorithm == "modal":  # per pole: the state update and the readout, a multiply-add each
            return 4 * config.li_state_size
        return fft_conv_flops_per_token(seq_len)

    @classmethod
    def block_working_set(cls, config: SH2Config) -> float:
        if config.li_algorithm == "modal":
            # The recurrence keeps no fp32 sequence-length buffers: like an SE/MR block (see HyenaOperator).
            return super().block_working_set(config)
        # Measured at the 7B width (H100/H200, bf16 autocast): the fp32 FFT convolution dominates.
        return 91.6
