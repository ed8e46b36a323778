"""The context-parallel :class:`~sh2.models.seqops.SequenceOps`: one scheme per operator type, from config.

:func:`sh2.strategies.parallelize.parallelize` sets an instance of :class:`CPSequenceOps` on every mixer
(``block.mixer.ops``); the model keeps calling ``short_conv``, ``fir``, ``long_conv`` and ``attention`` on
its zig-zag shards and gets exactly the single-process result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sh2.models.config import SH2Config
from sh2.models.seqops import SequenceOps
from sh2.strategies.cp_attention import RingAttention, UlyssesAttention
from sh2.strategies.cp_comm import CPGroup
from sh2.strategies.cp_conv import AllToAllConv, HaloConv, OverlappedHaloConv, PipelinedAllToAllConv
from sh2.strategies.cp_fft import P2PFFTConv

LI_SCHEMES = ("a2a", "a2a_pipelined", "p2p_fft")
FIR_SCHEMES = ("p2p", "p2p_overlap", "a2a", "a2a_pipelined")
FEATURIZER_SCHEMES = ("p2p", "p2p_overlap")
ATTENTION_SCHEMES = ("a2a", "ring")


@dataclass
class CPConfig:
    """Which context-parallel algorithm each operator type uses.

    Attributes:
        li_scheme: Hyena-LI: ``a2a`` (default), ``a2a_pipelined`` or ``p2p_fft`` (cp a power of two).
        fir_scheme: Hyena-SE and Hyena-MR: ``p2p`` (default), ``p2p_overlap``, ``a2a`` or ``a2a_pipelined``.
        featurizer_scheme: the 3-tap featurizer of every Hyena layer: ``p2p`` (default) or ``p2p_overlap``.
        attention_scheme: MHA: ``a2a`` (Ulysses, default) or ``ring``.
        a2a_pipeline_chunks: channel slices of the ``a2a_pipelined`` schemes.
        ring_attention_backend: block kernel of ring attention: ``auto``, ``flash`` or ``math``.
    """

    li_scheme: str = "a2a"
    fir_scheme: str = "p2p"
    featurizer_scheme: str = "p2p"
    attention_scheme: str = "a2a"
    a2a_pipeline_chunks: int = 2
    ring_attention_backend: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("li_scheme", LI_SCHEMES), ("fir_scheme", FIR_SCHEMES),
                              ("featurizer_scheme", FEATURIZER_SCHEMES), ("attention_scheme", ATTENTION_SCHEMES),
                              ("ring_attention_backend", ("auto", "flash", "math"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.a2a_pipeline_chunks, int) or self.a2a_pipeline_chunks < 1:
            raise ValueError(f"a2a_pipeline_chunks must be a positive integer, got {self.a2a_pipeline_chunks!r}")


def validate_cp_settings(config: SH2Config, cp: int, cp_config: CPConfig) -> None:
    """Check at start that the model can run with this CP size and these schemes.

    Raises:
        ValueError: naming the setting (``context_parallel_size``, ``se_groups``, ``num_heads``, ...).
    """
    if cp == 1:
        return
    ops = set(config.operators)
    if cp_config.fir_scheme.startswith("a2a"):
        for op, name in (("SE", "se_groups"), ("MR", "mr_groups")):
            groups = getattr(config, name)
            if op in ops and groups % cp:
                raise ValueError(f"{name}={groups} is not divisible by context_parallel_size={cp} (needed by "
                                 f"fir_scheme={cp_config.fir_scheme!r}: filter groups must not be split); use "
                                 f"fir_scheme='p2p' or a context_parallel_size that divides {groups}")
    if "LI" in ops:
        if cp_config.li_scheme.startswith("a2a") and config.hidden_size % cp:
            raise ValueError(f"hidden_size={config.hidden_size} is not divisible by context_parallel_size={cp} "
                             f"(needed by li_scheme={cp_config.li_scheme!r})")
        if cp_config.li_scheme == "p2p_fft" and cp & (cp - 1):
            raise ValueError(f"li_scheme='p2p_fft' needs context_parallel_size to be a power of two, got {cp}")
    if "MHA" in ops and cp_config.attention_scheme == "a2a" and config.num_heads % cp:
        raise ValueError(f"num_heads={config.num_heads} is not divisible by context_parallel_size={cp} (needed by "
                         f"attention_scheme='a2a'); use attention_scheme='ring' or another context_parallel_size")


def check_sequence_length(length: int, cp: int) -> None:
    """L must split into 2*cp equal zig-zag chunks (SPEC 3.1)."""
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2 * context_parallel_size = {2 * cp}; "
                         f"choose seq_len as a multiple of {2 * cp}")


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
        self.featurizer = OverlappedHaloConv(cpg) if cfg.featurizer_scheme == "p2p_overlap" else HaloConv(cpg)
        if cfg.fir_scheme == "a2a_pipelined":
            self.fir_impl: Any = PipelinedAllToAllConv(cpg, cfg.a2a_pipeline_chunks)
        else:
            self.fir_impl = {"p2p": HaloConv, "p2p_overlap": OverlappedHaloConv, "a2a": AllToAllConv}[
                cfg.fir_scheme](cpg)
        if cfg.li_scheme == "p2p_fft":
            self.li_impl: Any = P2PFFTConv(cpg)
        elif cfg.li_scheme == "a2a_pipelined":
            self.li_impl = PipelinedAllToAllConv(cpg, cfg.a2a_pipeline_chunks)
        else:
            self.li_impl = AllToAllConv(cpg)
        self.attn_impl: Any = (RingAttention(cpg, cfg.ring_attention_backend) if cfg.attention_scheme == "ring"
                               else UlyssesAttention(cpg))

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

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(q)
        return self.attn_impl.attention(q, k, v)

    def __repr__(self) -> str:
        c = self.config
        return (f"CPSequenceOps(cp={self.cpg.size}, rank={self.cpg.rank}, li={c.li_scheme}, fir={c.fir_scheme}, "
                f"featurizer={c.featurizer_scheme}, attention={c.attention_scheme})")
