"""Filter parametrizations of the Hyena operators, all in causal orientation (tap 0 = current token).

- :class:`ExplicitFilter` (Hyena-SE): free taps ``h [G, K]``.
- :class:`DecayedFilter` (Hyena-MR): ``h[g, t] = hhat[g, t] * exp(-r_g * t / (T_ref - 1))`` with rates r_g
  swept log-uniformly over the groups; T_ref is a config constant so the decay never depends on the
  batch length.
- :class:`ModalFilter` (Hyena-LI): ``h[c, t] = sum_n R[c, n] * exp(log_pole[c, n] * t)`` with
  ``log_pole = -exp(p) * exp(gamma)``; p, gamma, R are fp32 parameters and the filter is built for the
  current length on the fly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sh2 import kernels

# (slowest, fastest) decay rate of each MR decay preset (SH2Config.mr_decay).
MR_DECAY_PRESETS = {"weak": (1e-2, 1e2), "normal": (1e-1, 1e2), "strong": (1.0, 1e2)}


def mr_decay_range(preset: str) -> tuple[float, float]:
    """(slowest, fastest) decay rate of the MR preset."""
    return MR_DECAY_PRESETS[preset]


class ExplicitFilter(nn.Module):
    """Free grouped filter taps ``h [G, K]``."""

    def __init__(self, groups: int, length: int) -> None:
        super().__init__()
        self.h = nn.Parameter(torch.empty(groups, length))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.h.shape[1])
        nn.init.uniform_(self.h, -bound, bound)

    def weight(self) -> torch.Tensor:
        return self.h


class DecayedFilter(nn.Module):
    """Grouped taps times a fixed exponential decay (Hyena-MR)."""

    def __init__(self, groups: int, length: int, decay: str = "weak", ref_len: int = 8192) -> None:
        super().__init__()
        self.h = nn.Parameter(torch.empty(groups, length))
        self.decay_preset, self.ref_len = decay, ref_len
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.h.normal_(0.0, 1.0 / math.sqrt(self.h.shape[1])).mul_(1e-5)

    def decay(self, device: torch.device | None = None) -> torch.Tensor:
        """``exp(-r_g * t / (T_ref - 1))``, ``[G, K]`` float32."""
        G, K = self.h.shape
        lo, hi = mr_decay_range(self.decay_preset)
        rates = torch.logspace(math.log10(lo), math.log10(hi), G, device=device, dtype=torch.float32)
        t = torch.arange(K, device=device, dtype=torch.float32) / (self.ref_len - 1)
        return torch.exp(-rates[:, None] * t[None, :])

    def weight(self) -> torch.Tensor:
        return self.h * self.decay(self.h.device).to(self.h.dtype)


class ModalFilter(nn.Module):
    """Per-channel sum of ``state_size`` decaying real exponentials (Hyena-LI)."""

    def __init__(self, channels: int, state_size: int = 16) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.empty(channels, state_size, dtype=torch.float32))
        self.gamma = nn.Parameter(torch.empty(channels, state_size, dtype=torch.float32))
        self.R = nn.Parameter(torch.empty(channels, state_size, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.p.fill_(-1.0)
            self.gamma.uniform_(0.01, 0.1).log_()
            self.R.normal_().mul_(0.1 / math.sqrt(self.R.shape[1]))

    def log_poles(self) -> torch.Tensor:
        """``-exp(p) * exp(gamma)`` (fp32): per-token decay is ``exp(log_poles)`` in (0, 1)."""
        return -torch.exp(self.p.float()) * torch.exp(self.gamma.float())

    def residues(self) -> torch.Tensor:
        return self.R.float()

    def weight(self, length: int) -> torch.Tensor:
        """The filter ``[D, length]`` (fp32) for the current length."""
        return kernels.modal_filter(self.log_poles(), self.residues(), length)
