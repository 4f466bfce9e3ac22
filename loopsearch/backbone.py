"""What a backbone must provide so that a looping strategy can run any contiguous block range.

A backbone is an ``nn.Module`` subclass registered through ``register_backbones``. The core
never looks inside a block: it calls ``embed``, then ``run_block(i, h)`` for each layer in the
order the loop plan gives, then ``head``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from .flops import FlopProfile


class Backbone(nn.Module):
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    n_layer: int
    d_model: int
    n_tokens: int  # vocabulary size including the MASK token
    mask_id: int

    def __init__(self, params: BaseModel, vocab_size: int, seq_len: int):
        """``vocab_size`` counts the tokeniser's tokens; the backbone adds one MASK token
        (id ``vocab_size``)."""
        super().__init__()

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) ids -> (B, T, C)
        raise NotImplementedError

    # True when ``run_block(i, h, index=...)`` runs a subset of each sequence's tokens: ``index``
    # (B, T') long holds their positions (token-level routing, the ``router`` strategy, needs it)
    supports_token_index: bool = False

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, n_tokens) logits
        raise NotImplementedError

    def attention_probs(self, i: int, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, T)
        """Optional: the attention probabilities layer ``i`` applies to ``h`` (rows sum to 1),
        used by ``loopsearch analyze attention``."""
        raise NotImplementedError(
            f"backbone {getattr(self, 'name', type(self).__name__)!r} does not expose attention "
            f"probabilities (implement Backbone.attention_probs(i, h) to analyse its attention)"
        )

    def flop_profile(self, seq_len: int) -> FlopProfile:
        raise NotImplementedError
