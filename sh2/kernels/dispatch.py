"""The one backend decision of every public kernel function, and the validation of their arguments."""

from __future__ import annotations

import importlib.util

import torch

from sh2.kernels.settings import BACKENDS, current_settings

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

# The Triton kernels take these input dtypes (and accumulate in fp32); float64 always runs the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for a requested backend and the call's main input tensor.

    ``"auto"`` follows the ``backend`` setting (``SH2_KERNEL_BACKEND``, :func:`sh2.kernels.use_backend`),
    else picks Triton for CUDA tensors and the reference otherwise. Whatever was asked, float64 and empty
    inputs run the reference: the kernels compute in fp32 and have nothing to launch for empty tensors.

    Raises:
        ValueError: ``backend`` is not ``"auto"``, ``"torch"`` or ``"triton"``.
        RuntimeError: Triton is asked for but not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = current_settings().backend or ("triton" if x.is_cuda else "torch")
    if backend == "torch" or x.dtype not in TRITON_DTYPES or x.numel() == 0:
        return "torch"
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton kernel backend needs the 'triton' package; install it, or run the "
                           "reference with backend='torch' (or SH2_KERNEL_BACKEND=torch)")
    return "triton"


def check_gated_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                       bias: torch.Tensor | None, max_len: int | None = None) -> None:
    """Validate the arguments of the gated convolutions; raise ValueError naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [B, L, D], got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == h.device):
        raise ValueError("q, k, v and h must be on the same device")
    D = q.shape[-1]
    if h.dim() != 2:
        raise ValueError(f"h must have shape [G, K] (causal orientation), got {tuple(h.shape)}")
    G, K = h.shape
    if G < 1 or D % G != 0:
        raise ValueError(f"the number of filter groups G={G} must divide the width D={D}")
    if K < 1:
        raise ValueError("h must have at least one tap")
    if max_len is not None and K > max_len:
        raise ValueError(f"filter length K={K} exceeds the sequence length L={max_len}; "
                         f"truncate h to h[:, :L]")
    if bias is not None:
        if bias.shape != (D,):
            raise ValueError(f"bias must have shape [D]=[{D}], got {tuple(bias.shape)}")
        if bias.device != q.device:
            raise ValueError("bias must be on the same device as q")


def check_depthwise_inputs(x: torch.Tensor, w: torch.Tensor) -> None:
    """Validate ``x [B, L, C]`` and ``w [C, K]`` of the causal depthwise convolution."""
    if x.dim() != 3 or w.dim() != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x [B, L, C] and w [C, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if w.shape[1] < 1:
        raise ValueError("w must have at least one tap")
    if w.device != x.device:
        raise ValueError("x and w must be on the same device")


def check_modal_inputs(log_poles: torch.Tensor, residues: torch.Tensor, length: int) -> None:
    """Validate the modal filter's ``log_poles``, ``residues`` (both ``[D, N]``) and ``length``."""
    if log_poles.shape != residues.shape or log_poles.dim() != 2:
        raise ValueError(f"log_poles and residues must both be [D, N], got {tuple(log_poles.shape)} "
                         f"and {tuple(residues.shape)}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")


def check_modal_conv_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                       residues: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                       check_values: bool) -> None:
    """Validate the arguments of :func:`gated_modal_conv`; raise ValueError naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [B, L, D], got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same shape and dtype, got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    D = q.shape[-1]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must have shape [D]=[{D}], got {tuple(bias.shape)}")
    for name, t in (("k", k), ("v", v), ("log_poles", log_poles), ("residues", residues), ("bias", bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if log_poles.dim() != 2 or log_poles.shape[0] != D or residues.shape != log_poles.shape:
        raise ValueError(f"log_poles and residues must both have shape [D, N] with D={D}, got "
                         f"{tuple(log_poles.shape)} and {tuple(residues.shape)}")
    if not log_poles.is_floating_point() or not residues.is_floating_point():
        raise ValueError(f"log_poles and residues must be floating point, got {log_poles.dtype} and {residues.dtype}")
    if initial_state is not None:
        want = (q.shape[0], D, log_poles.shape[1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape [B, D, N] = {list(want)}, got "
                             f"{list(initial_state.shape)}")
        if not initial_state.is_floating_point() or initial_state.device != q.device:
            raise ValueError(f"initial_state must be a floating-point tensor on {q.device}, got "
                             f"{initial_state.dtype} on {initial_state.device}")
    if check_values and log_poles.numel():
        if not bool(torch.isfinite(log_poles).all()) or bool((log_poles > 0).any()):
            raise ValueError("log_poles must be finite and <= 0 (per-token decays exp(log_poles) in (0, 1]); got "
                             f"values in [{log_poles.min().item():g}, {log_poles.max().item():g}]")
