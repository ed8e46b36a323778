"""The context-parallel :class:`~sh2.models.seqops.SequenceOps` and the one CP config object.

:class:`CPConfig` holds every context-parallel setting (the CP size and one scheme per operator type); both
CP strategies take it as their ``cp`` argument (``cp: {size: 2, li_scheme: a2a, ...}`` in YAML) and it is
validated once, when it is built. :func:`sh2.strategies.parallelize.apply_context_parallel` sets a
:class:`CPSequenceOps` on every mixer (``block.mixer.ops``); the model keeps calling ``short_conv``, ``fir``,
``long_conv``, ``modal_conv`` and ``attention`` on its zig-zag shards and gets exactly the single-process result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sh2.models.config import SH2Config
from sh2.models.seqops import SequenceOps
from sh2.strategies.cp_attention import RingAttention, UlyssesAttention
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_conv import AllToAllConv, HaloConv, OverlappedHaloConv, PipelinedAllToAllConv
from sh2.strategies.cp_fft import P2PFFTConv
from sh2.strategies.cp_state import StateConv

SchemeFactory = Callable[[CPGroup, "CPConfig"], Any]

# The schemes of each operator type, by name: CPConfig accepts exactly these names and CPSequenceOps builds
# the implementation from them, so a new scheme is one entry here (and its limits in validate_cp_settings).
LI_SCHEMES: dict[str, SchemeFactory] = {
    "state": lambda cpg, cfg: StateConv(cpg),
    "a2a": lambda cpg, cfg: AllToAllConv(cpg),
    "a2a_pipelined": lambda cpg, cfg: PipelinedAllToAllConv(cpg, cfg.a2a_pipeline_chunks),
    "p2p_fft": lambda cpg, cfg: P2PFFTConv(cpg),
}
FIR_SCHEMES: dict[str, SchemeFactory] = {
    "p2p": lambda cpg, cfg: HaloConv(cpg),
    "p2p_overlap": lambda cpg, cfg: OverlappedHaloConv(cpg),
    "a2a": lambda cpg, cfg: AllToAllConv(cpg),
    "a2a_pipelined": lambda cpg, cfg: PipelinedAllToAllConv(cpg, cfg.a2a_pipeline_chunks),
}
FEATURIZER_SCHEMES: dict[str, SchemeFactory] = {
    "p2p": lambda cpg, cfg: HaloConv(cpg),
    "p2p_overlap": lambda cpg, cfg: OverlappedHaloConv(cpg),
}
ATTENTION_SCHEMES: dict[str, SchemeFactory] = {
    "a2a": lambda cpg, cfg: UlyssesAttention(cpg),
    "ring": lambda cpg, cfg: RingAttention(cpg, cfg.ring_attention_backend),
}
RING_ATTENTION_BACKENDS = ("auto", "flash", "math")

MOVED_STRATEGY_KEYS = {"context_parallel_size": "size", "li_scheme": "li_scheme", "fir_scheme": "fir_scheme",
                       "featurizer_scheme": "featurizer_scheme", "attention_scheme": "attention_scheme",
                       "a2a_pipeline_chunks": "a2a_pipeline_chunks",
                       "ring_attention_backend": "ring_attention_backend"}
"""Strategy arguments that are now fields of the strategies' ``cp`` argument: old name -> ``cp`` field."""


def moved_strategy_key_message(key: str, value: Any = "...") -> str:
    """The message for a strategy argument that moved into ``cp`` (``key`` in :data:`MOVED_STRATEGY_KEYS`)."""
    field = MOVED_STRATEGY_KEYS[key]
    return (f"strategy {key!r} moved: use cp: {{{field}: {value}}} "
            f"(trainer.strategy.init_args.cp.{field}; see docs/context_parallel.md)")


def refuse_moved_strategy_keys(kwargs: Mapping[str, Any]) -> None:
    """Raise a ValueError naming the new key for the first argument of ``kwargs`` that moved into ``cp``."""
    for key, value in kwargs.items():
        if key in MOVED_STRATEGY_KEYS:
            raise ValueError(moved_strategy_key_message(key, value))


@dataclass
class CPConfig:
    """Every context-parallel setting: the CP size and which algorithm each operator type uses.

    Attributes:
        size: ranks that share one sequence; must divide the world size. ``"auto"``: all processes of a
            node. Read by the strategies when they build the process mesh; the operators take the size of
            the :class:`CPGroup` they are given.
        li_scheme: Hyena-LI: ``state`` (default: the modal recurrence, passing ``[B, D, N]`` end states between
            ranks), ``a2a``, ``a2a_pipelined`` or ``p2p_fft`` (size a power of two).
        fir_scheme: Hyena-SE and Hyena-MR: ``p2p`` (default), ``p2p_overlap``, ``a2a`` or ``a2a_pipelined``.
        featurizer_scheme: the 3-tap featurizer of every Hyena layer: ``p2p`` (default) or ``p2p_overlap``.
        attention_scheme: MHA: ``a2a`` (Ulysses, default) or ``ring``.
        a2a_pipeline_chunks: channel slices of the ``a2a_pipelined`` schemes.
        ring_attention_backend: block kernel of ring attention: ``auto``, ``flash`` or ``math``.

    Raises:
        ValueError: naming the field (``cp.size``, ``cp.li_scheme``, ...) and the allowed values.
    """

    size: int | Literal["auto"] = 1
    li_scheme: str = "state"
    fir_scheme: str = "p2p"
    featurizer_scheme: str = "p2p"
    attention_scheme: str = "a2a"
    a2a_pipeline_chunks: int = 2
    ring_attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.size != "auto" and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"cp.size must be a positive integer or 'auto', got {self.size!r}")
        for name, allowed in (("li_scheme", LI_SCHEMES), ("fir_scheme", FIR_SCHEMES),
                              ("featurizer_scheme", FEATURIZER_SCHEMES), ("attention_scheme", ATTENTION_SCHEMES),
                              ("ring_attention_backend", RING_ATTENTION_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"cp.{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}")
        if (isinstance(self.a2a_pipeline_chunks, bool) or not isinstance(self.a2a_pipeline_chunks, int)
                or self.a2a_pipeline_chunks < 1):
            raise ValueError(f"cp.a2a_pipeline_chunks must be a positive integer, got {self.a2a_pipeline_chunks!r}")

    @classmethod
    def of(cls, value: CPConfig | Mapping[str, Any] | None) -> CPConfig:
        """``value`` as a CPConfig: a CPConfig as it is, a mapping of its fields (the YAML ``cp:``), or the
        defaults for None.

        Raises:
            ValueError: for a key that is not a CPConfig field (naming the fields) or a bad value.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"cp must be a mapping of context-parallel settings (e.g. cp: {{size: 2}}), got "
                             f"{type(value).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in fields]
        if unknown:
            hint = " (the CP size is cp.size)" if "context_parallel_size" in unknown else ""
            raise ValueError(f"cp.{unknown[0]} is not a context-parallel setting{hint}; the settings are "
                             f"{', '.join(fields)}")
        return cls(**value)


def validate_cp_settings(config: SH2Config, cp: int, cp_config: CPConfig) -> None:
    """Check at start that the model can run with this CP size and these schemes.

    Raises:
        ValueError: naming the setting (``cp.size``, ``se_groups``, ``num_heads``, ...).
    """
    if cp == 1:
        return
    ops = set(config.operators)
    if cp_config.fir_scheme.startswith("a2a"):
        for op, name in (("SE", "se_groups"), ("MR", "mr_groups")):
            groups = getattr(config, name)
            if op in ops and groups % cp:
                raise ValueError(f"{name}={groups} is not divisible by cp.size={cp} (needed by "
                                 f"cp.fir_scheme={cp_config.fir_scheme!r}: filter groups must not be split); use "
                                 f"cp.fir_scheme='p2p' or a cp.size that divides {groups}")
    if "LI" in ops:
        if cp_config.li_scheme.startswith("a2a") and config.hidden_size % cp:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by cp.size={cp} "
                             f"(needed by cp.li_scheme={cp_config.li_scheme!r})")
        if cp_config.li_scheme == "p2p_fft" and cp & (cp - 1):
            raise ValueError(f"cp.li_scheme='p2p_fft' needs cp.size to be a power of two, got {cp}")
    if "MHA" in ops and cp_config.attention_scheme == "a2a" and config.num_heads % cp:
        raise ValueError(f"num_heads={config.num_heads} is not divisible by cp.size={cp} (needed by "
                         f"cp.attention_scheme='a2a'); use cp.attention_scheme='ring' or another cp.size")


def check_sequence_length(length: int, cp: int) -> None:
    """Raise unless a sequence of ``length`` tokens splits into the ``2 * cp`` equal chunks of the zig-zag layout."""
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2 * cp.size = {2 * cp}; "
                         f"choose data.seq_len as a multiple of {2 * cp}")


class CPSequenceOps(SequenceOps):
    """Sequence mixing on zig-zag shards of a CP group; every method matches the single-process result.

    Args:
        cpg: the context-parallel group.
        config: the scheme of every operator type.
    """

    def __init__(self, cpg: CPGroup, config: CPConfig | None = None) -> None:
        self.cpg = cpg
        self.config = config or CPConfig()
        cfg = self.config
        self.featurizer = FEATURIZER_SCHEMES[cfg.featurizer_scheme](cpg, cfg)
        self.fir_impl = FIR_SCHEMES[cfg.fir_scheme](cpg, cfg)
        self.li_impl = LI_SCHEMES[cfg.li_scheme](cpg, cfg)
        self.attn_impl = ATTENTION_SCHEMES[cfg.attention_scheme](cpg, cfg)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[1] % 2:
            raise ValueError(f"a zig-zag shard holds two equal chunks; got a local length of {x.shape[1]} "
                             f"(the batch must be sharded by the ContextParallelStrategy)")

    def short_conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.featurizer.short_conv(x, w)

    def fir(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        self._check(q)
        return self.fir_impl.fir(q, k, v, h, bias)

    def long_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                  residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._check(q)
        return self.li_impl.long_conv(q, k, v, log_poles, residues, bias)

    def modal_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None, return_state: bool = False) -> torch.Tensor:
        self._check(q)
        if return_state:
            raise ValueError("the recurrent state of a context-parallel shard is not a sequence's state; prefill "
                             "and decoding run on one process")
        return self.li_impl.modal_conv(q, k, v, log_poles, residues, bias)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(q)
        return self.attn_impl.attention(q, k, v)

    def __repr__(self) -> str:
        c = self.config
        return (f"CPSequenceOps(cp={self.cpg.size}, rank={self.cpg.rank}, li={c.li_scheme}, fir={c.fir_scheme}, "
                f"featurizer={c.featurizer_scheme}, attention={c.attention_scheme})")
