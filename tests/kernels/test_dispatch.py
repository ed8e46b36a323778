"""The one backend decision and the kernel settings: parsed once, overridable in a block, re-read on demand."""

from __future__ import annotations

import pytest
import torch

from sh2 import kernels
from sh2.kernels import KernelSettings, current_settings, fir, reference
from sh2.kernels import settings as settings_module  # the module (current_settings is the function)


@pytest.fixture
def restore_settings():
    """Put back whatever settings were in force (tests below re-read the environment)."""
    before = settings_module._current
    yield
    settings_module._current = before


def test_auto_follows_the_device_and_the_override():
    x = torch.zeros(1, 4, 8)
    assert kernels.resolve_backend("auto", x) == "torch"  # a CPU tensor
    with kernels.use_backend("triton"):
        assert kernels.resolve_backend("auto", x) == "triton"
        assert kernels.resolve_backend("torch", x) == "torch"  # an explicit choice wins
    assert kernels.resolve_backend("auto", x) == "torch"


def test_float64_and_empty_inputs_always_run_the_reference():
    assert kernels.resolve_backend("triton", torch.zeros(1, 4, 8, dtype=torch.float64)) == "torch"
    assert kernels.resolve_backend("triton", torch.zeros(1, 0, 8)) == "torch"
    assert kernels.resolve_backend("triton", torch.zeros(1, 4, 8, dtype=torch.bfloat16)) == "triton"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("cuda", torch.zeros(1))
    with pytest.raises(ValueError, match="backend must be one of"):
        with kernels.use_backend("cuda"):
            pass


def test_settings_parse_the_environment():
    s = KernelSettings.from_env({"SH2_KERNEL_BACKEND": " Triton ", "SH2_AUTOTUNE": "off", "SH2_FFT_SLICE_MB": "12.5",
                                 "SH2_FFT_SAVE_SPECTRUM_MB": "0", "TRITON_INTERPRET": "1"})
    assert s == KernelSettings(backend="triton", autotune=False, fft_slice_mb=12.5, fft_save_spectrum_mb=0.0,
                               interpret=True)
    assert KernelSettings.from_env({}) == KernelSettings()
    assert KernelSettings.from_env({"SH2_KERNEL_BACKEND": "auto"}).backend is None
    with pytest.raises(ValueError, match="SH2_KERNEL_BACKEND"):
        KernelSettings.from_env({"SH2_KERNEL_BACKEND": "cuda"})
    with pytest.raises(ValueError, match="SH2_FFT_SLICE_MB"):
        KernelSettings.from_env({"SH2_FFT_SLICE_MB": "6G"})
    with pytest.raises(ValueError, match="fft_slice_mb"):
        KernelSettings(fft_slice_mb=-1)


def test_settings_are_read_once_until_reloaded(monkeypatch, restore_settings):
    monkeypatch.setenv("SH2_FFT_SLICE_MB", "100")
    assert kernels.reload_settings().fft_slice_mb == 100
    monkeypatch.setenv("SH2_FFT_SLICE_MB", "200")
    assert current_settings().fft_slice_mb == 100  # the environment is not read on every call
    assert kernels.reload_settings().fft_slice_mb == 200


def test_override_settings_restores_on_exit_and_on_error():
    before = current_settings()
    with pytest.raises(RuntimeError):
        with kernels.override_settings(autotune=False, fft_slice_mb=1.0) as s:
            assert current_settings() is s and not s.autotune
            raise RuntimeError
    assert current_settings() is before


def test_environment_variable_sends_every_auto_call_to_triton(monkeypatch, restore_settings):
    """SH2_KERNEL_BACKEND=triton makes "auto" run the Triton kernels on CPU tensors too, at every length
    (the 12-token boundary corrections of context parallelism included)."""
    calls = []
    monkeypatch.setenv("SH2_KERNEL_BACKEND", "triton")
    kernels.reload_settings()
    monkeypatch.setattr(fir, "gated_fir_conv_triton", lambda *a: calls.append(a) or reference.gated_fir_conv_ref(*a))
    for L in (1, 12, 127, 128):
        x = torch.randn(1, L, 8)
        kernels.gated_fir_conv(x, x, x, torch.randn(2, 3))
    assert len(calls) == 4
    monkeypatch.setenv("SH2_KERNEL_BACKEND", "torch")
    kernels.reload_settings()
    kernels.gated_fir_conv(x, x, x, torch.randn(2, 3))
    assert len(calls) == 4
