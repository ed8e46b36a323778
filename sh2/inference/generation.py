"""Cached autoregressive generation on an :class:`~sh2.models.SH2Model`.

Example:
    >>> out = generate(model, ["ACGTACGT", "GGC"], max_new_tokens=100, temperature=0.7, top_k=4,
    ...                alphabet="ACGT", seed=0)
    >>> out.sequences   # the generated continuations as strings

:func:`~sh2.inference.cache.prefill` runs the prompt through the model's parallel path once and returns an
:class:`~sh2.inference.cache.InferenceCache`; :func:`~sh2.inference.cache.decode_step` then costs one token per
call, constant memory for the Hyena layers and a growing KV cache for the few attention layers.
Prompts of different lengths are left-padded and masked: every sample's positions count its own
tokens only, so a padded batch gives the same logits as running each prompt alone (fp32 rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sh2.inference.cache import InferenceCache, decode_step, prefill
from sh2.inference.tokens import PAD_ID, decode, encode_batch

__all__ = ["InferenceCache", "GenerationOutput", "prefill", "decode_step", "sample_next", "generate",
           "alphabet_ids"]


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        tokens: generated ids ``[B, n]`` (``PAD_ID`` after a sample stopped).
        sequences: the generated continuations decoded as text.
        logprobs: log-probability of each generated token under the model's unmodified distribution
            (temperature 1, no filtering), ``[B, n]`` (0 after a sample stopped).
        prompt_lengths: prompt length of every sample.
    """

    tokens: torch.Tensor
    sequences: list[str]
    logprobs: torch.Tensor
    prompt_lengths: list[int] = field(default_factory=list)


def alphabet_ids(alphabet: str | Sequence[int] | None, vocab_size: int = 512) -> torch.Tensor | None:
    """Token ids allowed by an alphabet: a string (its UTF-8 bytes, e.g. ``"ACGT"``) or a list of ids."""
    if alphabet is None:
        return None
    ids = sorted(set(alphabet.encode("utf-8"))) if isinstance(alphabet, str) else sorted(set(int(a) for a in alphabet))
    if not ids or min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"alphabet must name ids in [0, {vocab_size}), got {ids}")
    return torch.tensor(ids, dtype=torch.long)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                allowed: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one id per row of ``logits [B, vocab]``.

    Args:
        temperature: 0 = greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely ids (0 = all).
        top_p: nucleus sampling: keep the smallest set of ids whose probability reaches ``top_p``.
        allowed: ids sampling is restricted to (e.g. :func:`alphabet_ids` of ``"ACGT"``).
        generator: random generator on the logits' device (reproducible sampling).
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0, top_k >= 0 and top_p in (0, 1]")
    logits = logits.float()
    if allowed is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[allowed.to(logits.device)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this id already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[str] | torch.Tensor, max_new_tokens: int = 100, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             alphabet: str | Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
             stop_ids: Sequence[int] = (), seed: int | None = None, uppercase: bool = True) -> GenerationOutput:
    """Generate continuations of a batch of prompts with cached decoding.

    Args:
        model: an :class:`~sh2.models.SH2Model` (eval mode is set for the call).
        prompts: strings (byte-tokenized, left-padded) or ids ``[B, L]`` (then ``attention_mask``
            marks left padding).
        max_new_tokens: tokens to generate per prompt.
        temperature: sampling temperature (0 = greedy).
        top_k: top-k filtering (0 = off).
        top_p: nucleus filtering (1 = off).
        alphabet: restrict sampling to these characters/ids (e.g. ``"ACGT"``).
        attention_mask: for id prompts, ``[B, L]`` with 0 at left padding.
        stop_ids: a sample stops after generating one of these ids (e.g. ``[0]`` for end of document).
        seed: seed of the sampling generator (default: torch's global generator).
        uppercase: upper-case string prompts before tokenizing (Evo 2 was trained on upper case; soft-masked,
            lowercase prompts would otherwise look like rare tokens to it).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        input_ids = prompts.to(device)
        lengths = (attention_mask.sum(1).tolist() if attention_mask is not None
                   else [input_ids.shape[1]] * input_ids.shape[0])
    else:
        input_ids, attention_mask = encode_batch(prompts, pad="left", uppercase=uppercase)
        input_ids = input_ids.to(device)
        lengths = attention_mask.sum(1).tolist()
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"prompts must be a non-empty batch [B, L], got shape {tuple(input_ids.shape)}")
    allowed = alphabet_ids(alphabet, model.config.vocab_size)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        logits, cache = prefill(model, input_ids, attention_mask, max_new_tokens, last_logits_only=True)
        B = input_ids.shape[0]
        tokens = torch.full((B, max_new_tokens), PAD_ID, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, allowed, generator)
            lp = logits.float().log_softmax(-1).gather(-1, nxt[:, None])[:, 0]
            tokens[:, t] = torch.where(done, PAD_ID, nxt)
            logprobs[:, t] = torch.where(done, 0.0, lp)
            if stops.numel():
                done |= torch.isin(nxt, stops)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits = decode_step(model, nxt, cache)
    finally:
        model.train(was_training)
    texts = []
    for row in tokens.tolist():
        stop = next((i + 1 for i, tok in enumerate(row) if tok in stop_ids), len(row))
        texts.append(decode(row[:stop]))
    return GenerationOutput(tokens, texts, logprobs, [int(n) for n in lengths])
