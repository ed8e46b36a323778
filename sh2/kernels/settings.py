"""Kernel settings read once from the environment, and the ways to change them in a program or a test.

- ``SH2_KERNEL_BACKEND``: what ``backend="auto"`` means: ``torch``, ``triton``, or empty/``auto`` (the
  default: Triton on CUDA tensors, the reference elsewhere);
- ``SH2_AUTOTUNE``: ``0``, ``false`` or ``off`` disables the shape-keyed autotuner (the first candidate
  is used); on by default;
- ``SH2_FFT_SLICE_MB``: fp32 working set of one FFT channel slice (default 6144);
- ``SH2_FFT_SAVE_SPECTRUM_MB``: largest filter spectrum the FFT forward keeps for the backward (default 1024);
- ``TRITON_INTERPRET``: ``1`` when Triton runs on the CPU interpreter.

The environment is read at the first kernel call (not at import, so a program may still set variables
before it runs a model) and never again; :func:`reload_settings` re-reads it. Tests and programs change
settings with the context managers::

    with sh2.kernels.use_backend("torch"):         # force the reference for "auto" calls
        ...
    with sh2.kernels.override_settings(fft_slice_mb=0.001, autotune=False):
        ...
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelSettings:
    """Process-wide kernel settings.

    Attributes:
        backend: what ``backend="auto"`` resolves to: ``"torch"``, ``"triton"``, or None (by device).
        autotune: whether Triton launches on CUDA are autotuned.
        fft_slice_mb: MiB of fp32 working set (six ``[B, C, 2L]`` buffers) per FFT channel slice.
        fft_save_spectrum_mb: MiB up to which the FFT forward keeps the filter spectrum for the backward.
        interpret: whether Triton runs on the CPU interpreter.
    """

    backend: str | None = None
    autotune: bool = True
    fft_slice_mb: float = 6144.0
    fft_save_spectrum_mb: float = 1024.0
    interpret: bool = False

    def __post_init__(self) -> None:
        if self.backend not in (None, "torch", "triton"):
            raise ValueError(f"kernel backend override must be 'torch', 'triton' or None, got {self.backend!r}")
        for name in ("fft_slice_mb", "fft_save_spectrum_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KernelSettings:
        """Parse the variables of the module docstring; a malformed value raises a ValueError naming it."""
        backend = environ.get("SH2_KERNEL_BACKEND", "").strip().lower()
        if backend not in ("", *BACKENDS):
            raise ValueError(f"SH2_KERNEL_BACKEND must be one of 'torch', 'triton', 'auto' or empty, got {backend!r}")
        return cls(
            backend=None if backend in ("", "auto") else backend,
            autotune=environ.get("SH2_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off"),
            fft_slice_mb=_float(environ, "SH2_FFT_SLICE_MB", 6144.0),
            fft_save_spectrum_mb=_float(environ, "SH2_FFT_SAVE_SPECTRUM_MB", 1024.0),
            interpret=environ.get("TRITON_INTERPRET", "0").strip() == "1",
        )


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB, got {raw!r}") from None


_current: KernelSettings | None = None


def current_settings() -> KernelSettings:
    """The settings in force (the environment is parsed on the first call)."""
    global _current
    if _current is None:
        if torch.compiler.is_compiling():
            # Storing them here would be a side effect inside traced code: under activation checkpointing
            # dynamo then breaks the graph and runs the whole block eagerly. The next eager call stores them.
            return KernelSettings.from_env()
        _current = KernelSettings.from_env()
    return _current


def reload_settings() -> KernelSettings:
    """Parse the environment again (for programs that change the variables after the first kernel call)."""
    global _current
    _current = KernelSettings.from_env()
    return _current


@contextmanager
def override_settings(**changes: object) -> Iterator[KernelSettings]:
    """Replace some settings inside a ``with`` block (fields of :class:`KernelSettings`), then restore them."""
    global _current
    before = current_settings()
    _current = dataclasses.replace(before, **changes)
    try:
        yield _current
    finally:
        _current = before


@contextmanager
def use_backend(backend: str) -> Iterator[KernelSettings]:
    """Make ``backend="auto"`` mean ``backend`` (``"torch"``, ``"triton"`` or ``"auto"``) inside a ``with`` block.

    This is how tests force a path; ``SH2_KERNEL_BACKEND`` does the same for a whole process.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with override_settings(backend=None if backend == "auto" else backend) as s:
        yield s
