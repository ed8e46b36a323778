"""The decoding cache of a whole model: :func:`prefill` builds it, :func:`decode_step` advances it.

Each layer's state and the functions that build and advance it belong to its operator kind and live with the
mixer (see :mod:`sh2.models.mixer`): every mixer has ``prefill(x, positions=, valid=, capacity=)`` and
``step(x, state, position=, valid=)``. This module runs them block by block, with the norms, residuals and
MLPs around them, and keeps what is shared by all layers: RoPE positions and the left-padding mask.

- Hyena-SE / Hyena-MR (:class:`~sh2.models.hyena.FIRState`): the last ``K - 1`` values of ``z = k * v``.
- Hyena-LI (:class:`~sh2.models.hyena.ModalState`): the exact modal recurrence, state ``[B, D, N]`` fp32,
  computed after the prompt by :func:`li_prefill_state` in chunks.
- Every Hyena layer (:class:`HyenaCache`): also the featurizer's last ``K_f - 1`` projected inputs.
- MHA (:class:`KVCache`): keys and values ``[B, kv_heads, capacity, head_dim]``, allocated once for prompt + new
  tokens.

Prefill runs each mixer's own parallel path, so prefill logits equal :meth:`SH2Model.forward` bit for bit
when no padding mask is given; stepwise logits agree with the parallel forward to fp32 rounding.

Left padding: a boolean ``valid [B, L]`` makes every convolution see a zero history at padded positions
(exactly as at the start of a sequence) and masks padded keys in attention; positions (RoPE) count real
tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sh2.models.attention import KVCache
from sh2.models.hyena import FIRState, HyenaCache, ModalState, li_prefill_state
from sh2.models.mixer import DecodeState, compute_dtype

__all__ = ["InferenceCache", "prefill", "decode_step", "HyenaCache", "FIRState", "ModalState", "KVCache",
           "li_prefill_state", "compute_dtype"]


@dataclass
class InferenceCache:
    """Decoding state of a whole model.

    Attributes:
        layers: one state per block, from its mixer's ``prefill`` (:class:`HyenaCache`, :class:`KVCache`).
        positions: RoPE position of the next token, per sample ``[B]``.
        valid: key validity ``[B, tokens so far]`` (False at left padding), or None when nothing is padded.
    """

    layers: list[DecodeState]
    positions: torch.Tensor
    valid: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` in every layer (e.g. after some samples finished)."""
        for state in self.layers:
            state.select(index)
        self.positions = self.positions[index]
        if self.valid is not None:
            self.valid = self.valid[index]


def _left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("attention_mask must be left-padded (zeros before the prompt, ones after); "
                         "pad prompts on the left for generation")
    if bool((~mask[:, -1]).any()):
        raise ValueError("attention_mask: every prompt needs at least one token")
    return mask


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            max_new_tokens: int = 0, last_logits_only: bool = False) -> tuple[torch.Tensor, InferenceCache]:
    """Run the prompt through the model and build the decoding caches.

    Args:
        model: an :class:`~sh2.models.SH2Model`.
        input_ids: prompt ids ``[B, L]``, left-padded when prompts differ in length.
        attention_mask: ``[B, L]``, 1 for prompt tokens and 0 for left padding (None: no padding).
        max_new_tokens: tokens that will be generated (sizes the KV caches exactly).
        last_logits_only: return ``[B, vocab]`` logits of the last position instead of ``[B, L, vocab]``.

    Returns:
        ``(logits, cache)``. Without a mask the logits equal ``model(input_ids)`` exactly.
    """
    B, L = input_ids.shape
    device = input_ids.device
    valid = None
    positions = torch.arange(L, device=device)
    if attention_mask is not None:
        mask = _left_padding(attention_mask.to(device))
        if not bool(mask.all()):
            valid = mask
            pad = (~mask).sum(1, keepdim=True)
            positions = (torch.arange(L, device=device)[None] - pad).clamp_min(0)
    x = model.embed(input_ids)
    layers: list[DecodeState] = []
    for block in model.blocks:
        out, state = block.mixer.prefill(block.norm_in(x), positions=positions, valid=valid,
                                         capacity=L + max_new_tokens)
        layers.append(state)
        u = x + out
        x = u + block.mlp(block.norm_mlp(u))
    logits = model.head(x[:, -1:] if last_logits_only else x)
    next_pos = (positions[..., -1] + 1).expand(B).clone() if positions.dim() == 1 else positions[:, -1] + 1
    return (logits[:, -1] if last_logits_only else logits), InferenceCache(layers, next_pos, valid)


@torch.no_grad()
def decode_step(model: torch.nn.Module, token: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """Feed one token per sample (``token [B]``) and return the next-token logits ``[B, vocab]``."""
    x = model.embed(token[:, None])
    if cache.valid is not None:
        cache.valid = torch.cat([cache.valid, cache.valid.new_ones(cache.valid.shape[0], 1)], dim=1)
    for block, state in zip(model.blocks, cache.layers):
        out = block.mixer.step(block.norm_in(x), state, position=cache.positions, valid=cache.valid)
        u = x + out
        x = u + block.mlp(block.norm_mlp(u))
    cache.positions = cache.positions + 1
    return model.head(x)[:, 0]
