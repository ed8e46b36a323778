"""Byte-level token ids for inference: id = UTF-8 byte, 0 = end of document, 1 = padding.

Kept to the few functions inference needs (batch encoding with left or right padding, decoding,
reverse complement) so that scoring and generation do not depend on the training data pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sh2.data.tokenizer import PAD_ID, ByteTokenizer

_DECODER = ByteTokenizer()
_COMPLEMENT = str.maketrans("ACGTUNacgtun", "TGCAANtgcaan")


def encode(text: str, uppercase: bool = False) -> list[int]:
    """UTF-8 bytes of ``text`` as ids (optionally upper-cased first)."""
    return list((text.upper() if uppercase else text).encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    """Text of byte ids; ids outside 32..255 (EOD, padding, control bytes, ids >= 256) are dropped."""
    return _DECODER.decode(list(ids))


def encode_batch(texts: Sequence[str] | Sequence[Sequence[int]], pad: str = "right", uppercase: bool = False,
                 max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and pad a batch.

    Args:
        texts: strings, or sequences of ids.
        pad: ``"right"`` (scoring: positions are untouched) or ``"left"`` (generation: prompts end together).
        uppercase: upper-case strings first.
        max_length: truncate each sequence to its first ``max_length`` tokens.

    Returns:
        ``(input_ids [B, L], attention_mask [B, L])`` with ``PAD_ID`` and mask 0 at padding.
    """
    if pad not in ("left", "right"):
        raise ValueError(f"pad must be 'left' or 'right', got {pad!r}")
    rows = [encode(t, uppercase) if isinstance(t, str) else [int(i) for i in t] for t in texts]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every sequence must have at least one token")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if pad == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def reverse_complement(seq: str) -> str:
    """Reverse complement of a DNA/RNA string (A<->T/U, C<->G, case kept; other characters kept)."""
    return seq.translate(_COMPLEMENT)[::-1]
