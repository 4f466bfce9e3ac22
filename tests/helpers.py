"""Small builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import torch

from loopsearch.looping import LoopedMDM, NoParams
from loopsearch_builtins.strategies import FixedLoops, FixedParams, NoLoop
from loopsearch_builtins.transformer import Transformer, TransformerParams


def tiny_model(n_layer=4, d_model=32, n_heads=2, vocab=50, seq_len=16, loop=None, seed=0, **backbone) -> LoopedMDM:
    """loop = (start, end, FixedParams kwargs) or None for the plain model."""
    torch.manual_seed(seed)
    bb = Transformer(TransformerParams(n_layer=n_layer, d_model=d_model, n_heads=n_heads, **backbone), vocab, seq_len)
    if loop is None:
        return LoopedMDM(bb, NoLoop(NoParams(), d_model))
    start, end, kw = loop
    return LoopedMDM(bb, FixedLoops(FixedParams(**kw), d_model), start, end)
