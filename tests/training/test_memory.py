"""The per-GPU memory estimate (sh2.training.memory) against the peaks measured on GPUs.

The measured values are `torch.cuda.max_memory_allocated` peaks from docs/context_parallel.md (bench/cp_multi.py
scaling runs: forward + backward with replicated fp32 weights and no optimizer; an FSDP2 `sh2 fit` run) and
docs/benchmarks.md (bench/e2e.py: one training step with AdamW on one GPU).
"""

from __future__ import annotations

import pytest

from sh2.models import SH2Config
from sh2.training.memory import estimate_training_memory, main, memory_report, smallest_cp

# The peaks were measured with Hyena-LI as an FFT convolution (li_algorithm: fft).
SDH = SH2Config.from_name("evo2_7b_1m", layout="SDH*", num_layers=4, li_algorithm="fft")
STRIPE8 = SH2Config.from_name("evo2_7b_8k", layout="SDH*SDHS", num_layers=8, li_algorithm="fft")
TRANSFORMER8 = SH2Config.from_name("evo2_7b_8k", layout="********", num_layers=8)
BENCH = {"optimizer": False, "sharded": False, "mixed_precision": None}  # cp_multi scaling: replicated fp32 weights
E2E = {"sharded": False, "mixed_precision": None}  # bench/e2e.py: one GPU, fp32 weights, AdamW

MEASURED = [  # (config, seq_len, cp, options, measured GiB, where)
    (SDH, 131072, 1, BENCH, 60.7, "H100, CP = 1"),
    (SDH, 131072, 2, BENCH, 32.6, "2 x H100"),
    (SDH, 131072, 4, BENCH, 21.4, "4 x H100"),
    (SDH, 262144, 2, BENCH, 60.7, "2 x H100"),
    (SDH, 262144, 4, BENCH, 32.6, "4 x H100"),
    (SDH, 262144, 1, BENCH, 116.8, "H200, CP = 1"),
    (SDH, 524288, 2, BENCH, 116.8, "2 x H200"),
    (SDH, 131072, 2, {}, 34.1, "sh2 fit, FSDP2 bf16 + AdamW, 2 x H100"),
    (STRIPE8, 32768, 1, E2E, 37.7, "e2e SH2, AdamW, H100"),
    (TRANSFORMER8, 32768, 1, E2E, 32.8, "e2e Transformer, AdamW, H100"),
    (TRANSFORMER8, 131072, 1, E2E, 65.4, "e2e Transformer, AdamW, H100"),
]


@pytest.mark.parametrize("config,seq_len,cp,options,measured,where", MEASURED)
def test_estimate_is_within_8_percent_of_measured_peaks(config, seq_len, cp, options, measured, where):
    est = estimate_training_memory(config, seq_len, cp=cp, **options).total
    assert abs(est / measured - 1) < 0.08, (where, est, measured)


def test_estimate_predicts_the_measured_out_of_memory():
    # e2e: the 8-layer SH2 stack at 128K with AdamW ran out of memory on an 80 GB H100
    assert estimate_training_memory(STRIPE8, 131072, **E2E).total > 79.2


def test_more_context_parallelism_needs_less_memory_and_the_smallest_fit_is_found():
    totals = [estimate_training_memory(SDH, 262144, cp=cp).total for cp in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    for algorithm in ("modal", "fft"):
        config = SH2Config.from_name("evo2_7b_1m", li_algorithm=algorithm)
        cp = smallest_cp(config, 1048576, 79.2)
        assert cp is not None and estimate_training_memory(config, 1048576, cp=cp).total \
            <= 0.9 * 79.2 < estimate_training_memory(config, 1048576, cp=cp // 2).total


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match="seq_len=1000 is not divisible by 2 \\* cp = 16"):
        estimate_training_memory(SDH, 1000, cp=8)
    with pytest.raises(ValueError, match="cp must be a positive integer"):
        estimate_training_memory(SDH, 1024, cp=0)


def test_smallest_cp_respects_the_model_and_the_sequence():
    cfg = SH2Config.from_name("evo2_7b_1m")  # 32 heads: Ulysses attention allows cp <= 32
    assert smallest_cp(cfg, 24576, 8.0) == 32
    assert smallest_cp(cfg, 6144, 8.0) is None  # cp = 32 would fit, but MR's 127-token halo needs L / (2 cp) >= 127
    assert smallest_cp(cfg, 24576, 4.0) is None  # would need cp = 64 > heads
    assert smallest_cp(cfg, 4 * 131071, 79.2) is None  # needs cp = 8, but 2 cp must divide the length
    assert smallest_cp(cfg, 131072, 1e6) == 1
    # every FIR kind's halo counts: on a GPU that only cp = 32 fits, SE's K - 1 = 6 tokens do not fit the
    # 4-token chunks of L = 256, while a 5-tap SE's 4 do
    se = SH2Config.from_name("evo2_7b_1m", layout="S*S*", num_layers=4)
    gpu = estimate_training_memory(se, 256, cp=32).total / 0.9 + 0.1
    assert estimate_training_memory(se, 256, cp=16).total > 0.9 * gpu
    assert smallest_cp(se.replace(se_filter_len=5), 256, gpu) == 32
    assert smallest_cp(se, 256, gpu) is None


def test_cli_prints_a_table_and_repeats_the_layout_for_layers(capsys):
    main(["--preset", "evo2_7b_1m", "--seq-len", "131072", "--cp", "4", "8"])
    out = capsys.readouterr().out
    assert "evo2_7b_1m (32 layers" in out and out.count(" yes") + out.count(" no") == 2
    main(["--preset", "evo2_7b_1m", "--layers", "8", "--seq-len", "131072", "--cp", "2"])
    assert "evo2_7b_1m (8 layers" in capsys.readouterr().out


def test_report_names_the_setting_that_would_fit():
    cfg = SH2Config.from_name("evo2_7b_1m")
    msg, over = memory_report(cfg, 1048576, 79.2, cp=8)
    assert over and "likely out of memory" in msg and "context_parallel_size >= 16" in msg
    msg, over = memory_report(cfg, 1048576, 79.2, cp=16)
    assert not over and msg.startswith("[sh2] memory estimate") and "of 79 GiB" in msg
    msg, over = memory_report(cfg, 131072, 79.2, cp=4, activation_checkpointing=False)
    assert over and "model.activation_checkpointing: true" in msg


def test_module_reports_for_its_strategy():
    # what `sh2 fit` prints at the start on GPUs: the module's config, seq_len and checkpointing, the strategy's
    # CP size, data-parallel size and FSDP2 mixed precision
    from sh2.strategies import ContextParallelStrategy
    from sh2.training.callbacks import MemoryReport
    from sh2.training.module import SH2LightningModule

    module = SH2LightningModule(preset="evo2_7b_1m", seq_len=1048576, activation_checkpointing=True)
    strategy = ContextParallelStrategy(cp={"size": 16}, mixed_precision="bf16")
    strategy._set_cp_group(None, 0, 1)
    msg, over = MemoryReport.report(module, strategy, 79.2)
    expected = estimate_training_memory(module.config, 1048576, cp=16, dp=1).total
    assert f"{expected:.1f} GiB per GPU" in msg and not over


def test_a_lora_finetune_keeps_optimizer_state_and_fp32_gradients_for_the_adapters_only(capsys):
    from sh2.models.lora import LoRAConfig

    config = SH2Config.from_name("evo2_7b_8k")
    lora = LoRAConfig(rank=8)
    full = estimate_training_memory(config, 8192, cp=1, dp=4)
    tuned = estimate_training_memory(config, 8192, cp=1, dp=4, lora=lora)
    # the adapters of every projection and MLP linear, counted from the shapes: r (in + out) per layer
    D, F, L, heads = 4096, 11008, 32, 32
    attention = 5  # layers 3, 10, 17, 24, 31
    hd = D // heads
    per_block_mlp = 8 * (D + F) * 3
    hyena = 8 * (D + 3 * D) + 8 * (D + D)
    attn = 8 * (D + 3 * heads * hd) + 8 * (D + D)
    adapters = L * per_block_mlp + (L - attention) * hyena + attention * attn
    total = 6_481_649_408 + adapters
    gib = 2 ** 30
    assert tuned.states == pytest.approx((adapters * 16 + (total - adapters) * 4) / 4 / gib, rel=1e-12)
    assert full.states == pytest.approx(6_481_649_408 * 16 / 4 / gib, rel=1e-12)
    # a block's weights are gathered twice (current and prefetched): bf16 (2 bytes) and, since the layout has LI
    # layers whose weights FSDP2 gathers in fp32, 4 bytes for the other; fp32 gradients (4 bytes) only for its
    # adapters. The largest block (an LI block) has hyena + MLP adapters.
    block = full.gathered * gib / (2 + 4 + 4)
    block_adapters = per_block_mlp + hyena
    assert tuned.gathered == pytest.approx(((block + block_adapters) * (2 + 4) + block_adapters * 4) / gib, rel=1e-12)
    assert tuned.activations == full.activations and tuned.logits == full.logits
    main(["--preset", "evo2_7b_8k", "--seq-len", "8192", "--cp", "1", "--lora-rank", "8", "--gpu-gib", "139.8"])
    out = capsys.readouterr().out
    assert f"finetune: LoRA rank 8 on in_proj, out_proj, qkv, w1, w2, w3; trainable {adapters:,} of {total:,}" in out
