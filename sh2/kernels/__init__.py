"""Sequence-mixing kernels of sh2, each with a pure-PyTorch reference and a Triton backend.

Public functions (all filters in causal orientation, ``h[..., 0]`` multiplies the current token):

- :func:`gated_fir_conv` ``(q, k, v, h, bias)``: ``q * (conv(k*v, h) + bias*(k*v))``, direct/blocked FIR
  (Hyena-SE and Hyena-MR).
- :func:`gated_fft_conv`: the same semantics by an fp32 FFT, for filters as long as the sequence (Hyena-LI).
- :func:`causal_depthwise_conv` ``(x, w)``: the featurizer's short depthwise causal convolution.
- :func:`modal_filter` ``(log_poles, residues, length)``: the Hyena-LI filter, built tiled.

``backend`` is ``"auto"`` (Triton on CUDA tensors, the reference otherwise), ``"torch"`` or ``"triton"``.
The environment variable ``SH2_KERNEL_BACKEND`` (``torch`` | ``triton``) overrides ``"auto"``, which is
how tests force a path.
"""

from __future__ import annotations

import os

import torch

from sh2.kernels import reference

_BACKENDS = ("auto", "torch", "triton")

# Under this many tokens ``auto`` runs the FIR reference: the blocked kernels tile 16-128 tokens, so short
# calls (the 2(K-1)-token boundary corrections of overlapped context parallelism, tiny tests) gain nothing,
# and the bf16 blocked backward has failed on the GPU for a 12-token call (illegal memory access).
MIN_TRITON_FIR_LEN = 128


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for a requested backend and an input tensor."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get("SH2_KERNEL_BACKEND", "").strip().lower()
        if forced in ("torch", "triton"):
            return forced
        return "triton" if x.is_cuda else "torch"
    return backend


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


def gated_fir_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                   bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Gated causal FIR convolution ``q * (conv(k * v, h) + bias * (k * v))``.

    Args:
        q: post-gate ``[B, L, D]``.
        k: pre-gate ``[B, L, D]``.
        v: value ``[B, L, D]``.
        h: grouped filters ``[G, K]``, causal orientation; channel c uses filter ``c // (D // G)``.
        bias: Dskip ``[D]`` or None.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, L, D]`` in the dtype of q (fp32 accumulation).
    """
    check_gated_inputs(q, k, v, h, bias)
    chosen = resolve_backend(backend, q)
    if chosen == "triton" and backend == "auto" and q.shape[1] < MIN_TRITON_FIR_LEN:
        chosen = "torch"
    if chosen == "triton":
        from sh2.kernels.fir import gated_fir_conv_triton

        return gated_fir_conv_triton(q, k, v, h, bias)
    return reference.gated_fir_conv_ref(q, k, v, h, bias)


def gated_fft_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                   bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Gated causal long convolution by fp32 FFT; same semantics as :func:`gated_fir_conv`, K <= L."""
    check_gated_inputs(q, k, v, h, bias, max_len=q.shape[1] if q.dim() == 3 else None)
    if resolve_backend(backend, q) == "triton":
        from sh2.kernels.fft import gated_fft_conv_triton

        return gated_fft_conv_triton(q, k, v, h, bias)
    return reference.gated_fft_conv_ref(q, k, v, h, bias)


def check_modal_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
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


def gated_modal_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                     residues: torch.Tensor, bias: torch.Tensor | None = None,
                     initial_state: torch.Tensor | None = None, return_state: bool = False, backend: str = "auto",
                     check_values: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hyena-LI as its exact modal recurrence: ``y = q * (sum_n R_n s_n + bias * z)``, ``s_n <- lambda_n s_n + z``.

    Equal to :func:`gated_fft_conv` with the filter ``h[c, t] = sum_n R[c, n] lambda[c, n]^t`` (of any length),
    in O(L D N) work with fp32 states and no FFT.

    Args:
        q: post-gate ``[B, L, D]``.
        k: pre-gate ``[B, L, D]``.
        v: value ``[B, L, D]``.
        log_poles: ``[D, N]``, ``log lambda`` (finite, <= 0), fp32; gradients flow to it.
        residues: ``[D, N]`` (R).
        bias: Dskip ``[D]`` or None.
        initial_state: ``[B, D, N]`` state before the first token (None: zero); gradients flow to it.
        return_state: also return the fp32 state after the last token, ``[B, D, N]`` (differentiable).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        check_values: check that ``log_poles`` is finite and <= 0 (one host synchronisation; the model skips
            it because its parametrisation ``-exp(p) exp(gamma)`` guarantees it).

    Returns:
        ``y`` in q's dtype, or ``(y, final_state)`` when ``return_state``.
    """
    check_modal_inputs(q, k, v, log_poles, residues, bias, initial_state, check_values and not _compiling())
    if resolve_backend(backend, q) == "triton":
        from sh2.kernels.modal_conv import gated_modal_conv_triton

        y, state = gated_modal_conv_triton(q, k, v, log_poles, residues, bias, initial_state)
    else:
        y, state = reference.gated_modal_conv_ref(q, k, v, log_poles, residues, bias, initial_state,
                                                  return_state=True)
    return (y, state) if return_state else y


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def causal_depthwise_conv(x: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal depthwise convolution of ``x [B, L, C]`` with ``w [C, K]`` (causal orientation)."""
    if x.dim() != 3 or w.dim() != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x [B, L, C] and w [C, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    resolve_backend(backend, x)  # validates ``backend``
    # No Triton featurizer kernel yet (optional in issue 4): every backend uses the reference.
    return reference.causal_depthwise_conv_ref(x, w)


def modal_filter(log_poles: torch.Tensor, residues: torch.Tensor, length: int,
                 backend: str = "auto") -> torch.Tensor:
    """Hyena-LI filter ``h[c, t] = sum_n residues[c, n] * exp(log_poles[c, n] * t)``, ``[D, length]`` fp32."""
    if log_poles.shape != residues.shape or log_poles.dim() != 2:
        raise ValueError(f"log_poles and residues must both be [D, N], got {tuple(log_poles.shape)} "
                         f"and {tuple(residues.shape)}")
    if resolve_backend(backend, log_poles) == "triton":
        from sh2.kernels.modal import modal_filter_triton

        return modal_filter_triton(log_poles, residues, length)
    return reference.modal_filter_ref(log_poles, residues, length)


__all__ = ["gated_fir_conv", "gated_fft_conv", "gated_modal_conv", "check_modal_inputs", "causal_depthwise_conv",
           "modal_filter", "resolve_backend", "check_gated_inputs", "reference"]
