"""Benchmark cached generation: prefill a long prompt, then decode new tokens one at a time.

Builds a randomly initialised model of a preset (bf16 on CUDA, fp32 on CPU), prefills a random prompt
of ``--prompt-len`` tokens, decodes ``--new-tokens`` tokens (greedy) and reports prefill time, decode
tokens/s and peak memory, as JSON on stdout and in ``--out``.

Examples:
    PYTHONPATH=$PWD python bench/generate.py --preset evo2_7b_8k --prompt-len 100000 --new-tokens 1000 --out gen_7b.json
    PYTHONPATH=$PWD python bench/generate.py --preset tiny --prompt-len 256 --new-tokens 16      # CPU smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import time

import torch

from bench.common import sync
from sh2.inference import decode_step, prefill
from sh2.models import SH2Config, SH2Model


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> SH2Model:
    """A randomly initialised model, built on the meta device and materialised directly on ``device``."""
    config = SH2Config.from_name(preset)
    with torch.device("meta"):
        model = SH2Model(config)
    model.to_empty(device=device)
    model.init_weights()
    model.to(dtype)
    for block in model.blocks:  # LI poles and residues stay fp32, as in training
        if block.operator == "LI":
            block.mixer.filter.float()
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="kernel backend; auto falls back to torch when the Triton kernels are absent")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed prefill + 2 decode steps at the same shapes first (kernel compilation)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = args.backend
    if backend == "auto" and device.type == "cuda" and importlib.util.find_spec("sh2.kernels.fft") is None:
        backend = "torch"
    if backend != "auto":
        os.environ["SH2_KERNEL_BACKEND"] = backend

    torch.manual_seed(0)
    model = build_model(args.preset, device, dtype)
    params = model.num_parameters()
    prompt = torch.randint(2, 256, (args.batch_size, args.prompt_len), device=device)
    for _ in range(args.warmup):
        logits, cache = prefill(model, prompt, max_new_tokens=2, last_logits_only=True)
        for _ in range(2):
            logits = decode_step(model, logits.argmax(-1), cache)
        del logits, cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem_weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    sync(device)
    t0 = time.perf_counter()
    logits, cache = prefill(model, prompt, max_new_tokens=args.new_tokens, last_logits_only=True)
    sync(device)
    prefill_s = time.perf_counter() - t0
    peak_prefill = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

    token = logits.argmax(-1)
    warmup = min(2, args.new_tokens)
    for _ in range(warmup):
        token = decode_step(model, token, cache).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.new_tokens - warmup):
        token = decode_step(model, token, cache).argmax(-1)
    sync(device)
    decode_s = time.perf_counter() - t0
    timed = args.new_tokens - warmup

    result = {
        "preset": args.preset, "parameters": params, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "batch_size": args.batch_size, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(args.batch_size * args.prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(args.batch_size * timed / decode_s, 2) if timed > 0 else None,
        "decode_ms_per_step": round(1000 * decode_s / timed, 3) if timed > 0 else None,
        "weights_gib": round(mem_weights / 2**30, 3),
        "peak_prefill_gib": round(peak_prefill / 2**30, 3),
        "peak_total_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
