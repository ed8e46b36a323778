"""Inference on SH2 models: cached generation (recurrent Hyena-LI, FIR and KV caches) and scoring.

Example:
    >>> from sh2.inference import generate, score_sequences
    >>> out = generate(model, ["ACGT"], max_new_tokens=50, temperature=0.7, alphabet="ACGT", seed=0)
    >>> scores = score_sequences(model, ["ACGTAGCT"], reverse_complement=True, layers=[-1])
"""

from sh2.inference.cache import HyenaCache, InferenceCache, KVCache, decode_step, li_prefill_state, prefill
from sh2.inference.generation import GenerationOutput, alphabet_ids, generate, sample_next
from sh2.inference.scoring import SequenceScore, score_sequences, token_logprobs
from sh2.inference.tokens import decode, encode, encode_batch, reverse_complement

__all__ = ["GenerationOutput", "HyenaCache", "InferenceCache", "KVCache", "SequenceScore", "alphabet_ids",
           "decode", "decode_step", "encode", "encode_batch", "generate", "li_prefill_state", "prefill",
           "reverse_complement", "sample_next", "score_sequences", "token_logprobs"]
