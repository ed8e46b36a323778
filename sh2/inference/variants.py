"""Variant-effect scoring: the log-likelihood change of a mutation in its genomic window.

For each variant (a VCF record or a TSV row ``chrom, pos, ref, alt``) two windows of ``window_size`` bases
are cut from the reference: the reference window, and the same window with the REF allele replaced by the
ALT allele. Both are scored by the model (:func:`sh2.inference.scoring.score_sequences`: the sum of
``log p(token | prefix)`` over tokens 2..n, optionally averaged with the reverse complement), and the row
reports ``delta = alt - ref``.

Windows (see docs/genomics.md, "Windows"). With ``r = len(REF)``, ``a = len(ALT)`` and width ``W``:

- the reference window is ``W`` bases of the chromosome holding REF, placed so that the longer allele sits
  in the middle (left flank ``(W - max(r, a)) // 2``), shifted inward near a chromosome end;
- the alternative window is the reference window with REF replaced by ALT, brought back to ``W`` bases at
  its right end: an insertion drops its last ``a - r`` bases, a deletion reads the next ``r - a`` reference
  bases. Both windows then share their left flank, so the model sees the same context up to the variant.
  The reference window is shifted further left when a deletion's extra bases would pass the chromosome end;
- only where that cannot be done (an allele within ``|a - r|`` bases of the chromosome's end) the
  alternative window is adjusted at its left end instead; only a chromosome shorter than ``W + r - a``
  gives windows of different lengths (the ``ref_len``/``alt_len`` columns show it).

Bad input stops with an error that names the file, line and variant (``FILE line N (CHROM:POS REF>ALT)``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from sh2.data.fasta_index import IndexedFasta, open_text
from sh2.inference.scoring import score_sequences

__all__ = ["Variant", "VariantError", "VariantBatches", "VariantWindows", "check_variant", "read_variants",
           "score_variant_batch", "variant_windows", "VARIANT_COLUMNS"]

_ALLELE = re.compile(r"^[ACGTNRYKMSWBDHVacgtnrykmswbdhv]+$")
_TSV_NAMES = {"chrom": ("chrom", "chr", "chromosome", "#chrom", "seqname", "contig"),
              "pos": ("pos", "position"),  # not "start": BED-style starts are 0-based
              "ref": ("ref", "reference"), "alt": ("alt", "alternate"),
              "id": ("id", "name", "variant", "variant_id")}
VARIANT_COLUMNS = ("chrom", "pos", "id", "ref", "alt", "window_start", "ref_len", "alt_len", "ref_logprob_sum",
                   "alt_logprob_sum", "delta", "delta_mean")


class VariantError(ValueError):
    """A variant that cannot be scored; the message names the file, line and variant and the fix."""


@dataclass(frozen=True)
class Variant:
    """One alternative allele at one position.

    Attributes:
        chrom: reference record name.
        pos: 1-based position of the first REF base (VCF convention).
        ref: REF allele as written in the file.
        alt: one ALT allele.
        id: the VCF ID column (``.`` when absent).
        source: ``FILE line N``, for error messages.
    """

    chrom: str
    pos: int
    ref: str
    alt: str
    id: str = "."
    source: str = ""

    def describe(self) -> str:
        """``FILE line N (CHROM:POS REF>ALT)``: how errors name the variant."""
        return f"{self.source} ({self.chrom}:{self.pos} {self.ref}>{self.alt})"


def _is_vcf(path: Path) -> bool:
    name = path.name.lower()
    for ext in (".gz", ".bgz", ".bz2", ".xz"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    if name.endswith(".vcf"):
        return True
    if name.endswith((".tsv", ".txt", ".tab")):
        return False
    with open_text(path) as fh:
        return fh.readline().startswith("##fileformat=VCF")


def _alleles(where: str, chrom: str, pos_text: str, ref: str, alts: list[str]) -> int:
    """The 1-based position; raises for malformed fields."""
    try:
        pos = int(pos_text)
    except ValueError:
        raise VariantError(f"{where}: POS {pos_text!r} is not an integer (malformed line)") from None
    if not chrom:
        raise VariantError(f"{where}: empty CHROM (malformed line)")
    if not _ALLELE.match(ref):
        raise VariantError(f"{where} ({chrom}:{pos}): REF {ref!r} is not a sequence of bases (malformed line)")
    for alt in alts:
        if not _ALLELE.match(alt):
            raise VariantError(
                f"{where} ({chrom}:{pos} {ref}>{alt}): ALT {alt!r} is not a sequence of bases; only SNVs and "
                f"short indels written as bases can be scored (symbolic alleles such as <DEL>, '*', '.' and "
                f"breakends cannot). Keep the scorable records first, e.g. `bcftools view -v snps,indels "
                f"in.vcf.gz > scorable.vcf`")
    return pos


def _read_vcf(path: Path) -> Iterator[Variant]:
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("#") or not line.strip():
                continue
            where = f"{path} line {lineno}"
            fields = line.rstrip("\r\n").split("\t", 5)
            if len(fields) < 5:
                raise VariantError(f"{where}: {len(fields)} tab-separated field(s), a VCF record needs at least "
                                   f"CHROM POS ID REF ALT (malformed line: {line.strip()[:80]!r})")
            chrom, pos_text, vid, ref, alt = fields[:5]
            alts = alt.split(",")
            pos = _alleles(where, chrom, pos_text, ref, alts)
            for a in alts:
                yield Variant(chrom, pos, ref, a, vid or ".", where)


def _tsv_header(fields: list[str]) -> dict[str, int] | None:
    """Column indices when ``fields`` name at least chrom, pos, ref and alt (a leading ``#`` allowed)."""
    lowered = [f.strip().lower().lstrip("#") for f in fields]
    cols = {key: next((i for i, f in enumerate(lowered) if f in names), -1) for key, names in _TSV_NAMES.items()}
    return cols if all(cols[k] >= 0 for k in ("chrom", "pos", "ref", "alt")) else None


def _read_tsv(path: Path) -> Iterator[Variant]:
    cols: dict[str, int] | None = None  # decided by the first line that is a header or data
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if cols is None:
                cols = _tsv_header(fields)
                if cols is not None:
                    continue
                if line.startswith("#"):
                    continue  # a comment before the data
                cols = {"chrom": 0, "pos": 1, "ref": 2, "alt": 3, "id": -1}
            elif line.startswith("#"):
                continue
            where = f"{path} line {lineno}"
            need = max(cols["chrom"], cols["pos"], cols["ref"], cols["alt"]) + 1
            if len(fields) < need:
                raise VariantError(f"{where}: {len(fields)} tab-separated field(s), expected chrom, pos, ref, alt "
                                   f"(malformed line: {line.strip()[:80]!r})")
            chrom, pos_text = fields[cols["chrom"]].strip(), fields[cols["pos"]].strip()
            ref, alt = fields[cols["ref"]].strip(), fields[cols["alt"]].strip()
            pos = _alleles(where, chrom, pos_text, ref, alt.split(","))
            vid = fields[cols["id"]].strip() if 0 <= cols["id"] < len(fields) else "."
            for a in alt.split(","):
                yield Variant(chrom, pos, ref, a, vid or ".", where)


def read_variants(path: str | os.PathLike) -> Iterator[Variant]:
    """Variants of a VCF (plain, gzip or bgzip) or of a TSV ``chrom, pos, ref, alt`` (optional header naming
    the columns, optional ``id`` column; ``#`` lines skipped), one per ALT allele, in file order.

    Raises:
        FileNotFoundError: no such file.
        VariantError: a malformed line (too few fields, a non-integer POS, alleles that are not bases).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"variant file {path} does not exist (prediction.path)")
    yield from (_read_vcf(path) if _is_vcf(path) else _read_tsv(path))


def check_variant(variant: Variant, fasta: IndexedFasta, window_size: int) -> None:
    """Raise :class:`VariantError` unless the variant can be scored against ``fasta``.

    Checks: the chromosome exists (the message suggests a ``chr``-prefixed or unprefixed name that does),
    REF lies inside it, REF matches the reference (case-insensitive), and neither allele is longer than
    half the window.
    """
    where = variant.describe()
    if variant.chrom not in fasta:
        chrom = variant.chrom
        aliases = [chrom[3:] if chrom.lower().startswith("chr") else "chr" + chrom,
                   {"chrM": "MT", "MT": "chrM", "M": "chrM", "chrMT": "chrM"}.get(chrom, "")]
        alias = next((a for a in aliases if a in fasta), None)
        hint = (f"; the reference has {alias!r}: rename the chromosomes of one file (e.g. `bcftools annotate "
                f"--rename-chrs`)" if alias else "")
        names = fasta.names
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} records)" if len(names) > 8 else "")
        raise VariantError(f"{where}: chromosome {chrom!r} is not in the reference {fasta.path} "
                           f"(records: {shown}){hint}")
    n = fasta.length(variant.chrom)
    end = variant.pos + len(variant.ref) - 1
    if variant.pos < 1 or end > n:
        raise VariantError(f"{where}: position {variant.chrom}:{variant.pos}-{end} is outside the reference "
                           f"record {variant.chrom!r} (length {n}) of {fasta.path}; is the file for another "
                           f"assembly, or 0-based?")
    have = fasta.fetch(variant.chrom, variant.pos - 1, end)
    if have.upper() != variant.ref.upper():
        raise VariantError(f"{where}: REF {variant.ref!r} does not match the reference, which has {have!r} at "
                           f"{variant.chrom}:{variant.pos}-{end} in {fasta.path}; is the file for another assembly "
                           f"(or 0-based)? `bcftools norm --check-ref e -f REF.fa` lists every mismatch")
    longest = max(len(variant.ref), len(variant.alt))
    if longest > window_size // 2:
        raise VariantError(f"{where}: an allele of {longest} bases is longer than half the window "
                           f"(prediction.window_size={window_size}); raise window_size to at least {2 * longest} "
                           f"(only SNVs and short indels are scored in a window)")


@dataclass(frozen=True)
class VariantWindows:
    """The two sequences scored for a variant; ``start`` is the 0-based reference position of both windows'
    first base."""

    start: int
    ref: str
    alt: str


def variant_windows(fasta: IndexedFasta, variant: Variant, window_size: int) -> VariantWindows:
    """Reference and alternative windows of ``window_size`` bases around ``variant`` (see the module docstring
    for the indel and chromosome-end conventions). The variant must have passed :func:`check_variant`."""
    W, p = window_size, variant.pos - 1
    r, a = len(variant.ref), len(variant.alt)
    n = fasta.length(variant.chrom)
    # reference window [s, s + W): inside the chromosome and holding REF (always possible) ...
    lo, hi = max(0, p + r - W), min(p, max(0, n - W))
    # ... preferably also holding ALT after the swap, and with room after it for a deletion's extra bases
    lo_pref, hi_pref = max(lo, p + a - W), min(hi, n - W - max(0, r - a))
    if lo_pref <= hi_pref:
        lo, hi = lo_pref, hi_pref
    start = min(max(p - (W - max(r, a)) // 2, lo), hi)
    end = min(n, start + W)
    ref = fasta.fetch(variant.chrom, start, end)
    offset = p - start
    alt = ref[:offset] + variant.alt + ref[offset + r:]
    excess = len(alt) - len(ref)
    if excess > 0:  # insertion: drop bases after the allele, then (at a chromosome end) before it
        right = min(excess, len(ref) - offset - r)
        alt = alt[excess - right: len(alt) - right]
    elif excess < 0:  # deletion: read more reference after the window, then (at a chromosome end) before it
        right = min(-excess, n - end)
        left = min(-excess - right, start)
        alt = fasta.fetch(variant.chrom, start - left, start) + alt + fasta.fetch(variant.chrom, end, end + right)
    return VariantWindows(start, ref, alt)


class VariantBatches(IterableDataset):
    """Batches of variants with their windows, streamed from the variant file (constant memory).

    Every record is checked once when the dataset is built (so bad input stops before the model runs, and
    the batch count for the progress bar is known); the windows are cut while iterating. With several
    processes, batch ``b`` goes to rank ``b % world_size``; with DataLoader workers, a rank's ``k``-th batch
    to worker ``k % num_workers``, so the DataLoader's round-robin keeps the file order.

    Use with ``DataLoader(dataset, batch_size=None)``: the items are already batches
    ``{"variants": [dict, ...], "options": options}``.
    """

    def __init__(self, path: str | os.PathLike, reference: str | os.PathLike | IndexedFasta, window_size: int,
                 batch_size: int, options: dict[str, Any] | None = None, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        self.fasta = reference if isinstance(reference, IndexedFasta) else IndexedFasta(reference)
        self.window_size, self.batch_size = int(window_size), int(batch_size)
        self.options = dict(options or {})
        self.rank, self.world_size = rank, world_size
        count = 0
        for variant in read_variants(self.path):
            check_variant(variant, self.fasta, self.window_size)
            count += 1
        if count == 0:
            raise VariantError(f"{self.path} holds no variant records (prediction.path)")
        self.num_variants = count

    def __len__(self) -> int:
        batches = math.ceil(self.num_variants / self.batch_size)
        return len(range(self.rank, batches, self.world_size))

    def _item(self, variant: Variant) -> dict[str, Any]:
        check_variant(variant, self.fasta, self.window_size)  # the file may have changed since the first pass
        win = variant_windows(self.fasta, variant, self.window_size)
        return {"chrom": variant.chrom, "pos": variant.pos, "id": variant.id, "ref": variant.ref,
                "alt": variant.alt, "window_start": win.start + 1, "ref_window": win.ref, "alt_window": win.alt}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items: list[dict[str, Any]] = []
        current = -1
        for k, variant in enumerate(read_variants(self.path)):
            b = k // self.batch_size
            if b % self.world_size != self.rank or (b // self.world_size) % workers != worker:
                continue
            if b != current and items:
                yield {"variants": items, "options": self.options}
                items = []
            current = b
            items.append(self._item(variant))
        if items:
            yield {"variants": items, "options": self.options}


@torch.no_grad()
def score_variant_batch(model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one :class:`VariantBatches` batch: the columns of :data:`VARIANT_COLUMNS` (plus
    ``delta_forward``/``delta_rc`` with reverse-complement averaging).

    Each distinct window is scored once (variants at one position share their reference window).
    """
    opts = batch.get("options") or {}
    variants = batch["variants"]
    windows = list(dict.fromkeys(s for v in variants for s in (v["ref_window"], v["alt_window"])))
    rc = bool(opts.get("reverse_complement", False))
    scores = dict(zip(windows, score_sequences(model, windows, batch_size=len(windows), reverse_complement=rc,
                                                 uppercase=opts.get("uppercase", True))))
    rows = []
    for v in variants:
        ref, alt = scores[v["ref_window"]], scores[v["alt_window"]]
        row = {k: v[k] for k in ("chrom", "pos", "id", "ref", "alt", "window_start")}
        row.update(ref_len=ref.length, alt_len=alt.length, ref_logprob_sum=ref.logprob_sum,
                   alt_logprob_sum=alt.logprob_sum, delta=alt.logprob_sum - ref.logprob_sum,
                   delta_mean=alt.logprob_mean - ref.logprob_mean)
        if rc:
            row["delta_forward"] = alt.logprob_sum_forward - ref.logprob_sum_forward
            row["delta_rc"] = alt.logprob_sum_rc - ref.logprob_sum_rc
        rows.append(row)
    return rows

