"""Per-GPU memory of SH2 training with FSDP2 and context parallelism: a calibrated estimate for planning.

How many GPUs does a 7B model need at 1M tokens? The estimate adds four parts (bytes, per GPU):

- **states**: fp32 weights and gradients (8 B/parameter), plus AdamW's two moments (8 B/parameter) when
  training, sharded over the ``dp x cp`` ranks (FSDP2 shards over data and context parallel ranks);
- **gathered**: the unsharded weights of the largest block while it computes, the next block's prefetched
  weights and the block's fp32 gradients before the reduce-scatter (``P_block * (2 s + 4)``, ``s`` = 2 bytes
  with FSDP2 ``mixed_precision: bf16``, else 4, where one of the two blocks counts at 4 bytes when the layout
  has Hyena-LI layers, whose weights FSDP2 gathers in fp32; none without sharding);
- **activations**: ``T = batch * seq_len / cp`` tokens per GPU. With activation checkpointing: each block's
  input (``s D`` bytes per token and layer: bf16 under FSDP2 bf16 mixed precision, fp32 otherwise) plus the
  working set of recomputing and back-propagating one block, ``w D`` bytes per token, where ``w`` is the
  largest coefficient of the block kinds in the layout; without checkpointing every block keeps its working
  set. Plus the logits: bf16 and fp32 copies and their gradients (``12 V`` bytes per token).

Each operator kind declares its coefficient ``w`` (``block_working_set`` of its mixer class,
:mod:`sh2.models.operators`). They were fitted to peak memory measured on H100/H200 at the 7B width (D = 4096,
MLP 11264, bf16 autocast; ``docs/context_parallel.md``, ``docs/benchmarks.md``): ``w`` = 91.6 for a block with
Hyena-LI (its fp32 FFT convolution), 49.7 for attention. Hyena-SE and -MR blocks were not measured alone; they
are taken as attention's (same MLP, a lighter mixer). With the default CP schemes (LI ``a2a``) the exchange
buffers are within the fit's error and have no term; LI ``p2p_fft`` needs about twice the memory (measured)
and is not modelled. The coefficients are fitted to eleven measured peaks (eight distinct configurations: 1-4
GPUs, 32K-512K tokens, 4 and 8 layers), which the estimate reproduces within 8%
(``tests/training/test_memory.py``); the 32- and 50-layer presets were not measured. It estimates PyTorch's
peak allocated memory: the allocator's reserve and the CUDA context add a few GiB, and other widths or MLP
ratios and the FFT slice size (``SH2_FFT_SLICE_MB``) move it. ``dp`` is the FSDP2 shard size
(``data_parallel_replicate_size`` replicas hold full copies of the shards).

Finetuning with frozen parameters (LoRA, ``model.freeze``): a frozen parameter keeps only its fp32 weight
(4 B/parameter: no gradient, no AdamW moments) and has no fp32 gradient in the gathered block; the adapters
and other trainable parameters count as above. Activations do not shrink: the backward pass still runs through
every block to reach the adapters.

    python -m sh2.training.memory --preset evo2_7b_1m --seq-len 1048576 --cp 8 16 32
    python -m sh2.training.memory --preset evo2_7b_8k --seq-len 8192 --cp 1 --lora-rank 8 --gpu-gib 139.8
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sh2.models.config import SH2Config
from sh2.models.lora import DEFAULT_TARGETS, LoRAConfig
from sh2.models.operators import mixer_class, mixer_classes

GIB = 2**30
LOGIT_BYTES = 12  # per token and vocabulary entry: bf16 logits (2), fp32 copy (4), fp32 (4) and bf16 (2) gradients


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory per GPU, in GiB, by part."""

    states: float
    gathered: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations + self.logits


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the model and of its largest block, all and trainable (LoRA adapters included)."""

    total: int
    block: int
    trainable: int
    block_trainable: int


def parameter_counts(config: SH2Config, lora: LoRAConfig | None = None,
                     freeze: Sequence[str] | None = None) -> ParameterCounts:
    """Count parameters on the meta device, after applying LoRA and freezing as a run would."""
    from sh2.models.model import SH2Model
    from sh2.training.finetune import apply_finetuning

    with torch.device("meta"):
        model = SH2Model(config)
        if lora is not None or freeze is not None:
            apply_finetuning(model, lora, freeze)

    def count(module: torch.nn.Module, trainable_only: bool) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

    block = max(model.blocks, key=lambda b: count(b, False))
    return ParameterCounts(count(model, False), count(block, False), count(model, True), count(block, True))


def estimate_training_memory(config: SH2Config, seq_len: int, *, cp: int = 1, dp: int = 1, batch: int = 1,
                             activation_checkpointing: bool = True, optimizer: bool = True,
                             sharded: bool = True, mixed_precision: str | None = "bf16",
                             lora: LoRAConfig | None = None, freeze: Sequence[str] | None = None) -> MemoryEstimate:
    """Estimate the peak memory per GPU of one training step (see the module docstring for the model).

    Args:
        config: the model.
        seq_len: tokens per sequence.
        cp: context-parallel size (ranks per sequence).
        dp: data-parallel size (FSDP2 shards the states over ``dp * cp`` ranks).
        batch: sequences per data-parallel rank.
        activation_checkpointing: recompute each block in the backward pass (sh2's long-context configs do).
        optimizer: include AdamW's moments (False: forward + backward only).
        sharded: FSDP2 sharding of weights, gradients and optimizer state (False: replicated).
        mixed_precision: FSDP2's ``mixed_precision`` (``"bf16"``: bf16 gathered weights and block inputs, as
            in sh2's GPU configs; None: fp32 weights under bf16 autocast).
        lora: LoRA settings of a finetune (``model.lora``): adapters train, the base weights are frozen.
        freeze: frozen parameter groups (``model.freeze``; with LoRA, default every base weight).

    Returns:
        The estimate by part, in GiB.

    Raises:
        ValueError: non-positive sizes, or ``seq_len`` not divisible by ``2 * cp`` (the zig-zag split).
    """
    for name, value in (("seq_len", seq_len), ("cp", cp), ("dp", dp), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} is not divisible by 2 * cp = {2 * cp} (context parallelism splits "
                         f"each sequence into 2 * cp chunks)")
    if mixed_precision not in ("bf16", None):
        raise ValueError(f"mixed_precision must be 'bf16' or None, got {mixed_precision!r}")
    s = 2 if mixed_precision == "bf16" else 4
    n = parameter_counts(config, lora, freeze)
    shards = dp * cp if sharded else 1
    # trainable: fp32 weight + fp32 gradient (+ two fp32 AdamW moments); frozen: the fp32 weight alone
    states = (n.trainable * (16 if optimizer else 8) + (n.total - n.trainable) * 4) / shards
    # Under bf16 FSDP2, LI layers keep fp32 weights (their mixer, or under compile and autocast the whole block:
    # sh2.strategies.parallelize.apply_fsdp); counted as one of the two gathered blocks in fp32.
    s_next = 4 if s == 2 and any(op == "LI" for op in config.operators) else s
    gathered = (n.block * (s + s_next) + n.block_trainable * 4) if sharded and shards > 1 else 0.0
    tokens = batch * seq_len / cp
    d = config.hidden_size
    working = [mixer_class(op).block_working_set(config) for op in config.operators]
    if activation_checkpointing:
        activations = tokens * d * (s * config.num_layers + max(working))
    else:
        activations = tokens * d * sum(working)
    logits = tokens * config.vocab_size * LOGIT_BYTES
    return MemoryEstimate(states / GIB, gathered / GIB, activations / GIB, logits / GIB)


def smallest_cp(config: SH2Config, seq_len: int, gpu_gib: float, *, dp: int = 1, headroom: float = 0.9,
                max_cp: int = 256, **kwargs: Any) -> int | None:
    """The smallest power-of-two CP size that the model allows (heads, groups, halo lengths with the default
    schemes) and whose estimate fits ``headroom * gpu_gib``; None if none up to ``max_cp`` or until ``2 cp``
    stops dividing ``seq_len``."""
    from sh2.strategies.cp_ops import CPConfig, validate_cp_settings

    # The default FIR scheme (p2p) takes each chunk's first K - 1 inputs from the previous chunk: that halo
    # must fit in one chunk of L / (2 cp) tokens.
    windows = [cls.context_window(config) for cls in mixer_classes(config.operators) if cls.kind.sequence_op == "fir"]
    halo = max(windows, default=1) - 1
    cp = 1
    while cp <= max_cp and (cp == 1 or seq_len % (2 * cp) == 0):
        try:
            if cp > 1:
                validate_cp_settings(config, cp, CPConfig())
                if seq_len // (2 * cp) < halo:
                    return None  # larger cp only shortens chunks
        except ValueError:
            cp *= 2
            continue
        if estimate_training_memory(config, seq_len, cp=cp, dp=dp, **kwargs).total <= headroom * gpu_gib:
            return cp
        cp *= 2
    return None


def memory_report(config: SH2Config, seq_len: int, gpu_gib: float, *, cp: int = 1, dp: int = 1, batch: int = 1,
                  activation_checkpointing: bool = True, sharded: bool = True,
                  mixed_precision: str | None = "bf16", lora: LoRAConfig | None = None,
                  freeze: Sequence[str] | None = None) -> tuple[str, bool]:
    """A one-line estimate for the start of a run, and whether it predicts running out of memory.

    When it does, the line names the setting to change: a CP size that fits (``smallest_cp``), else shorter
    sequences or smaller batches, and activation checkpointing when it is off.
    """
    kwargs = dict(batch=batch, activation_checkpointing=activation_checkpointing, sharded=sharded,
                  mixed_precision=mixed_precision, lora=lora, freeze=freeze)
    est = estimate_training_memory(config, seq_len, cp=cp, dp=dp, **kwargs)
    msg = (f"[sh2] memory estimate (sh2.training.memory): {est.total:.1f} GiB per GPU of {gpu_gib:.0f} GiB "
           f"(states {est.states:.1f}, activations {est.activations + est.logits:.1f}, gathered block "
           f"{est.gathered:.1f})")
    over = est.total > 0.9 * gpu_gib
    if over:
        hints = []
        if not activation_checkpointing:
            hints.append("model.activation_checkpointing: true")
        fit = smallest_cp(config, seq_len, gpu_gib, dp=dp, **kwargs)
        if fit is not None and fit > cp:
            hints.append(f"context_parallel_size >= {fit} (trainer.strategy.init_args)")
        hints.append("a smaller data.seq_len or data.batch_size")
        msg += "; likely out of memory. Consider " + ", or ".join(hints)
    return msg, over


def main(argv: list[str] | None = None) -> None:
    """``python -m sh2.training.memory``: a table of the estimate for one preset and several CP sizes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="evo2_7b_1m")
    ap.add_argument("--layers", type=int, default=None,
                    help="override num_layers: the preset's layer pattern is repeated or cut to this many")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--no-optimizer", action="store_true")
    ap.add_argument("--fp32-weights", action="store_true", help="no FSDP2 bf16 mixed precision")
    ap.add_argument("--gpu-gib", type=float, default=79.2, help="GPU memory (H100 80GB: 79.2; H200: 139.8)")
    ap.add_argument("--lora-rank", type=int, default=None, help="a LoRA finetune with adapters of this rank")
    ap.add_argument("--lora-targets", nargs="+", default=None, help="LoRA target layers (default: every projection "
                    "and MLP linear)")
    ap.add_argument("--freeze", nargs="*", default=None, help="frozen parameter groups (model.freeze; with LoRA "
                    "default: base)")
    args = ap.parse_args(argv)
    config = SH2Config.from_name(args.preset)
    if args.layers:
        ops = config.operators
        config = SH2Config.from_name(args.preset, num_layers=args.layers,
                                     layout=[ops[i % len(ops)] for i in range(args.layers)])
    lora = None
    if args.lora_rank is not None or args.lora_targets is not None:
        lora = LoRAConfig(rank=args.lora_rank or LoRAConfig().rank,
                          targets=tuple(args.lora_targets) if args.lora_targets else None)
    counts = parameter_counts(config, lora, args.freeze)
    print(f"{args.preset} ({config.num_layers} layers, D = {config.hidden_size}), dp = {args.dp}, batch "
          f"{args.batch}, checkpointing {not args.no_checkpointing}, optimizer {not args.no_optimizer}, weights "
          f"{'fp32' if args.fp32_weights else 'bf16 (FSDP2 mixed precision)'}; "
          f"GiB per GPU (fits: <= 90% of {args.gpu_gib:g})")
    if counts.trainable != counts.total:
        what = (f"LoRA rank {lora.rank} on {', '.join(lora.targets or DEFAULT_TARGETS)}" if lora
                else f"frozen {', '.join(args.freeze)}")
        print(f"finetune: {what}; trainable {counts.trainable:,} of {counts.total:,} parameters")
    print(f"{'seq_len':>9} {'cp':>4} {'states':>8} {'gathered':>9} {'activ.':>8} {'logits':>7} {'total':>8}  fits")
    for seq_len in args.seq_len:
        for cp in args.cp:
            try:
                e = estimate_training_memory(config, seq_len, cp=cp, dp=args.dp, batch=args.batch,
                                             activation_checkpointing=not args.no_checkpointing,
                                             optimizer=not args.no_optimizer,
                                             mixed_precision=None if args.fp32_weights else "bf16",
                                             lora=lora, freeze=args.freeze)
            except ValueError as err:
                print(f"{seq_len:>9} {cp:>4}  {err}")
                continue
            fits = "yes" if e.total <= 0.9 * args.gpu_gib else "no"
            print(f"{seq_len:>9} {cp:>4} {e.states:8.1f} {e.gathered:9.1f} {e.activations:8.1f} {e.logits:7.1f} "
                  f"{e.total:8.1f}  {fits}")


if __name__ == "__main__":
    main()
