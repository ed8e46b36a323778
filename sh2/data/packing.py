"""EOD packing into fixed windows, reverse-complement augmentation and a seeded shuffle buffer
(docs/design.md, "Packing").

The token stream of one data slot (a data-parallel rank and DataLoader worker pair) is

    doc_0 EOD doc_1 EOD doc_2 EOD ...

cut into consecutive, non-overlapping windows of ``seq_len + 1`` tokens: inputs are the first
``seq_len`` tokens of a window, labels the last ``seq_len``, and loss weights are those of the labels.
No token is padded, dropped or repeated: concatenating the windows gives the stream back. A batch is
``batch_size`` consecutive windows, i.e. ``batch_size * (seq_len + 1)`` consecutive tokens.

Determinism: the stream of a slot is a pure function of (source, seed, slot, epoch), so the position
"``k`` batches consumed" is enough to resume: :class:`PackedStream` fast-forwards ``k`` batches by
summing document lengths, without tokenizing the documents it skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from sh2.data.tokenizer import ByteTokenizer, leading_tag_length

T = TypeVar("T")

_COMPLEMENT = np.arange(256, dtype=np.uint8)
for _a, _b in ("AT", "CG", "at", "cg"):
    _COMPLEMENT[ord(_a)], _COMPLEMENT[ord(_b)] = ord(_b), ord(_a)


def reverse_complement(
    ids: np.ndarray, weights: np.ndarray, keep_leading_tag: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Reverse complement of a DNA document (A<->T, C<->G in both cases; every other byte kept).

    The weights travel with their bases (they are reversed too). A leading ``|...|`` tag stays in front,
    unreversed, so a header or taxonomy tag still precedes the sequence it describes.

    Args:
        ids: ``uint8`` token ids of one document, without EOD.
        weights: Loss weights of the same length.
        keep_leading_tag: Leave a leading ``|...|`` tag in place.

    Returns:
        ``(ids, weights)`` of the reverse-complemented document.
    """
    start = leading_tag_length(ids) if keep_leading_tag else 0
    out_ids = ids.copy()
    out_w = weights.copy()
    out_ids[start:] = _COMPLEMENT[ids[start:][::-1]]
    out_w[start:] = weights[start:][::-1]
    return out_ids, out_w


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Seeded buffer shuffle: keeps ``size`` items, emits a random one for every new item.

    The output is a permutation of the input that depends only on the input order and the RNG state.

    Args:
        items: Input stream.
        size: Buffer size; ``<= 1`` passes items through in order.
        rng: Random generator (consumed deterministically).

    Yields:
        The items in shuffled order.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        buffer[i], item = item, buffer[i]
        yield item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class WindowPacker:
    """Accumulates documents and emits full batches of packed windows.

    Args:
        seq_len: Model sequence length L (windows hold L + 1 tokens).
        batch_size: Windows per batch; None emits single windows ``[L + 1]``.
    """

    def __init__(self, seq_len: int, batch_size: int | None = None) -> None:
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.chunk = (seq_len + 1) * (batch_size or 1)
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self._pending = 0

    @property
    def pending(self) -> int:
        """Tokens waiting for the next full batch."""
        return self._pending

    def add(self, ids: np.ndarray, weights: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Appends one document (EOD already included) and yields every batch it completes."""
        self._ids.append(ids)
        self._weights.append(weights)
        self._pending += ids.shape[0]
        if self._pending < self.chunk:
            return
        all_ids = np.concatenate(self._ids)
        all_w = np.concatenate(self._weights)
        n_full = self._pending // self.chunk
        for b in range(n_full):
            lo, hi = b * self.chunk, (b + 1) * self.chunk
            yield self._make_batch(all_ids[lo:hi], all_w[lo:hi])
        rest = n_full * self.chunk
        self._ids, self._weights = [all_ids[rest:]], [all_w[rest:]]
        self._pending = self._pending - rest

    def _make_batch(self, ids: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        shape = (-1, self.seq_len + 1) if self.batch_size else (self.seq_len + 1,)
        win = ids.reshape(shape)
        wts = weights.reshape(shape)
        return {
            "input_ids": win[..., :-1].astype(np.int64),
            "labels": win[..., 1:].astype(np.int64),
            "loss_weights": np.ascontiguousarray(wts[..., 1:], dtype=np.float32),
        }


def pack_windows(
    documents: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int
) -> Iterator[dict[str, np.ndarray]]:
    """Packs ``(ids, weights)`` documents (EOD included) into single windows; the tail that does not
    fill a window is dropped (no padding).

    Args:
        documents: Tokenized documents with their EOD.
        seq_len: Model sequence length L.

    Yields:
        ``{"input_ids": [L], "labels": [L], "loss_weights": [L]}``.
    """
    packer = WindowPacker(seq_len, None)
    for ids, weights in documents:
        yield from packer.add(ids, weights)


class PackedStream:
    """The infinite, deterministic batch stream of one data slot.

    Epoch ``e`` reads the slot's documents from ``documents(e)``, shuffles them with a buffer seeded by
    ``(seed, e, slot_key)``, reverse-complements each with probability ``rc_prob`` (a second generator
    with the same key), tokenizes, appends EOD and packs. Epochs follow each other without a break in
    the token stream, and the stream never ends: training length is set by ``max_steps``.

    Args:
        documents: ``documents(epoch)`` returns an iterator over the slot's training documents.
        tokenizer: Tokenizer (ids and loss weights).
        seq_len: Model sequence length L.
        batch_size: Windows per batch.
        seed: Base seed.
        slot_key: Integers identifying the slot (e.g. ``(dp_rank, worker_slot)``).
        shuffle_buffer: Document shuffle buffer size (``<= 1``: file order).
        rc_prob: Reverse-complement probability per document.
        slot_name: Describes the slot in errors.
    """

    def __init__(
        self,
        documents: Callable[[int], Iterator[str]],
        tokenizer: ByteTokenizer,
        seq_len: int,
        batch_size: int,
        seed: int,
        slot_key: tuple[int, ...],
        shuffle_buffer: int = 0,
        rc_prob: float = 0.0,
        slot_name: str = "slot",
    ) -> None:
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.slot_key = tuple(slot_key)
        self.shuffle_buffer = shuffle_buffer
        self.rc_prob = rc_prob
        self.slot_name = slot_name

    @property
    def tokens_per_batch(self) -> int:
        """Stream tokens consumed by one batch: ``batch_size * (seq_len + 1)``."""
        return self.batch_size * (self.seq_len + 1)

    def epoch_documents(self, epoch: int) -> Iterator[tuple[str, bool]]:
        """Yields ``(document, reverse_complement?)`` of one epoch, in the order they are packed."""
        shuffle_seq, rc_seq = np.random.SeedSequence([self.seed, epoch, *self.slot_key]).spawn(2)
        shuffle_rng, rc_rng = np.random.default_rng(shuffle_seq), np.random.default_rng(rc_seq)
        for text in shuffle_buffer(self.documents(epoch), self.shuffle_buffer, shuffle_rng):
            flip = self.rc_prob > 0.0 and bool(rc_rng.random() < self.rc_prob)
            yield text, flip

    def encode(self, text: str, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and weights of one document as packed: RC applied if ``flip``, EOD appended."""
        ids, weights = self.tokenizer.encode_with_weights(text)
        if flip:
            ids, weights = reverse_complement(ids, weights)
        return np.append(ids, np.uint8(0)), np.append(weights, np.float32(1.0))

    def batches(self, skip_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields batches ``{"input_ids", "labels": int64 [B, L], "loss_weights": float32 [B, L]}``.

        Args:
            skip_batches: Batches to fast-forward over first (resumption); documents wholly inside the
                skipped range are counted, not tokenized.

        Raises:
            RuntimeError: An epoch of this slot contains no document (more slots than documents).
        """
        skip = skip_batches * self.tokens_per_batch
        packer = WindowPacker(self.seq_len, self.batch_size)
        epoch = 0
        while True:
            seen = 0
            for text, flip in self.epoch_documents(epoch):
                seen += 1
                if skip:
                    n = self.tokenizer.num_tokens(text) + 1
                    if n <= skip:
                        skip -= n
                        continue
                ids, weights = self.encode(text, flip)
                if skip:
                    ids, weights, skip = ids[skip:], weights[skip:], 0
                yield from packer.add(ids, weights)
            if seen == 0:
                raise RuntimeError(
                    f"{self.slot_name} received no training document in epoch {epoch}: the training "
                    "stream has fewer documents (or shards) than data-parallel ranks x DataLoader workers. "
                    "Lower data.num_workers or data.val_fraction, or use more documents."
                )
            epoch += 1
