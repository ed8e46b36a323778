"""RMSNorm (Evo 2 form) and the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = scale * x / (||x||_2 / sqrt(D) + eps)``: eps outside the root, as released Evo 2 weights expect."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()
        rms = xf.norm(2, dim=-1, keepdim=True) * xf.shape[-1] ** -0.5
        return (self.scale.to(xf.dtype) * (xf / (rms + self.eps))).to(x.dtype)


class GatedMLP(nn.Module):
    """``y = w3(act(w1 x) * w2 x)``, no biases; ``act`` is exact GELU or identity (Evo 2 policy)."""

    def __init__(self, dim: int, hidden: int, use_gelu: bool, init_std: float, out_std: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)
        self.use_gelu = use_gelu
        self.init_std, self.out_std = init_std, out_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1.weight, std=self.init_std)
        nn.init.normal_(self.w2.weight, std=self.init_std)
        nn.init.normal_(self.w3.weight, std=self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.w1(x)
        if self.use_gelu:
            a = F.gelu(a)
        return self.w3(a * self.w2(x))
