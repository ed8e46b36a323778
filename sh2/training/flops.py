"""Analytic model FLOPs and the measured bf16 matmul peak used for MFU.

Profilers count FFTs as zero and cannot see Triton kernels, so sh2 counts FLOPs from the shapes: each operator
kind declares its mixer's FLOPs (``flops_per_token`` of its mixer class); this module adds the MLP, the LM
head and the training factor. A multiply-add is 2 FLOPs. Training costs 3x the forward pass (forward +
backward for activations and weights); activation-checkpointing recomputation is not counted, as usual for MFU.
"""

from __future__ import annotations

import time

import torch

from sh2.models.config import SH2Config
from sh2.models.hyena import fft_conv_flops_per_token
from sh2.models.operators import mixer_class

__all__ = ["fft_conv_flops_per_token", "layer_flops_per_token", "model_flops_per_token", "flops_breakdown",
           "measure_bf16_peak_flops"]


def layer_flops_per_token(config: SH2Config, operator: str, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block of kind ``operator``, split by part: the gated MLP and the
    mixer's parts (declared by its kind, :meth:`~sh2.models.mixer.Mixer.flops_per_token`)."""
    D, F = config.hidden_size, config.mlp_hidden_size
    return {"mlp": 3 * 2 * D * F, **mixer_class(operator).flops_per_token(config, seq_len)}


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


def measure_bf16_peak_flops(device: torch.device, size: int = 8192, iters: int = 10, rounds: int = 3
                            ) -> float | None:
    """The measured bf16 matmul throughput of a CUDA device (FLOP/s); None on other devices.

    The best of ``rounds`` timings of ``iters`` products: a single timing varies by 10% or more between processes
    on the same GPU (clocks and power limits), and the lowest would flatter every MFU computed from it.
    """
    if device.type != "cuda":
        return None
    key = str(torch.cuda.get_device_name(device))
    if key not in _PEAK_CACHE:
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(rounds):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            torch.cuda.synchronize(device)
            best = max(best, 2 * size**3 * iters / (time.perf_counter() - t0))
        _PEAK_CACHE[key] = best
        del a, b
    return _PEAK_CACHE[key]
