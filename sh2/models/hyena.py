"""The Hyena operators: Hyena-SE, Hyena-MR and Hyena-LI (SPEC 1.2).

Shared path: ``W_in`` (D -> 3D) -> featurizer (depthwise causal conv, 3 taps) -> split into x1, x2, v
-> ``y = x1 * (conv_h(x2 * v) + Dskip * x2 * v)`` -> ``W_out`` (D -> D, bias).

Stream order. Evo 2 interleaves the three streams (projected channel ``3c + p`` is stream p). sh2
stores the projection rows and featurizer taps *stream-major* instead (rows ``p*D + c``) so the three
streams are plain slices of one tensor and reach the kernels without a copy. The two orders are the same
model; ``sh2.checkpoints`` permutes rows at the checkpoint boundary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sh2.models.config import SH2Config
from sh2.models.filters import DecayedFilter, ExplicitFilter, ModalFilter
from sh2.models.seqops import LOCAL_OPS, SequenceOps


class HyenaOperator(nn.Module):
    """Base class: projection, featurizer, gate-conv-gate, output projection."""

    kind = "hyena"
    has_skip = True

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
        self.ops: SequenceOps = LOCAL_OPS
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
        """Projection and featurizer; returns the views (x1, x2, v), each ``[B, L, D]``."""
        u = self.ops.short_conv(self.in_proj(x), self.short_filter)
        return u.split(self.hidden_size, dim=-1)

    def mix(self, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x1, x2, v = self.streams(x)
        return self.out_proj(self.mix(x1, x2, v))


class HyenaSE(HyenaOperator):
    """Short explicit filters (K = 7), grouped; no Dskip term."""

    kind = "SE"
    has_skip = False

    def make_filter(self, config: SH2Config) -> nn.Module:
        return ExplicitFilter(config.se_groups, config.se_filter_len)

    def mix(self, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ops.fir(x1, x2, v, self.filter.weight(), None)


class HyenaMR(HyenaOperator):
    """Medium regularized filters (K = 128) with a fixed exponential decay, grouped; Dskip."""

    kind = "MR"

    def make_filter(self, config: SH2Config) -> nn.Module:
        return DecayedFilter(config.mr_groups, config.mr_filter_len, config.mr_decay, config.mr_ref_len)

    def mix(self, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ops.fir(x1, x2, v, self.filter.weight(), self.skip)


class HyenaLI(HyenaOperator):
    """Long implicit filters (modal, one per channel, as long as the sequence); Dskip; FFT convolution."""

    kind = "LI"

    def make_filter(self, config: SH2Config) -> nn.Module:
        return ModalFilter(config.hidden_size, config.li_state_size)

    def mix(self, x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ops.long_conv(x1, x2, v, self.filter.log_poles(), self.filter.residues(), self.skip)
