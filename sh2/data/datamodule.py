"""``SH2DataModule``: streaming, packed, rank-split and exactly resumable byte data for Lightning.

Data flow (one data-parallel rank, ``W = max(1, num_workers)`` worker slots)::

    load_source()  ->  documents of slot s = split_dataset_by_node(part=dp_rank * W + s, of dp_size * W)
                   ->  hold out validation (``data.val_split``, see ``Holdout``): whole records chosen by a
                       content hash, or the tail windows of every record (one genome, a few long records)
                   ->  PackedStream: shuffle buffer (seed, epoch, dp_rank, s), RC, tokenize, EOD, pack
                   ->  DataLoader worker i serves slot (i + start) % W; batches arrive round robin

Resumption. The training stream of a rank is a deterministic function of the configuration, so its
state is a single number: the batches this rank has consumed. The count is kept in the main process by
:meth:`SH2DataModule.on_before_batch_transfer`, which Lightning calls for a batch just before its
``training_step`` (so batches prefetched by workers or by Lightning are not counted). ``state_dict``
all-gathers the counts of every rank (``{"per_rank": {dp_rank: {"batches": n}}}``); after
``load_state_dict`` each rank replays its stream, fast-forwarding ``n`` batches (worker slot ``s`` skips
its own share and DataLoader workers are rotated so that worker 0 serves batch ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sh2.data.holdout import (
    Holdout,
    HoldoutStats,
    empty_training_message,
    empty_validation_message,
    resolve_holdout,
    val_settings_problems,
    validation_pieces,
)
from sh2.data.packing import PackedStream, WindowPacker
from sh2.data.sources import DocumentSource, load_source
from sh2.data.tokenizer import VOCAB_SIZE, ByteTokenizer
from sh2.strategies.contract import DataLayout, strategy_contract

Batch = dict[str, torch.Tensor]
_STATE_VERSION = 1


def _to_tensors(batch: dict[str, np.ndarray]) -> Batch:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class TrainBatches(IterableDataset):
    """Infinite training batches of one data-parallel rank (``batch_size=None`` DataLoader dataset).

    Args:
        source: Document source.
        tokenizer: Tokenizer.
        seq_len: Model sequence length L.
        batch_size: Windows per batch.
        seed: Base seed.
        shuffle_buffer: Document shuffle buffer size.
        rc_prob: Reverse-complement probability per document.
        holdout: What validation holds out of each document (skipped or cut off here).
        dp_rank: Data-parallel rank.
        dp_size: Data-parallel size.
        num_slots: Worker slots per rank (``max(1, num_workers)``).
    """

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: ByteTokenizer,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        rc_prob: float,
        holdout: Holdout,
        dp_rank: int,
        dp_size: int,
        num_slots: int,
    ) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rc_prob = rc_prob
        self.holdout = holdout
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_slots = num_slots
        self.start_batch = 0  # set by ResumableLoader before the workers are started

    def slot_documents(self, slot: int) -> Iterator[str]:
        """Training documents of worker slot ``slot`` of this rank, in stream order (one epoch)."""
        part = self.dp_rank * self.num_slots + slot
        for text in self.source.documents(part, self.dp_size * self.num_slots):
            text = self.holdout.training_text(text)
            if text is not None:
                yield text

    def slot_stream(self, slot: int) -> PackedStream:
        """The :class:`PackedStream` of one worker slot."""
        return PackedStream(
            documents=lambda epoch: self.slot_documents(slot),
            tokenizer=self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            seed=self.seed,
            slot_key=(self.dp_rank, slot),
            shuffle_buffer=self.shuffle_buffer,
            rc_prob=self.rc_prob,
            slot_name=f"Data-parallel rank {self.dp_rank} (of {self.dp_size}), worker slot {slot} "
            f"(of {self.num_slots})",
        )

    def slot_skip(self, slot: int, start: int) -> int:
        """Batches of ``slot`` among the first ``start`` batches of the rank (round robin from slot 0)."""
        return max(0, -(-(start - slot) // self.num_slots))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            yield from self.rank_batches(self.start_batch)
            return
        if info.num_workers != self.num_slots:
            raise RuntimeError(f"TrainBatches built for {self.num_slots} workers runs in {info.num_workers}.")
        try:  # datasets/fsspec advice for forked workers that stream over HTTP
            import fsspec.asyn

            fsspec.asyn.reset_lock()
        except (ImportError, AttributeError):
            pass
        slot = (info.id + self.start_batch) % self.num_slots
        for batch in self.slot_stream(slot).batches(self.slot_skip(slot, self.start_batch)):
            yield _to_tensors(batch)

    def rank_batches(self, start: int = 0) -> Iterator[Batch]:
        """The rank's batch stream from batch ``start``, computed in this process.

        This is exactly what a DataLoader with ``num_slots`` workers yields (round robin over the slots),
        so it serves ``num_workers=0`` and is the reference in tests.
        """
        iters = [
            self.slot_stream(s).batches(self.slot_skip(s, start)) for s in range(self.num_slots)
        ]
        k = start
        while True:
            yield _to_tensors(next(iters[k % self.num_slots]))
            k += 1


class ResumableLoader(DataLoader):
    """DataLoader over :class:`TrainBatches` that starts at the datamodule's consumed-batch count.

    Args:
        dataset: The rank's training batches.
        datamodule: The owner, whose counters are read at ``iter()`` and updated per yielded batch.
        **kwargs: Passed to :class:`torch.utils.data.DataLoader` (``batch_size`` is forced to None).
    """

    def __init__(self, dataset: TrainBatches, datamodule: SH2DataModule, **kwargs: Any) -> None:
        kwargs["batch_size"] = None
        kwargs.pop("persistent_workers", None)  # workers must restart at the new position on every iter
        super().__init__(dataset, **kwargs)
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[Batch]:
        start = self.datamodule.consumed_batches
        self.dataset.start_batch = start
        self.datamodule._fetched = start
        for batch in super().__iter__():
            self.datamodule._on_fetched()
            yield batch


class CachedBatches(IterableDataset):
    """A finite list of batches (validation). Iterable, so Lightning never splits it with a sampler:
    every rank evaluates the same batches."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


class SH2DataModule(LightningDataModule):
    """Byte-level genome data for StripedHyena 2 training: stream, hold out, pack, split, resume.

    Batches are dicts ``input_ids`` [B, L] int64, ``labels`` [B, L] int64 (inputs shifted by one) and
    ``loss_weights`` [B, L] float32. Training is an infinite stream (drive it with ``max_steps`` and an
    integer ``val_check_interval``); validation is a finite, fixed list of batches.

    Args:
        path: Hub dataset name, local file / directory / glob, or None for the built-in phage genomes.
        name: Hub dataset configuration.
        data_files: ``data_files`` for ``load_dataset`` (hub datasets, or files with ``format``).
        format: Force the reader: text, json, csv, parquet or fasta (default: from the extension).
        split: Split of a hub dataset.
        text_field: Column holding the documents.
        fasta_headers: Keep FASTA headers as a ``|header|`` prefix (masked when ``mask_tags``).
        seq_len: Model sequence length L (windows of L + 1 tokens).
        batch_size: Sequences per batch and per data-parallel rank.
        num_workers: DataLoader worker processes (0: load in the main process).
        val_fraction: Fraction held out for validation (0 disables validation): of the records, or of every
            record's tokens (``val_split``).
        val_batches: At most this many validation batches (None: every held-out window).
        val_split: How validation is held out of ``path``: auto, records or within_records. ``records``: whole
            records chosen by a hash of their content (about ``val_fraction`` of them). ``within_records``: the
            last ``val_fraction`` of every record's tokens, in whole windows of ``seq_len + 1`` that never overlap
            the record's training part, for one genome or a few long records. ``auto``: ``records`` when the
            source has at least ``2 / val_fraction`` records (two expected in validation), else
            ``within_records`` (with a notice).
        val_path: Separate validation files (or a hub dataset, read with its ``validation`` split), read like
            ``path`` with the same format settings; every document of ``path`` then trains, and
            ``val_fraction`` and ``val_split`` are not used.
        shuffle_buffer: Documents in the seeded shuffle buffer (0 or 1: stream order).
        seed: Seed of shuffling and augmentation; epoch e of worker slot s on rank r draws from
            ``SeedSequence([seed, e, r, s])``, so every epoch is reshuffled.
        reverse_complement_prob: Probability of reverse-complementing a training document.
        uppercase: Upper-case ASCII letters in the inputs.
        lowercase_loss_weight: Loss weight of originally lowercase positions (Evo 2: 0.1).
        mask_control_chars: Zero loss on document bytes below 32.
        mask_tags: Zero loss on ``|...|`` spans.
    """

    def __init__(
        self,
        path: str | None = None,
        name: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        format: str | None = None,
        split: str = "train",
        text_field: str = "text",
        fasta_headers: bool = False,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        val_batches: int | None = 64,
        val_split: str = "auto",
        val_path: str | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 42,
        reverse_complement_prob: float = 0.0,
        uppercase: bool = True,
        lowercase_loss_weight: float = 0.1,
        mask_control_chars: bool = True,
        mask_tags: bool = True,
    ) -> None:
        super().__init__()
        _check_args(seq_len, batch_size, num_workers, val_fraction, val_batches, shuffle_buffer,
                    reverse_complement_prob, val_split, val_path)
        self.save_hyperparameters()
        self.source_args = dict(path=path, name=name, data_files=data_files, format=format, split=split,
                                text_field=text_field, fasta_headers=fasta_headers)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.val_batches = val_batches
        self.val_split = val_split
        self.val_path = val_path
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.reverse_complement_prob = reverse_complement_prob
        self.tokenizer = ByteTokenizer(uppercase, lowercase_loss_weight, mask_control_chars, mask_tags)
        self.vocab_size = VOCAB_SIZE
        self.consumed_batches = 0
        self._fetched = 0
        self._source: DocumentSource | None = None
        self._val_source: DocumentSource | None = None
        self._holdout: Holdout | None = None
        self._val: list[Batch] | None = None
        self._dp_override: tuple[int, int] | None = None
        self._pending_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------- sources and ranks
    @property
    def source(self) -> DocumentSource:
        """The document source (opened on first use; raises the file/format errors of sources.py)."""
        if self._source is None:
            self._source = load_source(**self.source_args)
        return self._source

    @property
    def has_validation(self) -> bool:
        """Whether there is a validation set (``val_path``, or a positive ``val_fraction``)."""
        return self.val_path is not None or self.val_fraction > 0

    @property
    def val_source(self) -> DocumentSource:
        """The documents of ``val_path`` (opened on first use)."""
        if self._val_source is None:
            args = {**self.source_args, "path": self.val_path, "data_files": None, "split": "validation"}
            self._val_source = load_source(**args, setting="data.val_path")
        return self._val_source

    @property
    def holdout(self) -> Holdout:
        """What validation holds out of ``path``: ``val_split`` with ``auto`` resolved (counting records)."""
        if self._holdout is None:
            self._holdout = resolve_holdout(self.source, self.val_split, self.val_fraction, self.seq_len,
                                            self.val_path)
        return self._holdout

    def set_data_parallel(self, rank: int, size: int) -> None:
        """Overrides the data-parallel rank and size (tests, or custom launchers without a trainer)."""
        if not 0 <= rank < size:
            raise ValueError(f"data-parallel rank {rank} is not in [0, {size}).")
        self._dp_override = (rank, size)

    def data_parallel(self) -> tuple[int, int]:
        """``(dp_rank, dp_size)``: the :meth:`set_data_parallel` override, else the trainer's strategy's
        (:class:`~sh2.strategies.contract.StrategyContract`; context-parallel peers share them), else
        ``(0, 1)`` without a trainer."""
        if self._dp_override is not None:
            return self._dp_override
        if self.trainer is None:
            return 0, 1
        strategy = strategy_contract(self.trainer.strategy)
        return strategy.data_parallel_rank, strategy.data_parallel_size

    @property
    def layout(self) -> DataLayout:
        """The data layout the strategy is told: sequence length, micro-batch and the per-rank state key."""
        # Lightning saves a datamodule's state_dict under its class name; it holds this rank's stream position
        return DataLayout(seq_len=self.seq_len, micro_batch_size=self.batch_size,
                          per_rank_state_keys=(type(self).__qualname__,))

    @property
    def num_slots(self) -> int:
        """Worker slots per rank: ``max(1, num_workers)``."""
        return max(1, self.num_workers)

    # ----------------------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Tells the trainer's strategy the data layout (before the model is built), opens the source and
        fails early on empty data, a missing text field or an empty split."""
        if self.trainer is not None:
            strategy_contract(self.trainer.strategy).set_data_layout(self.layout)
        self.source.check()
        if stage in (None, "fit", "validate", "test") and self.has_validation:
            self.val_batches_list()

    def train_batches(self) -> TrainBatches:
        """This rank's :class:`TrainBatches` (checks that every worker slot has training documents)."""
        rank, size = self.data_parallel()
        holdout = self.holdout
        ds = TrainBatches(self.source, self.tokenizer, self.seq_len, self.batch_size, self.seed,
                          self.shuffle_buffer, self.reverse_complement_prob, holdout,
                          rank, size, self.num_slots)
        for slot in range(self.num_slots):
            if next(ds.slot_documents(slot), None) is None:
                where = (f"The training stream of data-parallel rank {rank} (of {size}), worker slot {slot} "
                         f"(of {self.num_slots}) is empty: {self.source.description}")
                raise ValueError(empty_training_message(holdout, where, self.val_fraction, size, self.num_slots))
        self._warn_if_data_is_shorter_than_a_window(ds)
        return ds

    def _warn_if_data_is_shorter_than_a_window(self, ds: TrainBatches) -> None:
        """Warn when a worker slot's training documents hold fewer tokens than one window of ``seq_len + 1``: its
        windows then wrap around the data and repeat it (``data.seq_len`` longer than the dataset). Reads only
        until one window's worth of tokens is found, so large datasets cost a document or two."""
        need = self.seq_len + 1
        for slot in range(self.num_slots):
            tokens = documents = 0
            for text in ds.slot_documents(slot):
                tokens, documents = tokens + self.tokenizer.num_tokens(text) + 1, documents + 1
                if tokens >= need:
                    break
            else:
                where = f" (worker slot {slot} of {self.num_slots})" if self.num_slots > 1 else ""
                rank_zero_warn(
                    f"data.seq_len={self.seq_len} is longer than the training data of {self.source.description}"
                    f"{where}: {documents} documents, {tokens} tokens with their end-of-document tokens. Every "
                    f"window of {need} tokens wraps around and repeats them; lower data.seq_len below {tokens}, or "
                    "add data."
                )
                return

    def train_dataloader(self) -> ResumableLoader:
        """Infinite training loader; resumes at :attr:`consumed_batches` (see the module docstring)."""
        self._apply_pending_state()
        return ResumableLoader(self.train_batches(), self, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader | list:
        """Finite validation loader (the same batches on every run and rank); [] when disabled."""
        if not self.has_validation:
            return []
        return DataLoader(CachedBatches(self.val_batches_list()), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader | list:
        """The validation batches again (there is no separate test split)."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts a training batch as consumed: Lightning calls this right before its training step."""
        trainer = self.trainer
        if trainer is not None and trainer.training and not trainer.sanity_checking:
            self.consumed_batches = min(self.consumed_batches + 1, self._fetched)
        return batch

    def _on_fetched(self) -> None:
        self._fetched += 1
        if self.trainer is None:  # used outside Lightning: every yielded batch is consumed
            self.consumed_batches = self._fetched

    # ----------------------------------------------------------------------------- validation data
    def val_batches_list(self) -> list[Batch]:
        """The validation batches (built once), in stream order, packed into windows of ``seq_len + 1`` and
        grouped by ``batch_size``: the held-out records (a last partial window is dropped), the tail windows of
        every record (``within_records``), or the documents of ``val_path``.

        Raises:
            ValueError: Nothing was held out that fills one window; the message says what would help.
        """
        if self._val is not None:
            return self._val
        limit = math.inf if self.val_batches is None else self.val_batches
        packer = WindowPacker(self.seq_len, None)
        windows: list[dict[str, np.ndarray]] = []
        batches: list[Batch] = []
        stats = HoldoutStats()
        source = self.val_source if self.val_path is not None else self.source
        for ids, weights in validation_pieces(source, self.holdout, self.tokenizer, stats):
            windows.extend(packer.add(ids, weights))
            while len(windows) >= self.batch_size and len(batches) < limit:
                batches.append(_stack(windows[: self.batch_size]))
                del windows[: self.batch_size]
            if len(batches) >= limit:
                break
        if windows and len(batches) < limit:
            batches.append(_stack(windows))
        if not batches and self.val_split == "auto" and self.holdout.mode == "records" and not stats.held_out:
            # enough records for whole-record validation, but the content hash chose none of them: fall back as
            # auto does for few records (setup builds validation before the training stream, so both agree)
            rank_zero_info(
                f"[sh2] data.val_split=auto: none of the {stats.records} records of {self.source.description} fell "
                f"into validation at data.val_fraction={self.val_fraction}; validation is the last "
                f"{self.val_fraction:g} of every record instead (data.val_split: within_records)")
            self._holdout = Holdout("within_records", self.val_fraction, self.seq_len + 1)
            return self.val_batches_list()
        if not batches:
            raise ValueError(empty_validation_message(
                self.holdout, stats, self.source.description, seq_len=self.seq_len, val_fraction=self.val_fraction,
                val_split=self.val_split, val_path=self.val_path))
        self._val = batches
        return batches

    def unigram_entropy(self) -> float:
        """Entropy (nats per token) of the validation labels' unigram distribution, counting each label
        with its loss weight (weight-0 positions excluded): the loss of the best context-free model,
        directly comparable with the weighted validation cross-entropy."""
        counts = np.zeros(VOCAB_SIZE, dtype=np.float64)
        for batch in self.val_batches_list():
            labels, weights = batch["labels"].numpy().ravel(), batch["loss_weights"].numpy().ravel()
            keep = weights > 0
            counts += np.bincount(labels[keep], weights=weights[keep], minlength=VOCAB_SIZE)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    # ----------------------------------------------------------------------------- resumption
    def _fingerprint(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {
            "source": self.source.description, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "num_workers_slots": self.num_slots, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
            "reverse_complement_prob": self.reverse_complement_prob, "val_fraction": self.val_fraction,
            "tokenizer": repr(tok),
            # what trains besides whole records; absent in the default case, so earlier checkpoints still resume
            **({"val_split": self.holdout.mode} if self.holdout.mode == "within_records" else {}),
            **({"val_path": self.val_path} if self.val_path is not None else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """Per-rank stream positions, all-gathered over ranks when torch.distributed is initialized
        (every rank must call it; Lightning's checkpoint dump does)."""
        rank, size = self.data_parallel()
        local = {"batches": int(self.consumed_batches)}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (rank, local))
            per_rank = {int(r): s for r, s in gathered}
        else:
            per_rank = {rank: local}
        return {"version": _STATE_VERSION, "dp_size": size, "fingerprint": self._fingerprint(),
                "per_rank": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Stores a checkpointed position; it is applied to this rank when training data is requested.

        A different source path only warns (data may live elsewhere on another machine); any other change
        of the data settings makes an exact resume impossible and raises.

        Raises:
            ValueError: The data settings differ from the checkpoint's.
        """
        if not state_dict:
            return
        saved, now = state_dict.get("fingerprint", {}), self._fingerprint()
        if saved.get("source") != now["source"]:  # data may move between machines: warn, do not block
            rank_zero_warn(
                f"Resuming the data stream of {saved.get('source')!r} from {now['source']!r}; the position "
                "is exact only if the documents are the same, in the same order."
            )
        keys = [*now, *(k for k in saved if k not in now)]
        diff = {k: (saved.get(k), now.get(k)) for k in keys if k != "source" and saved.get(k) != now.get(k)}
        if diff:
            details = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"Cannot resume the data stream exactly, the data settings changed ({details}). Resume with "
                "the checkpoint's data settings, or start a new stream (load weights with init_from instead "
                "of ckpt_path)."
            )
        self._pending_state = state_dict
        self._apply_pending_state(strict=False)

    def _apply_pending_state(self, strict: bool = True) -> None:
        state = self._pending_state
        if state is None:
            return
        rank, size = self.data_parallel()
        if state["dp_size"] != size:
            if not strict:
                return  # the trainer may not know the ranks yet; retried in train_dataloader
            raise ValueError(
                f"The checkpoint's data stream was saved with {state['dp_size']} data-parallel ranks, this run "
                f"has {size}. Resume on the same number of data-parallel ranks, or use init_from."
            )
        per_rank = state["per_rank"]
        entry = per_rank.get(rank, per_rank.get(str(rank)))
        if entry is None:
            raise ValueError(f"The checkpoint has no data position for data-parallel rank {rank}.")
        self.consumed_batches = self._fetched = int(entry["batches"])
        self._pending_state = None


def _stack(windows: list[dict[str, np.ndarray]]) -> Batch:
    return {k: torch.from_numpy(np.stack([w[k] for w in windows])) for k in windows[0]}


def _check_args(
    seq_len: int, batch_size: int, num_workers: int, val_fraction: float, val_batches: int | None,
    shuffle_buffer: int, rc_prob: float, val_split: str, val_path: str | None,
) -> None:
    problems = val_settings_problems(val_split, val_path)
    if seq_len < 2:
        problems.append(f"data.seq_len must be >= 2 (got {seq_len})")
    if batch_size < 1:
        problems.append(f"data.batch_size must be >= 1 (got {batch_size})")
    if num_workers < 0:
        problems.append(f"data.num_workers must be >= 0 (got {num_workers})")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"data.val_fraction must be in [0, 1) (got {val_fraction})")
    if val_batches is not None and val_batches < 1:
        problems.append(f"data.val_batches must be >= 1 or null (got {val_batches})")
    if shuffle_buffer < 0:
        problems.append(f"data.shuffle_buffer must be >= 0 (got {shuffle_buffer})")
    if not 0.0 <= rc_prob <= 1.0:
        problems.append(f"data.reverse_complement_prob must be in [0, 1] (got {rc_prob})")
    if problems:
        raise ValueError("Invalid data settings: " + "; ".join(problems) + ".")
