"""SH2Block and SH2Model: embedding -> blocks -> final RMSNorm -> tied LM head."""

from __future__ import annotations

import math

import torch
from torch import nn

from sh2.models.config import SH2Config
from sh2.models.layers import GatedMLP, RMSNorm
from sh2.models.mixer import Mixer
from sh2.models.operators import mixer_class


class SH2Block(nn.Module):
    """``u = x + Mixer(norm_in(x)); out = u + MLP(norm_mlp(u))``.

    ``operator`` is the layer's kind name (``config.operators[layer_idx]``); ``mixer`` is an instance of that
    kind's :class:`~sh2.models.mixer.Mixer` class (see :mod:`sh2.models.operators`).
    """

    def __init__(self, config: SH2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.operator = config.operators[layer_idx]
        out_std = config.init_std / math.sqrt(2 * config.num_layers)
        use_gelu = config.mlp_activation == "gelu" or layer_idx == 0
        self.norm_in = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer: Mixer = mixer_class(self.operator)(config, out_std)
        self.norm_mlp = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_hidden_size, use_gelu, config.init_std, out_std)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        u = x + self.mixer(self.norm_in(x), position_ids)
        return u + self.mlp(self.norm_mlp(u))


class SH2Model(nn.Module):
    """A StripedHyena 2 language model.

    Example:
        >>> cfg = SH2Config.from_name("tiny")
        >>> model = SH2Model(cfg)
        >>> logits = model(torch.randint(0, 512, (2, 64)))  # [2, 64, 512]

    Args:
        config: the model configuration. The model builds under ``torch.device("meta")`` too; call
            :meth:`init_weights` after materialising it (``to_empty``).
    """

    def __init__(self, config: SH2Config) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(SH2Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                    bias=False)
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        nn.init.normal_(self.embedding.weight, std=self.config.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)

    def init_units(self) -> list[nn.Module]:
        """The submodules that together hold every parameter: embedding, each block, final norm, LM head.

        Sharded strategies that must gather parameters to initialise them (DeepSpeed ZeRO-3) do it one unit
        at a time, so that no GPU ever holds more than one block in full.
        """
        # the order init_weights() draws in (embedding and LM head first): a seed gives the same weights whether
        # the model is initialised whole or unit by unit
        return [self.embedding, *([self.lm_head] if self.lm_head is not None else []), *self.blocks, self.norm]

    @torch.no_grad()
    def init_weights(self, units: list[nn.Module] | None = None) -> None:
        """(Re-)initialise every parameter, e.g. after ``to_empty`` from the meta device.

        Args:
            units: only these submodules (elements of :meth:`init_units`); default: the whole model.
        """
        for unit in self.init_units() if units is None else units:
            if unit is self.embedding:
                nn.init.normal_(self.embedding.weight, std=self.config.init_std)
            elif unit is self.lm_head:
                nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
            for module in unit.modules():
                if hasattr(module, "reset_parameters") and not isinstance(module, (nn.Linear, nn.Embedding)):
                    module.reset_parameters()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        return self.embedding(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden ``[B, L, D]`` -> logits ``[B, L, vocab]``."""
        h = self.norm(hidden)
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return h @ weight.to(h.dtype).t()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, L, vocab]`` (and, optionally, the input of every block plus the last output).

        Args:
            input_ids: token ids ``[B, L]``.
            position_ids: RoPE positions ``[L]`` or ``[B, L]`` (default ``arange(L)``; context parallelism
                passes the positions of its shard).
            output_hidden_states: also return ``[embeddings, block 0 out, ..., block N-1 out]``.
        """
        x = self.embed(input_ids)
        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, position_ids)
            if hidden is not None:
                hidden.append(x)
        logits = self.head(x)
        return (logits, hidden) if output_hidden_states else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
