"""The operator kinds of SH2 models, listed once.

Each kind is a :class:`~sh2.models.mixer.Mixer` subclass that declares its :class:`~sh2.models.mixer.OperatorKind`
and implements what the kind computes, its decoding and its cost (see :mod:`sh2.models.mixer`):

- ``SE`` (layout symbol ``S``, :class:`~sh2.models.hyena.HyenaSE`): ``q * conv_h(k v)`` with short explicit
  grouped filters;
- ``MR`` (``D``, :class:`~sh2.models.hyena.HyenaMR`): ``q * (conv_h(k v) + Dskip k v)`` with decayed grouped filters;
- ``LI`` (``H``, :class:`~sh2.models.hyena.HyenaLI`): the same with one sequence-long modal filter per channel;
- ``MHA`` (``*``, :class:`~sh2.models.attention.Attention`): causal multi-head attention with RoPE.

Everything that depends on the kind of a layer asks here: layout parsing (symbols and words), block
construction (:data:`MIXERS`), decoding (the mixer's ``prefill``/``step``), checkpoint conversion
(``kind.evo2``), FLOPs and memory accounting. Adding an operator kind, or a second algorithm for one, means
writing or changing its mixer class and, for a new kind, adding the class to ``_MIXER_CLASSES`` below.
"""

from __future__ import annotations

from collections.abc import Iterable

from sh2.models.attention import Attention
from sh2.models.hyena import HyenaLI, HyenaMR, HyenaSE
from sh2.models.mixer import Mixer, OperatorKind

_MIXER_CLASSES: tuple[type[Mixer], ...] = (HyenaSE, HyenaMR, HyenaLI, Attention)

MIXERS: dict[str, type[Mixer]] = {cls.kind.name: cls for cls in _MIXER_CLASSES}
"""Kind name -> mixer class, in the canonical order (SE, MR, LI, MHA)."""

OPERATORS: tuple[str, ...] = tuple(MIXERS)
"""The kind names, as in ``SH2Config.operators``."""

LAYOUT_SYMBOLS: dict[str, str] = {cls.kind.symbol: cls.kind.name for cls in _MIXER_CLASSES}
"""Compact-layout character -> kind name."""

LAYOUT_WORDS: dict[str, str] = {word: cls.kind.name for cls in _MIXER_CLASSES
                                for word in (cls.kind.name, *cls.kind.aliases)}
"""Upper-case layout word (name or alias) -> kind name."""


def mixer_class(name: str) -> type[Mixer]:
    """The mixer class of an operator kind.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown operator kind {name!r}; known kinds: {list(OPERATORS)}") from None


def operator_kind(name: str) -> OperatorKind:
    """The declaration of an operator kind (see :func:`mixer_class` for errors)."""
    return mixer_class(name).kind


def mixer_classes(operators: Iterable[str]) -> list[type[Mixer]]:
    """The distinct mixer classes of a layout (e.g. ``config.operators``), in order of first appearance."""
    return [mixer_class(name) for name in dict.fromkeys(operators)]
