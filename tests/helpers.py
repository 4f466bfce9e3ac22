"""Small builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import torch

from loopsearch.looping import LoopedMDM, NoParams
from loopsearch_builtins.strategies import FixedLoops, FixedParams, NoLoop
from loopsearch_builtins.transformer import Transformer, TransformerParams


def random_data(seed=0):
    """4000 random token ids (vocabulary 49) as a PreparedData: train on all, validate on the first 600."""
    from loopsearch.data import PreparedData

    ids = torch.randint(0, 49, (4000,), generator=torch.Generator().manual_seed(seed))
    return PreparedData(ids, ids[:600].clone(), "", 49, "random")


def tiny_train_config(**overrides):
    """A TrainConfig for tiny models (batch 4 x seq 16, fp32 eager, one validation point)."""
    from loopsearch.spec import TrainConfig

    return TrainConfig(**{"batch_size": 4, "seq_len": 16, "min_steps": 1, "eval_sequences": 8,
                          "eval_curve_sequences": 8, "eval_points": 1, "precision": "fp32", "compile": False,
                          **overrides})


def tiny_model(n_layer=4, d_model=32, n_heads=2, vocab=50, seq_len=16, loop=None, seed=0, **backbone) -> LoopedMDM:
    """loop = (start, end, FixedParams kwargs) or None for the plain model."""
    torch.manual_seed(seed)
    bb = Transformer(TransformerParams(n_layer=n_layer, d_model=d_model, n_heads=n_heads, **backbone), vocab, seq_len)
    if loop is None:
        return LoopedMDM(bb, NoLoop(NoParams(), d_model))
    start, end, kw = loop
    return LoopedMDM(bb, FixedLoops(FixedParams(**kw), d_model), start, end)
