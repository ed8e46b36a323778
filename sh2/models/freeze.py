"""Parameter groups of an SH2 model by role, and freezing them (``model.freeze`` in YAML).

Every parameter belongs to exactly one group, decided by the type of the module that holds it (not by name
patterns, so a new operator kind cannot silently fall into the wrong group):

==================== =============================================================================
group                parameters
==================== =============================================================================
``embeddings``       the token embedding (also the output head when tied) and an untied ``lm_head``
``norms``            every RMSNorm scale: ``norm_in`` and ``norm_mlp`` of each block, the final norm
``attention``        the projections of attention mixers: ``qkv``, ``out_proj`` (and its bias)
``hyena_projections`` ``in_proj`` and ``out_proj`` (and its bias) of Hyena mixers
``featurizer``       the Hyena featurizer taps ``short_filter``
``hyena_filters``    the SE/MR/LI filter parameters (``filter.h``, ``filter.hhat``, ``filter.p``, ``gamma``,
                     ``R``) and the skip vector ``skip`` (Dskip)
``mlp``              the gated MLPs ``w1``, ``w2``, ``w3``
``adapters``         LoRA ``lora_A`` / ``lora_B`` (:mod:`sh2.models.lora`); never frozen by a group name
==================== =============================================================================

Shorthands: ``hyena`` = ``hyena_projections`` + ``featurizer`` + ``hyena_filters``; ``mixers`` = ``attention`` +
``hyena``; ``base`` = every group but ``adapters`` (what a LoRA run freezes by default). An entry that is not a
group name is a parameter-name prefix: ``blocks.0`` freezes the first block, ``blocks.3.mlp`` one MLP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from sh2.models.attention import Attention
from sh2.models.hyena import HyenaOperator
from sh2.models.layers import GatedMLP, RMSNorm
from sh2.models.lora import is_adapter_key

GROUPS = ("embeddings", "norms", "attention", "hyena_projections", "featurizer", "hyena_filters", "mlp", "adapters")
SHORTHANDS = {
    "hyena": ("hyena_projections", "featurizer", "hyena_filters"),
    "mixers": ("attention", "hyena_projections", "featurizer", "hyena_filters"),
    "base": tuple(g for g in GROUPS if g != "adapters"),
}


def _hyena_group(name: str) -> str:
    if name.startswith(("in_proj.", "out_proj.")):
        return "hyena_projections"
    if name == "short_filter":
        return "featurizer"
    return "hyena_filters"


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """The group of every parameter of ``model`` (see the module docstring), by parameter name.

    Raises:
        ValueError: a parameter held by a module type that no group covers (a new layer type must be given a
            group here).
    """
    roles: dict[str, str] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.Embedding) or path == "lm_head":
            role = "embeddings"
        elif isinstance(module, RMSNorm):
            role = "norms"
        elif isinstance(module, GatedMLP):
            role = "mlp"
        elif isinstance(module, Attention):
            role = "attention"
        elif isinstance(module, HyenaOperator):
            role = None
        else:
            continue
        for name, _ in module.named_parameters():
            roles.setdefault(prefix + name, role or _hyena_group(name))
    for name, _ in model.named_parameters():
        if is_adapter_key(name):
            roles[name] = "adapters"
        elif name not in roles:
            raise ValueError(f"parameter {name!r} belongs to no freeze group (sh2/models/freeze.py knows "
                             f"{list(GROUPS)}); give its module type a group there")
    return roles


def _expand(entries: Iterable[str], roles: dict[str, str], setting: str) -> set[str]:
    names: set[str] = set()
    for entry in entries:
        if entry == "adapters":
            raise ValueError(f"{setting}: 'adapters' cannot be frozen (they are what a LoRA run trains); remove "
                             f"model.lora instead to train without adapters")
        groups = SHORTHANDS.get(entry, (entry,) if entry in GROUPS else None)
        if groups is not None:
            names |= {n for n, role in roles.items() if role in groups}
            continue
        prefixed = {n for n in roles if n == entry or n.startswith(entry.rstrip(".") + ".")}
        if not prefixed:
            raise ValueError(f"{setting}: {entry!r} is neither a parameter group nor the prefix of a parameter "
                             f"name. Groups: {[g for g in GROUPS if g != 'adapters']}, shorthands: "
                             f"{list(SHORTHANDS)}; or a prefix such as 'blocks.0' or 'blocks.3.mlp'.")
        names |= prefixed
    return names


def freeze_parameters(model: nn.Module, groups: Sequence[str], setting: str = "model.freeze") -> list[str]:
    """Set ``requires_grad = False`` on every parameter of the named groups or name prefixes, in place.

    Args:
        model: an :class:`~sh2.models.SH2Model`, possibly with LoRA layers.
        groups: group names, shorthands or parameter-name prefixes (see the module docstring).
        setting: the setting named in errors.

    Returns:
        The names of the frozen parameters, in model order.

    Raises:
        ValueError: an entry that is no group and no prefix, or ``adapters``.
    """
    if isinstance(groups, str):
        groups = [groups]
    roles = parameter_roles(model)
    frozen = _expand(groups, roles, setting)
    out = []
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
            out.append(name)
    return out
