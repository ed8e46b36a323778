"""Low-rank adapters (LoRA) on the linear layers of an SH2 model, applied and merged from outside the model.

A LoRA layer computes ``y = W x + b + (alpha / r) * B (A dropout(x))`` with the pretrained ``W, b`` frozen and the
adapters ``A [r, in]`` (Kaiming-uniform, as ``nn.Linear`` initialises its weight) and ``B [out, r]`` (zeros)
trained: at initialisation the adapted model equals the pretrained one. :func:`apply_lora` replaces the
targeted ``nn.Linear`` modules by :class:`LoRALinear`, which keeps the base weight and bias under their own names,
so every state-dict key of the base model is unchanged and only ``...lora_A`` / ``...lora_B`` keys are added;
:func:`merge_lora` folds the adapters back, ``W' = W + (alpha / r) B A``, leaving plain ``nn.Linear`` modules.

Why not the ``peft`` package: it requires ``transformers`` and ``accelerate``, and its LoRA layers move the base
weight to ``...base_layer.weight``, which every sh2 checkpoint reader and writer (sh2, Vortex, Savanna,
safetensors) and the FSDP2 / activation-checkpointing / compile transforms would have to learn about. These
layers are plain modules: FSDP2 shards them with their block, activation checkpointing and ``torch.compile``
see an ordinary submodule, and the CP operators do not touch linears (see docs/genomics.md, "Finetune with
LoRA").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("in_proj", "out_proj", "qkv", "w1", "w2", "w3")
"""Every projection of the mixers (Hyena ``in_proj``/``out_proj``, attention ``qkv``/``out_proj``) and the MLP."""

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings (``model.lora`` in YAML).

    Attributes:
        rank: inner dimension ``r`` of the adapters.
        alpha: scale numerator: the update is ``(alpha / rank) * B A``.
        dropout: dropout on the adapters' input while training (0: none).
        targets: linear layers to adapt, each matched against the dotted module path by its last components:
            ``w1`` adapts every MLP's ``w1``, ``blocks.3.mlp.w2`` one layer. Names: ``in_proj``, ``out_proj``
            (Hyena), ``qkv``, ``out_proj`` (attention), ``w1``, ``w2``, ``w3`` (MLP), ``lm_head`` (an untied
            head). Each listed target must match a linear layer. None (default): every one of
            :data:`DEFAULT_TARGETS` the model has.
        save_adapters: write ``adapters.safetensors`` (the adapters alone, with these settings and the model
            config) beside every checkpoint of a run.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    save_adapters: bool = True

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"model.lora.rank must be a positive integer (got {self.rank!r})")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            problems.append(f"model.lora.alpha must be > 0 (got {self.alpha!r})")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.lora.dropout must be in [0, 1) (got {self.dropout!r})")
        targets = None
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            if not targets or not all(isinstance(t, str) and t.strip(".") for t in targets):
                problems.append(f"model.lora.targets must be a non-empty list of layer names such as "
                                f"{list(DEFAULT_TARGETS)}, or null for all of them (got {self.targets!r})")
        if problems:
            raise ValueError("Invalid LoRA settings: " + "; ".join(problems) + ".")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor of the low-rank update."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for checkpoint hyper-parameters and file metadata)."""
        return {**dataclasses.asdict(self), "targets": None if self.targets is None else list(self.targets)}

    @classmethod
    def coerce(cls, value: LoRAConfig | Mapping[str, Any] | None, setting: str = "model.lora") -> LoRAConfig | None:
        """``value`` as a :class:`LoRAConfig` (None stays None); a mapping's unknown keys are named in the error."""
        if value is None or isinstance(value, LoRAConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{setting} must be a mapping such as {{rank: 8, alpha: 16}}, got {value!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in known]
        if unknown:
            raise ValueError(f"{setting}.{unknown[0]} is not a LoRA setting; the settings are {known}")
        return cls(**value)


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update ``scaling * B A`` (``[out, in]``), computed in float32 (float64 stays float64)."""
    dtype = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
    return scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a trainable low-rank update: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters, under the same names, so the state
    dict keeps the base model's keys and adds ``lora_A`` ``[rank, in_features]`` and ``lora_B``
    ``[out_features, rank]`` (in the base weight's dtype and device).

    Args:
        base: the layer to adapt.
        rank: adapter rank ``r``.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the adapters' input (training only).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise the adapters only (``B = 0``: the update starts at zero); the base weight is the
        pretrained one (``SH2Model.init_weights`` initialises it through the layer that owns it)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scaling * B A`` (in the base weight's dtype) and the same bias."""
        weight = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = lora_delta(self.lora_A, self.lora_B, self.scaling)
        merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
        linear.weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (adapted or not), in model order."""
    names = [p.rpartition(".")[2] for p, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear)]
    return list(dict.fromkeys(names))


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` that a target names by a :class:`LoRALinear`, in place.

    Call it after the pretrained weights are loaded and before activation checkpointing, compilation and the
    strategy's parallelism. Idempotent: layers that are already adapted are left as they are.

    Args:
        model: an :class:`~sh2.models.SH2Model` (any module works).
        config: rank, alpha, dropout and targets.

    Returns:
        The dotted paths of the adapted layers.

    Raises:
        ValueError: a target that matches no linear layer (naming ``model.lora.targets`` and the layer names
            that exist); with the default targets, a model that has none of them.
    """
    modules = dict(model.named_modules())
    targets = config.targets or DEFAULT_TARGETS
    matched: dict[str, list[str]] = {t: [] for t in targets}
    for path in modules:
        for target in targets:
            if path and _matches(path, target):
                matched[target].append(path)
    if config.targets is None:  # the default: whichever of the usual projections this layout has
        targets = tuple(t for t, paths in matched.items() if paths) or DEFAULT_TARGETS
        matched = {t: matched[t] for t in targets}
    for target, paths in matched.items():
        linear = [p for p in paths if isinstance(modules[p], nn.Linear | LoRALinear)]
        if not linear:
            what = (f"matches {paths[0]!r}, which is a {type(modules[paths[0]]).__name__}, not a linear layer"
                    if paths else "matches no module of the model")
            raise ValueError(f"model.lora.targets: {target!r} {what}. Targets name linear layers by their last "
                             f"path components: {linear_names(model)} (e.g. 'w1', or 'blocks.0.mlp.w2' for "
                             f"one layer).")
    adapted = []
    for path, module in modules.items():
        if not path or not any(_matches(path, t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            _set_submodule(model, path, LoRALinear(module, config.rank, config.alpha, config.dropout))
            adapted.append(path)
        elif isinstance(module, LoRALinear):
            adapted.append(path)
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` of ``model`` into a plain ``nn.Linear`` (``W + (alpha / r) B A``), in place.

    The state dict then has exactly the keys of the base model, so it exports to every sh2 format.

    Returns:
        The number of layers merged.
    """
    paths = [p for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    for path in paths:
        _set_submodule(model, path, model.get_submodule(path).merged())
    return len(paths)


def is_adapter_key(name: str) -> bool:
    """Whether a parameter or state-dict key is a LoRA adapter (``...lora_A`` / ``...lora_B``)."""
    return name.endswith(ADAPTER_SUFFIXES)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of ``model`` by name, in model order."""
    return {n: p for n, p in model.named_parameters() if is_adapter_key(n)}
