"""Analytic model FLOPs (SPEC 4.4) and the measured bf16 matmul peak used for MFU.

Profilers count FFTs as zero and cannot see Triton kernels, so sh2 counts FLOPs from the shapes. A
multiply-add is 2 FLOPs. Training costs 3x the forward pass (forward + backward for activations and
weights); activation-checkpointing recomputation is not counted, as usual for MFU.
"""

from __future__ import annotations

import math
import time

import torch

from sh2.models.config import SH2Config

# FLOPs of the pointwise work per channel and token in a Hyena operator: z = x2*v, skip add, gate.
_GATE_FLOPS = 4


def fft_conv_flops_per_token(seq_len: int) -> float:
    """Per channel and token: a real FFT and an inverse real FFT of size 2L (2.5 N log2 N each) plus the
    complex product of the spectra (6 FLOPs per bin). The filter's FFT is amortised over the batch."""
    n = 2 * seq_len
    return (2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / seq_len


def layer_flops_per_token(config: SH2Config, operator: str, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block, split by part."""
    D, F = config.hidden_size, config.mlp_hidden_size
    parts: dict[str, float] = {"mlp": 3 * 2 * D * F}
    if operator == "MHA":
        hd = config.head_dim
        parts["projections"] = 2 * D * (config.num_heads + 2 * config.kv_heads) * hd + 2 * D * D
        # QK^T and PV over on average L/2 keys (causal halving): 2 * 2 * (L/2) * H * hd.
        parts["mixer"] = 2 * seq_len * config.num_heads * hd
    else:
        parts["projections"] = 2 * D * 3 * D + 2 * D * D
        parts["featurizer"] = 2 * 3 * D * config.featurizer_len
        if operator == "SE":
            parts["mixer"] = D * (2 * config.se_filter_len + _GATE_FLOPS)
        elif operator == "MR":
            parts["mixer"] = D * (2 * config.mr_filter_len + _GATE_FLOPS)
        else:
            parts["mixer"] = D * (fft_conv_flops_per_token(seq_len) + _GATE_FLOPS)
    return parts


def model_flops_per_token(config: SH2Config, seq_len: int, training: bool = True) -> float:
    """Total FLOPs per token of the whole model (embedding lookup free, LM head counted)."""
    total = 2 * config.hidden_size * config.vocab_size
    for op in config.operators:
        total += sum(layer_flops_per_token(config, op, seq_len).values())
    return 3 * total if training else total


def flops_breakdown(config: SH2Config, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token summed by operator type (SE, MR, LI, MHA, head)."""
    out: dict[str, float] = {"head": 2 * config.hidden_size * config.vocab_size}
    for op in config.operators:
        out[op] = out.get(op, 0.0) + sum(layer_flops_per_token(config, op, seq_len).values())
    return out


_PEAK_CACHE: dict[str, float] = {}


def measure_bf16_peak_flops(device: torch.device, size: int = 8192, iters: int = 10) -> float | None:
    """The measured bf16 matmul throughput of a CUDA device (FLOP/s); None on other devices."""
    if device.type != "cuda":
        return None
    key = str(torch.cuda.get_device_name(device))
    if key not in _PEAK_CACHE:
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize(device)
        _PEAK_CACHE[key] = 2 * size**3 * iters / (time.perf_counter() - t0)
        del a, b
    return _PEAK_CACHE[key]
