"""Byte-level tokenizer with per-token loss weights (docs/design.md, "Tokenizer and loss weights").

A token id is the value of one UTF-8 byte (0..255) in a vocabulary of 512 ids. Id 0 marks the end of a
document (EOD), id 1 is padding, and there is no beginning-of-sequence token. Everything is vectorized
with numpy: a document is turned into a ``uint8`` array with one ``np.frombuffer`` call and every
option is a boolean mask over that array, so a megabase genome tokenizes in about a millisecond.

The loss-weight options are the ones Evo 2 trains DNA with:

* ``uppercase``: ASCII ``a-z`` become ``A-Z`` in the inputs (byte-wise, so the length never changes).
* ``lowercase_loss_weight``: positions whose *original* character was ASCII lowercase (soft-masked
  repeats in genome assemblies) get this weight instead of 1 (Evo 2 uses 0.1).
* ``mask_control_chars``: bytes below 32 inside a document (newlines, tabs, ...) get weight 0. The EOD
  separator added by packing is not a document byte and always keeps weight 1.
* ``mask_tags``: spans delimited by ``|`` (for example ``|d__Bacteria;p__...|``), delimiters
  included, get weight 0. Delimiters pair up left to right; an unterminated ``|`` masks the rest of
  the document.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

VOCAB_SIZE = 512
EOD_ID = 0
PAD_ID = 1
TAG_DELIMITER = ord("|")

_LOWER_A, _LOWER_Z = ord("a"), ord("z")
_CASE_OFFSET = ord("a") - ord("A")


class ByteTokenizer:
    """UTF-8 byte tokenizer (vocabulary 512, EOD 0, PAD 1, no BOS) with loss weights.

    The defaults are a plain byte tokenizer (every weight 1, no case change). The DNA settings of
    Evo 2 are ``uppercase=True, lowercase_loss_weight=0.1, mask_control_chars=True, mask_tags=True``
    (the defaults of :class:`sh2.data.SH2DataModule`).

    Args:
        uppercase: Upper-case ASCII letters in the token ids.
        lowercase_loss_weight: Loss weight of positions whose original character was ASCII lowercase.
        mask_control_chars: Give zero loss weight to document bytes below 32.
        mask_tags: Give zero loss weight to ``|...|`` spans, delimiters included.

    Example:
        >>> tok = ByteTokenizer(uppercase=True, lowercase_loss_weight=0.1)
        >>> ids, weights = tok.encode_with_weights("ACgt")
        >>> tok.decode(ids), weights.tolist()
        ('ACGT', [1.0, 1.0, 0.10000000149011612, 0.10000000149011612])
    """

    vocab_size: int = VOCAB_SIZE
    eod_id: int = EOD_ID
    pad_id: int = PAD_ID

    def __init__(
        self,
        uppercase: bool = False,
        lowercase_loss_weight: float = 1.0,
        mask_control_chars: bool = False,
        mask_tags: bool = False,
    ) -> None:
        if not 0.0 <= lowercase_loss_weight:
            raise ValueError(
                f"data.lowercase_loss_weight must be >= 0 (got {lowercase_loss_weight}); "
                "use 0.1 for Evo 2 soft-masking or 1.0 to weight every position equally."
            )
        self.uppercase = uppercase
        self.lowercase_loss_weight = float(lowercase_loss_weight)
        self.mask_control_chars = mask_control_chars
        self.mask_tags = mask_tags

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(uppercase={self.uppercase}, "
            f"lowercase_loss_weight={self.lowercase_loss_weight}, "
            f"mask_control_chars={self.mask_control_chars}, mask_tags={self.mask_tags})"
        )

    @staticmethod
    def to_bytes(text: str | bytes) -> np.ndarray:
        """Returns the raw UTF-8 bytes of ``text`` as a read-only ``uint8`` array (no options applied)."""
        data = text if isinstance(text, bytes | bytearray) else text.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8)

    @staticmethod
    def num_tokens(text: str | bytes) -> int:
        """Number of tokens ``encode(text)`` returns, computed without tokenizing ASCII text."""
        if isinstance(text, bytes | bytearray):
            return len(text)
        return len(text) if text.isascii() else len(text.encode("utf-8"))

    def encode(self, text: str | bytes) -> np.ndarray:
        """Tokenizes one document without an EOD.

        Args:
            text: The document.

        Returns:
            ``uint8`` array of token ids (one per UTF-8 byte).
        """
        raw = self.to_bytes(text)
        if not self.uppercase:
            return raw.copy()
        ids = raw.copy()
        ids[(raw >= _LOWER_A) & (raw <= _LOWER_Z)] -= _CASE_OFFSET
        return ids

    def encode_with_weights(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes one document and computes the loss weight of every token (no EOD appended).

        Args:
            text: The document.

        Returns:
            ``(ids, weights)``: ``uint8`` token ids and ``float32`` loss weights of the same length.
        """
        raw = self.to_bytes(text)
        ids = raw.copy()
        weights = np.ones(raw.shape[0], dtype=np.float32)
        lower = (raw >= _LOWER_A) & (raw <= _LOWER_Z)
        if self.uppercase:
            ids[lower] -= _CASE_OFFSET
        if self.lowercase_loss_weight != 1.0:
            weights[lower] = self.lowercase_loss_weight
        if self.mask_control_chars:
            weights[raw < 32] = 0.0
        if self.mask_tags:
            weights[tag_mask(raw)] = 0.0
        return ids, weights

    def encode_document(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`encode_with_weights` with the EOD token (weight 1) appended."""
        ids, weights = self.encode_with_weights(text)
        return np.append(ids, np.uint8(EOD_ID)), np.append(weights, np.float32(1.0))

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Turns token ids back into text.

        Ids outside 32..255 (EOD, padding, control bytes and the unused ids 256..511) are dropped;
        byte sequences that are not valid UTF-8 decode to U+FFFD.

        Args:
            ids: Token ids (list, numpy array or 1-D tensor).

        Returns:
            The decoded string.
        """
        arr = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids), dtype=np.int64).reshape(-1)
        kept = arr[(arr >= 32) & (arr <= 255)].astype(np.uint8)
        return kept.tobytes().decode("utf-8", errors="replace")


def tag_mask(raw: np.ndarray) -> np.ndarray:
    """Boolean mask of the bytes inside ``|...|`` tags, delimiters included.

    A byte is inside a tag when an odd number of delimiters precede it (inclusive) or it is a
    delimiter itself, so delimiters pair up left to right and an unterminated tag runs to the end.

    Args:
        raw: ``uint8`` bytes of one document.

    Returns:
        Boolean array of the same length.
    """
    is_delim = raw == TAG_DELIMITER
    if not is_delim.any():
        return is_delim
    return is_delim | (np.cumsum(is_delim, dtype=np.int64) % 2 == 1)


def leading_tag_length(ids: np.ndarray) -> int:
    """Length of the ``|...|`` tag a document starts with (0 when it does not start with one).

    Args:
        ids: ``uint8`` token ids of one document.

    Returns:
        Number of leading bytes, delimiters included; the whole document for an unterminated tag.
    """
    if ids.shape[0] == 0 or ids[0] != TAG_DELIMITER:
        return 0
    closing = np.flatnonzero(ids[1:] == TAG_DELIMITER)
    return int(closing[0]) + 2 if closing.shape[0] else int(ids.shape[0])
