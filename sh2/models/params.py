"""AdamW parameter groups: weight decay on matrices only."""

from __future__ import annotations

from torch import nn

# Parameter-name fragments that never get weight decay: norms, biases, every filter parametrisation, the
# featurizer, Dskip and the embeddings.
NO_DECAY_MARKERS = ("norm", "bias", ".filter.", "short_filter", ".skip", "embedding")


def is_no_decay(name: str) -> bool:
    """True for parameters excluded from weight decay (by name, so it works on sharded models)."""
    dotted = f".{name}"
    return any(m in dotted for m in NO_DECAY_MARKERS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``weight_decay`` on projection/MLP matrices, 0 on everything else."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
