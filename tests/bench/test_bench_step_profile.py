"""bench/step_profile.py: its kernel categories and interval union, and one CPU run of both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import step_profile


@pytest.mark.parametrize("name,category", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("_fir_blocked_bwd_kernel", "fir"),
    ("_fir_direct_fwd_kernel", "fir"),
    ("_short_conv_bwd_kernel", "featurizer"),
    ("_modal_fwd_kernel", "li_modal"),
    ("chunk_dkv_kernel", "li_modal"),
    ("combine_adjoint_kernel", "li_modal"),
    ("_unpack_fwd_kernel", "li_fft"),
    ("triton_poi_fused__to_copy_1", "fused (Inductor)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ("Memset (Device)", "memcpy / memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float>>", "elementwise (eager)"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<float>>", "reduction (eager)"),
    ("aten::mm", "matmul"),
    ("some_new_kernel", "other"),
])
def test_categories(name: str, category: str) -> None:
    assert step_profile.categorize(name) == category


def test_busy_time_is_the_union_of_overlapping_intervals() -> None:
    assert step_profile.busy_us([]) == 0
    assert step_profile.busy_us([(0, 10), (5, 12), (20, 21), (11, 11.5)]) == 13
    assert step_profile.busy_us([(3, 4), (0, 10)]) == 10


@pytest.mark.slow
def test_cpu_run_writes_a_profile_per_layout(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    assert step_profile.main(["--device", "cpu", "--preset", "tiny", "--layers", "4", "--lengths", "64",
                              "--modes", "eager", "--warmup", "1", "--steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["status"]) for r in rows] == [("sh2", "ok"), ("transformer", "ok")]
    for r in rows:
        assert r["launches"] > 0 and r["categories"]["matmul"]["ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(64 / (r["step_ms"] / 1e3))
