"""Pretrained weights: sh2, Vortex (evo2 package) and Savanna checkpoints (local or by Hugging Face repo id), and
export to sh2 safetensors and Vortex.

Example:
    >>> from sh2.checkpoints import load_pretrained, load_into, save_safetensors, save_vortex
    >>> config, state = load_pretrained("evo2_7b.pt")        # format detected; evo2_7b.yml beside it
    >>> load_into(model, "runs/x/checkpoints/last.ckpt")      # validate, convert, copy in place
    >>> save_vortex(model, model.config, "export/my_model.pt")  # + export/my_model.yml for the evo2 package
    >>> save_safetensors(model, model.config, "export/my_model.safetensors")  # config in the metadata
    >>> load_adapters(model, "runs/x/checkpoints/adapters.safetensors")  # LoRA adapters into an adapted model
"""

from sh2.checkpoints.adapters import load_adapters, read_adapters, save_adapters
from sh2.checkpoints.files import CheckpointError, CheckpointHint, assemble_shards, load_file, shard_paths
from sh2.checkpoints.loading import detect_format, load_into, load_pretrained, read_checkpoint
from sh2.checkpoints.safetensors_file import save_safetensors
from sh2.checkpoints.savanna import read_savanna, savanna_to_sh2
from sh2.checkpoints.state import LazyStateDict, check_state, expected_shapes
from sh2.checkpoints.vortex import read_vortex, save_vortex, sh2_to_vortex, vortex_to_sh2
from sh2.checkpoints.vortex_config import config_from_vortex, infer_config, vortex_from_config

__all__ = ["CheckpointError", "CheckpointHint", "LazyStateDict", "assemble_shards", "check_state", "config_from_vortex",
           "detect_format", "expected_shapes", "infer_config", "load_adapters", "load_file", "load_into",
           "load_pretrained", "read_adapters", "save_adapters",
           "read_checkpoint", "read_savanna", "read_vortex", "save_safetensors", "save_vortex", "savanna_to_sh2",
           "shard_paths", "sh2_to_vortex", "vortex_from_config", "vortex_to_sh2"]
