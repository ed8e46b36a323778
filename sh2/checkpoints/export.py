"""Export any checkpoint sh2 reads as sh2 safetensors (weights + config) or as an evo2-package Vortex file.

Usage::

    python -m sh2.checkpoints.export runs/tiny/version_0/checkpoints/last.ckpt export/tiny.safetensors
    python -m sh2.checkpoints.export CKPT export/tiny/                      # folder: model.safetensors + config.json
    python -m sh2.checkpoints.export CKPT export/tiny.pt --format vortex    # + export/tiny.yml, for the evo2 package
    python -m sh2.checkpoints.export arcinstitute/evo2_7b evo2_7b.safetensors --dtype bfloat16
    python -m sh2.checkpoints.export BASE merged.safetensors --adapters RUN/checkpoints/adapters.safetensors

The source is anything ``model.init_from`` accepts: an sh2 Lightning ``.ckpt`` (file or sharded folder), an
sh2 state dict or safetensors file, a Vortex or Savanna Evo 2 checkpoint, or a Hugging Face repo id. Its config
comes from the checkpoint (``--preset`` for a plain state dict without one). The result loads back with
``model.init_from`` / :func:`sh2.checkpoints.load_pretrained`.

LoRA: the checkpoint of a LoRA run exports with its adapters merged into the weights (``W + (alpha / r) B A``);
``--adapters FILE`` merges an adapter-only file (``adapters.safetensors``) into the source's weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sh2.checkpoints.adapters import merge_adapters, read_adapters
from sh2.checkpoints.files import CheckpointError
from sh2.checkpoints.loading import read_checkpoint
from sh2.checkpoints.safetensors_file import save_safetensors
from sh2.checkpoints.state import _outside_zero_init
from sh2.checkpoints.vortex import save_vortex
from sh2.models.config import SH2Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(source: str, output: str, fmt: str = "safetensors", dtype: str | None = None,
                      preset: str | None = None, trust_pickle: bool = False,
                      vortex_config: str | None = None, adapters: str | None = None) -> list[Path]:
    """Convert ``source`` to ``output`` (see the module docstring); returns the files written.

    ``adapters``: an adapter file (``adapters.safetensors`` of a LoRA run) to merge into the source's weights.

    Raises:
        CheckpointError: an unreadable source, a source without config and no ``preset``, an output name that
            does not fit the format, adapters that do not fit the weights.
    """
    if fmt not in ("safetensors", "vortex"):
        raise CheckpointError(f"--format must be 'safetensors' or 'vortex', got {fmt!r}")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    out = Path(output)
    if fmt == "vortex" and out.suffix != ".pt":
        raise CheckpointError(f"{output}: a Vortex export is a .pt file (its YAML config is written beside it)")
    if fmt == "safetensors" and out.suffix not in ("", ".safetensors"):
        raise CheckpointError(f"{output}: name a .safetensors file or a folder (model.safetensors + config.json)")
    target = SH2Config.from_name(preset) if preset else None
    with _outside_zero_init():
        config, state, _ = read_checkpoint(source, target, vortex_config=vortex_config, trust_pickle=trust_pickle)
    if config is None:
        raise CheckpointError(f"{source} holds weights without a config; pass --preset NAME (an SH2Config preset "
                              f"such as tiny or evo2_7b_8k)")
    if adapters is not None:
        tensors, lora, _, _ = read_adapters(adapters)
        state = merge_adapters(state, tensors, lora, f"{source} + {adapters}")
    weights = state.materialize()
    cast = DTYPES[dtype] if dtype else None
    if fmt == "vortex":
        out.parent.mkdir(parents=True, exist_ok=True)
        return list(save_vortex(weights, config, out, dtype=cast))
    written = save_safetensors(weights, config, out, dtype=cast)
    return [written] + ([out / "config.json"] if out.suffix == "" else [])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m sh2.checkpoints.export SOURCE OUTPUT``)."""
    parser = argparse.ArgumentParser(prog="python -m sh2.checkpoints.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="checkpoint file or folder, or a Hugging Face repo id (ORG/NAME[:FILE])")
    parser.add_argument("output", help="NAME.safetensors, a folder, or NAME.pt with --format vortex")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "vortex"), dest="fmt")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="cast the weights (LI poles/residues stay float32); default: keep")
    parser.add_argument("--preset", default=None, help="SH2Config preset of a state dict that has no config")
    parser.add_argument("--vortex-config", default=None, help="the evo2 YAML of a Vortex source")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow pickled objects in the source (trusted files only)")
    parser.add_argument("--adapters", default=None,
                        help="a LoRA adapter file (adapters.safetensors) to merge into the source's weights")
    args = parser.parse_args(argv)
    try:
        paths = export_checkpoint(args.source, args.output, args.fmt, args.dtype, args.preset, args.trust_pickle,
                                  args.vortex_config, args.adapters)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[sh2] exported {args.source} -> {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
