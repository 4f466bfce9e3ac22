"""The trainer: exact FLOP budget, reproducible, errors when the budget cannot pay for a step."""

import pytest
import torch

from helpers import tiny_model
from loopsearch.data import prepare
from loopsearch.errors import BudgetError
from loopsearch.spec import TrainConfig
from loopsearch.train import lr_at, plan_steps, train
from loopsearch_builtins.corpora import Shakespeare, ShakespeareParams

CFG = TrainConfig(batch_size=4, seq_len=32, min_steps=1, eval_points=2, eval_sequences=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import os

    os.environ.setdefault("LOOPSEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    return prepare(Shakespeare(ShakespeareParams()), 300)


def model_for(data, loop=None):
    return tiny_model(vocab=data.vocab_size, seq_len=32, loop=loop)


@pytest.mark.parametrize("loop", [None, (1, 3, {"n_loops": 3}), (0, 2, {"n_loops": 5, "train_loops": "uniform"})],
                         ids=["plain", "fixed3", "uniform5"])
def test_budget_never_exceeded_and_within_one_step(data, loop):
    model = model_for(data, loop)
    budget = 1.5e9
    r = train(model, data, CFG, budget, seed=0, progress=False)
    largest_step = model.train_step_flops(32, 4, model.strategy.max_train_loops())
    assert r.train_flops <= budget
    assert budget - r.train_flops < largest_step
    assert r.steps > 1 and r.history[-1][0] == r.train_flops
    assert len(r.history) == CFG.eval_points


def test_flops_follow_the_drawn_loops(data):
    """uniform S ~ U{1..n}: spent FLOPs are the sum over steps of the loops actually drawn."""
    model = model_for(data, (0, 2, {"n_loops": 6, "train_loops": "uniform"}))
    r = train(model, data, CFG, 1e9, seed=1, progress=False)
    profile = model.flop_profile(32)
    share = r.train_stats["head_share"]  # the head runs only at masked positions: about half of them
    assert 0.3 < share < 0.7
    block = sum(profile.layers[0:2])
    expected = 3 * 4 * r.steps * (profile.forward(head_share=share) + (r.mean_train_loops - 1) * block)
    assert r.train_flops == pytest.approx(expected, rel=1e-9)
    assert 1 <= r.mean_train_loops <= 6


def test_same_seed_same_result(data):
    a = train(model_for(data), data, CFG, 5e8, seed=3, progress=False)
    b = train(model_for(data), data, CFG, 5e8, seed=3, progress=False)
    assert a.val_nll == b.val_nll and a.final_loss == b.final_loss and a.steps == b.steps


def test_training_reduces_validation_nll(data):
    model = model_for(data)
    r = train(model, data, CFG.model_copy(update={"eval_points": 3}), 3e9, seed=0, progress=False)
    first, last = r.history[0][1], r.history[-1][1]
    assert last < first < 6.0  # log(301) = 5.7 is a uniform guess


def test_budget_below_one_step_is_an_error(data):
    model = model_for(data, (0, 4, {"n_loops": 4}))
    step = model.train_step_flops(32, 4, 4)
    with pytest.raises(BudgetError, match="below one training step"):
        plan_steps(model, CFG, step * 0.9)
    with pytest.raises(BudgetError):
        train(model, data, CFG, step * 0.9, seed=0, progress=False)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, min_lr_frac=0.1)
    assert lr_at(0.0, cfg) < 0.02
    assert lr_at(0.1, cfg) == pytest.approx(1.0)
    assert lr_at(1.0, cfg) == pytest.approx(0.1)
    values = [lr_at(p / 100, cfg) for p in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_model_learns_to_use_context():
    """A period-7 sequence: every masked token is determined by its neighbours, so a working
    MDLM (masking, SUBS, ELBO, bidirectional attention) must go far below the unigram entropy."""
    import math

    from loopsearch.data import PreparedData

    base = torch.randint(0, 16, (7,), generator=torch.Generator().manual_seed(0))
    ids = base.repeat(3000)
    data = PreparedData(ids, ids[:4000].clone(), "", 16, "periodic")
    counts = torch.bincount(base, minlength=16).float() / 7
    unigram = -(counts[counts > 0] * counts[counts > 0].log()).sum().item()
    cfg = TrainConfig(batch_size=8, seq_len=32, lr=3e-3, min_steps=1, eval_points=2, eval_sequences=16)
    r = train(tiny_model(vocab=16, seq_len=32), data, cfg, 3e10, seed=0, progress=False)
    assert r.val_nll < 0.5 < 1.5 < unigram < math.log(16)


def test_non_finite_loss_stops_before_the_update(data, monkeypatch):
    """A NaN loss raises before the optimizer step: the weights stay finite, and the forward that
    ran is charged."""
    import loopsearch.train as trainer

    real, calls = trainer.diffusion_loss, []

    def poisoned(*args, **kwargs):
        loss, out = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), out

    monkeypatch.setattr(trainer, "diffusion_loss", poisoned)
    model = model_for(data)
    fixed = CFG.model_copy(update={"precision": "fp32", "compile": False})  # no speed probe: it calls the loss too
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 3"):
        train(model, data, fixed, 1e9, seed=0, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
