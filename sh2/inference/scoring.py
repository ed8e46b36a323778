"""Scoring and embeddings: per-token log-probabilities, sequence scores, hidden states of any layer.

Example:
    >>> scores = score_sequences(model, ["ACGTAC", "GGGA"], reverse_complement=True, layers=[-1])
    >>> scores[0].logprob_mean, scores[0].embeddings[-1].shape   # pooled last-block output [D]

Batches are right-padded: the model is causal, so a position never sees the padding after it, and
only positions inside each sequence are scored (the first token has no prediction: there is no
beginning-of-sequence token, so a sequence of length n gets n - 1 scored tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sh2.inference.tokens import encode_batch
from sh2.inference.tokens import reverse_complement as revcomp

__all__ = ["SequenceScore", "token_logprobs", "score_sequences"]


@dataclass
class SequenceScore:
    """Scores of one sequence.

    Attributes:
        length: tokens in the sequence.
        logprob_sum: sum of the log-probabilities of tokens 2..n (averaged with the reverse complement's
            when requested).
        logprob_mean: ``logprob_sum / (n - 1)`` (likewise averaged); NaN for one-token sequences.
        logprob_sum_forward: forward strand only.
        logprob_sum_rc: reverse complement only (None unless requested).
        token_logprobs: ``[n - 1]`` log p(token t | tokens < t), forward strand (when requested).
        embeddings: ``{layer: tensor}``: pooled ``[D]`` or per-token ``[n, D]`` hidden states.
    """

    length: int
    logprob_sum: float
    logprob_mean: float
    logprob_sum_forward: float
    logprob_sum_rc: float | None = None
    token_logprobs: torch.Tensor | None = None
    embeddings: dict[int, torch.Tensor] = field(default_factory=dict)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L - 1]`` log p(ids[:, t + 1] | ids[:, :t + 1]); 0 where the target is padding.

    Computed in fp32 from ``logits [B, L, vocab]``.
    """
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return lp * attention_mask[:, 1:].to(lp.dtype)


def _pool(h: torch.Tensor, n: int, pool: str) -> torch.Tensor:
    h = h[:n].float()
    if pool == "mean":
        return h.mean(0)
    if pool == "last":
        return h[-1]
    return h


@torch.no_grad()
def _forward(model: torch.nn.Module, texts: Sequence[str], uppercase: bool, max_length: int | None,
             want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    device = next(model.parameters()).device
    ids, mask = encode_batch(texts, pad="right", uppercase=uppercase, max_length=max_length)
    ids, mask = ids.to(device), mask.to(device)
    if want_hidden:
        logits, hidden = model(ids, output_hidden_states=True)
    else:
        logits, hidden = model(ids), None
    return token_logprobs(logits, ids, mask), mask, hidden


@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: Sequence[str], *, batch_size: int = 8,
                    reverse_complement: bool = False, per_token: bool = False,
                    layers: Sequence[int] | None = None, pool: str = "mean", uppercase: bool = True,
                    max_length: int | None = None) -> list[SequenceScore]:
    """Score sequences (and optionally embed them) with a causal language model.

    Args:
        model: an :class:`~sh2.models.SH2Model` (put it in eval mode and, for bf16, under autocast or
            converted; scores are computed in fp32 from the logits).
        sequences: strings (byte-tokenized).
        batch_size: sequences per forward pass (right-padded).
        reverse_complement: also score the reverse complement and average the sequence scores.
        per_token: keep the forward-strand per-token log-probabilities.
        layers: hidden states to return: block indices (0 .. N-1, negative counts from the end; -1 is the
            last block's output, before the final norm).
        pool: ``"mean"`` over the sequence, ``"last"`` token, or ``"none"`` (per token ``[n, D]``).
        uppercase: upper-case the sequences before tokenizing (the default, as ``sh2 predict`` does: Evo 2 was
            trained on upper case, and a soft-masked, lowercase stretch would otherwise score as rare tokens).
        max_length: truncate sequences to this many tokens.

    Returns:
        One :class:`SequenceScore` per input, in order.
    """
    if pool not in ("mean", "last", "none"):
        raise ValueError(f"pool must be 'mean', 'last' or 'none', got {pool!r}")
    n_blocks = len(model.blocks)
    layer_idx = [int(i) for i in layers or []]
    for i in layer_idx:
        if not -n_blocks <= i < n_blocks:
            raise ValueError(f"layer {i} out of range for a model with {n_blocks} blocks")
    results: list[SequenceScore] = []
    for start in range(0, len(sequences), batch_size):
        chunk = [s[:max_length] if max_length else s for s in sequences[start:start + batch_size]]
        lp, mask, hidden = _forward(model, chunk, uppercase, max_length, bool(layer_idx))
        lengths = mask.sum(1).tolist()
        rc_sums = None
        if reverse_complement:
            lp_rc, _, _ = _forward(model, [revcomp(s) for s in chunk], uppercase, max_length, False)
            rc_sums = lp_rc.sum(1).tolist()
        fwd_sums = lp.sum(1).tolist()
        for b, n in enumerate(lengths):
            n = int(n)
            fwd = fwd_sums[b]
            total = fwd if rc_sums is None else 0.5 * (fwd + rc_sums[b])
            embeddings = {i: _pool(hidden[i % n_blocks + 1][b], n, pool).cpu() for i in layer_idx} if hidden else {}
            results.append(SequenceScore(
                length=n, logprob_sum=total, logprob_mean=total / (n - 1) if n > 1 else float("nan"),
                logprob_sum_forward=fwd, logprob_sum_rc=None if rc_sums is None else rc_sums[b],
                token_logprobs=lp[b, : n - 1].cpu() if per_token else None, embeddings=embeddings))
    return results
