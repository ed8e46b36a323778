"""The sequence-mixing operations a layer calls, behind one small object.

Layers hold a :class:`SequenceOps` in their ``ops`` attribute and call it for everything that mixes
along the sequence. The default runs on one process; ``sh2.strategies.parallelize`` swaps in
context-parallel versions from outside, so the model never imports ``torch.distributed``. Each operator kind
names the method it mixes with (``kind.sequence_op``, see :mod:`sh2.models.operators`).

The Hyena methods take the three streams ``q`` (post-gate), ``k`` (pre-gate) and ``v`` (value), ``[B, L, D]``,
as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sh2 import kernels


class SequenceOps:
    """Single-process sequence mixing. Shapes are sequence-major, as activations are in the model."""

    def short_conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Featurizer: depthwise causal conv of ``x [B, L, C]`` with ``w [C, K]``."""
        return kernels.causal_depthwise_conv(x, w)

    def fir(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        """Hyena-SE/MR: ``q * (conv(k*v, h) + bias*k*v)`` with grouped filters ``h [G, K]``."""
        return kernels.gated_fir_conv(q, k, v, h, bias)

    def long_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                  residues: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Hyena-LI: the modal filter built for the sequence length, then a gated FFT convolution."""
        h = kernels.modal_filter(log_poles, residues, q.shape[1])
        return kernels.gated_fft_conv(q, k, v, h, bias)

    def modal_conv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_poles: torch.Tensor,
                   residues: torch.Tensor, bias: torch.Tensor | None, return_state: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hyena-LI by its modal recurrence (optionally with the final ``[B, D, N]`` state, for decoding).

        ``log_poles`` come from the model's ``-exp(p) exp(gamma)`` parametrisation, which keeps them <= 0, so the
        kernel's value check (a host synchronisation) is skipped.
        """
        return kernels.gated_modal_conv(q, k, v, log_poles, residues, bias, return_state=return_state,
                                        check_values=False)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention on ``[B, L, H, hd]`` (k, v may have fewer heads: GQA)."""
        if k.shape[2] != q.shape[2]:
            rep = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        return out.transpose(1, 2)


LOCAL_OPS = SequenceOps()
