"""The model configuration: one dataclass, presets as data, layout parsing."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from sh2.models.filters import MR_DECAY_PRESETS
from sh2.models.operators import LAYOUT_SYMBOLS, LAYOUT_WORDS, OPERATORS

# Layout tokens: parentheses, a repeat 'xN', a word or compact pattern of letter symbols, '*', a comma. Layout
# symbols are letters other than x/X, or '*'.
_TOKEN = re.compile(r"\s*(\(|\)|[xX]\s*\d+|[A-WYZa-wyz]+|\*|,)\s*")


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"layout: cannot parse {text!r} at position {pos} ({text[pos:pos + 10]!r}); use "
                             f"{'/'.join(OPERATORS)} words or {'/'.join(LAYOUT_SYMBOLS)} symbols, '(...)xN' to "
                             f"repeat")
        tokens.append(m.group(1).replace(" ", ""))
        pos = m.end()
    return [t for t in tokens if t != ","]


def _expand_word(tok: str) -> list[str]:
    up = tok.upper()
    if up in LAYOUT_WORDS:
        return [LAYOUT_WORDS[up]]
    ops = []
    for ch in up:  # compact pattern such as "SDH"
        if ch not in LAYOUT_SYMBOLS:
            symbols = ", ".join(f"{sym} ({name})" for sym, name in LAYOUT_SYMBOLS.items())
            raise ValueError(f"layout: unknown operator symbol {ch!r} in {tok!r}; allowed words "
                             f"{sorted(LAYOUT_WORDS)} or symbols {symbols}")
        ops.append(LAYOUT_SYMBOLS[ch])
    return ops


def parse_layout(layout: str | list[str] | tuple[str, ...]) -> list[str]:
    """Parse a layout into a list of operator names (``SE``, ``MR``, ``LI``, ``MHA``), one per layer.

    Accepted forms: a list of words (``["SE", "MR", "LI", "MHA"]``; also each kind's aliases, see
    :mod:`sh2.models.operators`), a string of words (``"SE MR LI MHA"``), the compact pattern (``"SDH*"``:
    S=SE, D=MR, H=LI, *=MHA) and repeats with
    ``(...)xN`` or ``Xx N`` (``"(SDH)x2*"`` -> SE MR LI SE MR LI MHA; ``"Sx3"`` -> SE SE SE).

    Raises:
        ValueError: naming the unparsable part and the allowed symbols.
    """
    if isinstance(layout, (list, tuple)):
        return [op for item in layout for op in parse_layout(str(item))]
    tokens = _tokenize(layout)
    stack: list[list[str]] = [[]]
    last: list[str] = []
    for tok in tokens:
        if tok == "(":
            stack.append([])
            last = []
        elif tok == ")":
            if len(stack) == 1:
                raise ValueError(f"layout: unbalanced ')' in {layout!r}")
            last = stack.pop()
            stack[-1].extend(last)
        elif tok[0] in "xX" and tok[1:].isdigit():
            if not last:
                raise ValueError(f"layout: repeat {tok!r} in {layout!r} follows nothing")
            stack[-1].extend(last * (int(tok[1:]) - 1))
            last = []
        elif tok == "*":
            last = [LAYOUT_SYMBOLS["*"]]
            stack[-1].extend(last)
        else:
            ops = _expand_word(tok)
            last = ops[-1:] if len(ops) > 1 else ops  # 'SDHx2' repeats the last symbol only
            stack[-1].extend(ops)
    if len(stack) != 1:
        raise ValueError(f"layout: unbalanced '(' in {layout!r}")
    return stack[0]


def stripe_layout(num_layers: int, attn_layers: tuple[int, ...]) -> str:
    """Evo 2's stripe: MHA at ``attn_layers``; the other layers cycle SE, MR, LI (the cycle skips MHA)."""
    out, j = [], 0
    for i in range(num_layers):
        if i in attn_layers:
            out.append("*")
        else:
            out.append("SDH"[j % 3])
            j += 1
    return "".join(out)


def layout_string(ops: list[str]) -> str:
    """The compact pattern of a parsed layout."""
    inv = {v: k for k, v in LAYOUT_SYMBOLS.items()}
    return "".join(inv[o] for o in ops)


LI_ALGORITHMS = ("modal", "fft")


@dataclass
class SH2Config:
    """Configuration of a StripedHyena 2 model (see docs/design.md, the model).

    Attributes:
        name: preset name or a free label.
        vocab_size: vocabulary (512 byte ids).
        hidden_size: width D.
        num_layers: depth.
        num_heads: attention heads (head size = hidden_size // num_heads).
        num_kv_heads: key/value heads for grouped-query attention (None = num_heads, as in Evo 2).
        mlp_hidden_size: inner size F of the gated MLP.
        mlp_activation: ``gelu`` (every layer) or ``evo2`` (exact GELU in layer 0, identity after).
        layout: operator of every layer (see :func:`parse_layout`); normalised to the compact pattern.
        featurizer_len: taps of the featurizer's depthwise causal convolution.
        se_filter_len: taps of Hyena-SE filters.
        mr_filter_len: taps of Hyena-MR filters.
        se_groups: filter groups of Hyena-SE (channels per group = hidden_size // se_groups).
        mr_groups: filter groups of Hyena-MR.
        li_state_size: poles per channel of the Hyena-LI modal filter.
        li_algorithm: how Hyena-LI is computed: ``modal`` (its exact recurrence, O(L D N); the default) or
            ``fft`` (an fp32 FFT convolution with the materialised filter). The same operator and parameters;
            see docs/design.md, "Hyena-LI as a recurrence".
        mr_decay: MR decay preset, ``weak`` (1e-2..1e2), ``normal`` (1e-1..1e2) or ``strong`` (1..1e2).
        mr_ref_len: T_ref of the MR decay (a constant, independent of the batch length).
        norm_eps: RMSNorm epsilon (added outside the root).
        rope_base: RoPE base.
        rope_scaling: position-interpolation factor (positions are divided by it).
        tie_embeddings: LM head shares the embedding matrix.
        hyena_out_bias: bias of the Hyena output projection.
        attn_out_bias: bias of the attention output projection.
        max_seq_len: the context length the preset was trained for (informational).
        init_std: standard deviation of linear-layer initialisation.
    """

    name: str = "custom"
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int | None = None
    mlp_hidden_size: int = 704
    mlp_activation: str = "gelu"
    layout: str = "SDH*"
    featurizer_len: int = 3
    se_filter_len: int = 7
    mr_filter_len: int = 128
    se_groups: int = 16
    mr_groups: int = 16
    li_state_size: int = 16
    li_algorithm: str = "modal"
    mr_decay: str = "weak"
    mr_ref_len: int = 8192
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_scaling: float = 1.0
    tie_embeddings: bool = True
    hyena_out_bias: bool = True
    attn_out_bias: bool = True
    max_seq_len: int = 8192
    init_std: float = 0.02
    operators: list[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(field_name: str, msg: str) -> ValueError:
            return ValueError(f"SH2Config.{field_name}: {msg}")

        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_hidden_size", "featurizer_len",
                  "se_filter_len", "mr_filter_len", "se_groups", "mr_groups", "li_state_size", "mr_ref_len",
                  "max_seq_len"):
            val = getattr(self, f)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise bad(f, f"must be a positive integer, got {val!r}")
        if self.mlp_activation not in ("gelu", "evo2"):
            raise bad("mlp_activation", f"must be 'gelu' or 'evo2', got {self.mlp_activation!r}")
        if self.li_algorithm not in LI_ALGORITHMS:
            raise bad("li_algorithm", f"must be one of {LI_ALGORITHMS}, got {self.li_algorithm!r}")
        if self.mr_decay not in MR_DECAY_PRESETS:
            raise bad("mr_decay", f"must be one of {sorted(MR_DECAY_PRESETS)}, got {self.mr_decay!r}")
        if self.hidden_size % self.num_heads:
            raise bad("num_heads", f"{self.num_heads} heads do not divide hidden_size={self.hidden_size}")
        kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
        if kv < 1 or self.num_heads % kv:
            raise bad("num_kv_heads", f"{kv} must be >= 1 and divide num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise bad("num_heads", f"head size {self.hidden_size // self.num_heads} must be even for RoPE")
        for f in ("se_groups", "mr_groups"):
            if self.hidden_size % getattr(self, f):
                raise bad(f, f"{getattr(self, f)} groups do not divide hidden_size={self.hidden_size}; "
                             f"choose a divisor (e.g. hidden_size // 16)")
        if self.norm_eps <= 0 or self.rope_base <= 0 or self.rope_scaling <= 0 or self.init_std <= 0:
            raise bad("norm_eps/rope_base/rope_scaling/init_std", "must be positive")
        try:
            ops = parse_layout(self.layout)
        except ValueError as err:
            raise bad("layout", str(err)) from None
        if len(ops) != self.num_layers:
            raise bad("layout", f"{self.layout!r} names {len(ops)} layers but num_layers={self.num_layers}")
        self.layout = layout_string(ops)
        self.operators = ops

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (for checkpoints and YAML)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **changes: Any) -> SH2Config:
        """A copy with some fields changed (validated again)."""
        return SH2Config.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SH2Config:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SH2Config: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> SH2Config:
        """A preset by name (see :data:`PRESETS`), optionally with some fields overridden.

        ``NAME_transformer`` gives the same width and depth with every layer MHA (the baseline).
        """
        base = name
        transformer = name.endswith("_transformer")
        if transformer:
            base = name[: -len("_transformer")]
        if base not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
        values = {**PRESETS[base], "name": name}
        if transformer:
            values["layout"] = f"*x{values['num_layers']}"
        return cls.from_dict({**values, **overrides})


def _evo2(layers: int, width: int, heads: int, mlp: int, groups: int, attn: tuple[int, ...],
          rope_base: float, scaling: float, max_len: int) -> dict[str, Any]:
    return dict(hidden_size=width, num_layers=layers, num_heads=heads, mlp_hidden_size=mlp, se_groups=groups,
                mr_groups=groups, layout=stripe_layout(layers, attn), rope_base=rope_base, rope_scaling=scaling,
                max_seq_len=max_len, mlp_activation="evo2", mr_decay="weak", mr_ref_len=8192)


_ATTN_7B = (3, 10, 17, 24, 31)
_ATTN_40B = (3, 10, 17, 24, 31, 35, 42, 49)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_layers=6, num_heads=2, mlp_hidden_size=352, se_groups=8, mr_groups=8,
                 layout="SDH*SD", mr_filter_len=64, mr_ref_len=1024, max_seq_len=1024,
                 mlp_activation="gelu"),
    "evo2_1b_8k": _evo2(25, 1920, 15, 5120, 128, (3, 10, 17, 24), 1e4, 1.0, 8192),
    "evo2_7b_8k": _evo2(32, 4096, 32, 11008, 256, _ATTN_7B, 1e4, 1.0, 8192),
    "evo2_7b_1m": _evo2(32, 4096, 32, 11264, 256, _ATTN_7B, 1e4, 128.0, 1048576),
    "evo2_40b_8k": _evo2(50, 8192, 64, 21888, 512, _ATTN_40B, 1e6, 1.0, 8192),
    "evo2_40b_1m": _evo2(50, 8192, 64, 22528, 512, _ATTN_40B, 1e6, 128.0, 1048576),
}


def available_presets() -> list[str]:
    """Every name :meth:`SH2Config.from_name` accepts."""
    return sorted(PRESETS) + sorted(f"{n}_transformer" for n in PRESETS)
