"""Sequence-mixing kernels of sh2, each with a pure-PyTorch reference and a Triton backend.

Public functions (all filters in causal orientation, ``h[..., 0]`` multiplies the current token):

- :func:`gated_fir_conv` ``(q, k, v, h, bias)``: ``q * (conv(k*v, h) + bias*(k*v))``, direct/blocked FIR
  (Hyena-SE and Hyena-MR).
- :func:`gated_fft_conv`: the same semantics by an fp32 FFT, for filters as long as the sequence (Hyena-LI).
- :func:`causal_depthwise_conv` ``(x, w)``: the featurizer's short depthwise causal convolution.
- :func:`gated_modal_conv` ``(q, k, v, log_poles, residues, bias, initial_state)``: Hyena-LI by its exact
  modal recurrence (no FFT, fp32 states; optional initial state in, final state out).
- :func:`modal_filter` ``(log_poles, residues, length)``: the Hyena-LI filter, built tiled.

``backend`` is ``"auto"`` (Triton on CUDA tensors, the reference otherwise), ``"torch"`` or ``"triton"``;
:func:`resolve_backend` is the one place that decides (float64 and empty inputs always run the
reference). Settings (:mod:`sh2.kernels.settings`) are read from the environment once:
``SH2_KERNEL_BACKEND=torch|triton`` changes what ``"auto"`` means for a process, and tests force a
path with ``with sh2.kernels.use_backend("torch"): ...``.

The Triton kernels are PyTorch custom operators (``torch.ops.sh2.*``) with fake (shape-only)
implementations and registered autograd formulas, so ``torch.compile(fullgraph=True)`` traces code that
calls them without a graph break; autotuning runs in the operators' eager bodies, never in traced code.

How a kernel family is laid out (``fir``, ``fft``, ``short_conv``, ``modal``; a new family follows the
same pattern):

1. ``reference.py``: the readable pure-PyTorch version, the oracle of the tests and the CPU path.
2. ``<family>.py`` (plus ``<family>_*.py`` kernel modules when the kernels are large): the
   ``@triton.jit`` kernels, with the length-derived integers that only bound loops and masks in
   ``do_not_specialize`` (one compiled variant for every length); typed launchers (``*_forward`` /
   ``*_backward``) that take their launch configuration as a frozen dataclass, choose it with
   :func:`sh2.kernels._tuning.pick_config`, allocate outputs and scratch with ``_tuning.new_buffer`` and
   pass ``None`` for absent optional pointers (gated by a ``tl.constexpr`` flag); the custom operators
   ``sh2::<name>`` and ``sh2::<name>_backward`` (``torch.library.custom_op``) with ``register_fake`` and
   ``register_autograd``; and ``<name>_triton(...)``, the differentiable entry that normalises layouts
   and calls the operator.
3. The public function below: validate the arguments, ``resolve_backend``, then ``<family>.<name>_triton``
   or the reference. The family module is imported here (when Triton is installed) so that its operators
   are registered with the rest.
4. Tests: ``tests/kernels/test_<family>.py`` (float64 brute force and reference, forward and backward,
   awkward shapes), the launchers in ``tests/kernels/test_bounds.py`` (inputs, outputs and scratch
   between guard bands), and in ``tests/kernels/test_custom_ops.py`` an ``opcheck`` of each operator and
   the public function in the ``torch.compile(fullgraph=True)`` test.
"""

from __future__ import annotations

import torch

from sh2.kernels import reference
from sh2.kernels.dispatch import (
    TRITON_AVAILABLE,
    check_depthwise_inputs,
    check_gated_inputs,
    check_modal_conv_inputs,
    check_modal_inputs,
    resolve_backend,
)
from sh2.kernels.settings import KernelSettings, current_settings, override_settings, reload_settings, use_backend

if TRITON_AVAILABLE:  # registers the sh2:: custom operators
    from sh2.kernels import fft, fir, modal, modal_conv, short_conv


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
    if resolve_backend(backend, q) == "triton":
        return fir.gated_fir_conv_triton(q, k, v, h, bias)
    return reference.gated_fir_conv_ref(q, k, v, h, bias)


def gated_fft_conv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                   bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Gated causal long convolution by fp32 FFT; same semantics as :func:`gated_fir_conv`, K <= L."""
    check_gated_inputs(q, k, v, h, bias, max_len=q.shape[1] if q.dim() == 3 else None)
    if resolve_backend(backend, q) == "triton":
        return fft.gated_fft_conv_triton(q, k, v, h, bias)
    return reference.gated_fft_conv_ref(q, k, v, h, bias)


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
    check_modal_conv_inputs(q, k, v, log_poles, residues, bias, initial_state,
                            check_values and not _compiling())
    if resolve_backend(backend, q) == "triton":
        y, state = modal_conv.gated_modal_conv_triton(q, k, v, log_poles, residues, bias, initial_state)
    else:
        y, state = reference.gated_modal_conv_ref(q, k, v, log_poles, residues, bias, initial_state,
                                                  return_state=True)
    return (y, state) if return_state else y


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def causal_depthwise_conv(x: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Causal depthwise convolution ``y[b, t, c] = sum_s w[c, s] x[b, t - s, c]``.

    Args:
        x: ``[B, L, C]``.
        w: ``[C, K]`` filters in causal orientation.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, L, C]`` in the dtype of x (fp32 accumulation).
    """
    check_depthwise_inputs(x, w)
    if resolve_backend(backend, x) == "triton":
        return short_conv.causal_depthwise_conv_triton(x, w)
    return reference.causal_depthwise_conv_ref(x, w)


def modal_filter(log_poles: torch.Tensor, residues: torch.Tensor, length: int,
                 backend: str = "auto") -> torch.Tensor:
    """Hyena-LI filter ``h[c, t] = sum_n residues[c, n] * exp(log_poles[c, n] * t)``, ``[D, length]`` fp32."""
    check_modal_inputs(log_poles, residues, length)
    if resolve_backend(backend, log_poles) == "triton":
        return modal.modal_filter_triton(log_poles, residues, length)
    return reference.modal_filter_ref(log_poles, residues, length)


__all__ = ["gated_fir_conv", "gated_fft_conv", "gated_modal_conv", "causal_depthwise_conv", "modal_filter",
           "resolve_backend", "check_gated_inputs", "check_modal_conv_inputs", "reference", "KernelSettings",
           "current_settings", "reload_settings", "override_settings", "use_backend"]
