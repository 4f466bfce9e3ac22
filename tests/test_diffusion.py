"""MDLM objective: masking follows t, SUBS never predicts MASK, the ELBO weights by 1/t."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopsearch.looping import ModelOutput
from loopsearch.diffusion import (elbo, mask_tokens, masked_nll, sample_t, subs_log_probs, validation_elbo,
                                  validation_masks)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 64), seed=st.integers(0, 1000))
def test_antithetic_t_in_range_and_spread(b, seed):
    t = sample_t(b, torch.Generator().manual_seed(seed))
    assert t.shape == (b,) and bool(((t > 0) & (t <= 1)).all())
    # antithetic: one point in each of the b equal bins of [eps, 1)
    bins = torch.floor((t - 1e-3) / (1 - 1e-3) * b).long().clamp(max=b - 1)
    assert sorted(bins.tolist()) == list(range(b))


def test_mask_rate_follows_t():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(4, 5000, dtype=torch.long)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    xt, masked = mask_tokens(x0, t, mask_id=7, generator=g)
    assert torch.equal(xt == 7, masked)
    assert torch.allclose(masked.float().mean(1), t, atol=0.03)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000))
def test_subs_never_predicts_mask(seed):
    torch.manual_seed(seed)
    logits = torch.randn(3, 5, 11) * 5
    logits[..., 10] = 100.0  # even a huge MASK logit gets zero probability
    lp = subs_log_probs(logits, mask_id=10)
    assert torch.isneginf(lp[..., 10]).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 5), atol=1e-5)


def test_unmasked_positions_cost_nothing():
    logits = torch.randn(2, 6, 9)
    x0 = torch.randint(0, 8, (2, 6))
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[0, 2] = True
    nll = masked_nll(logits, x0, masked, mask_id=8)
    assert (nll[~masked] == 0).all() and nll[0, 2] > 0


def test_elbo_weights_by_inverse_t():
    nll = torch.ones(2, 4)
    t = torch.tensor([0.5, 0.25])
    assert elbo(nll, t).item() == (2 + 4) / 2


def test_uniform_model_validation_nll_is_log_vocab():
    """A model with uniform predictions over V clean tokens has ELBO = log V nats/token exactly:
    every draw is a mean of per-token losses log V (the k-subset form has no 1/t weight)."""
    V = 20

    def model(x, n_loops=None, t=None):
        return ModelOutput(torch.zeros(*x.shape, V + 1), 1.0)

    windows = torch.randint(0, V, (8, 64))
    val = validation_elbo(model, windows, list(range(8)), mask_id=V, draws=3, seed=0)
    assert val.nll == pytest.approx(math.log(V), rel=1e-6) and val.se == pytest.approx(0.0, abs=1e-6)
    assert val.values.shape == (8, 3) and val.draws == 3


def test_validation_masks_are_keyed_by_window_and_draw():
    """The masks of window w, draw r depend on (seed, w, r) only: not on the other windows, their
    order, the batch size or how many draws follow."""
    x = torch.randint(0, 10, (6, 16))
    keys = [3, 10, 11, 40, 41, 99]
    xt, masked, t, k = validation_masks(x, keys, 2, seed=5, mask_id=10)
    sub_xt, sub_masked, sub_t, sub_k = validation_masks(x[[4, 1]], [keys[4], keys[1]], 3, seed=5, mask_id=10)
    assert torch.equal(sub_masked[0], masked[4 * 2]) and torch.equal(sub_masked[3], masked[1 * 2])
    assert torch.equal(sub_masked[1], masked[4 * 2 + 1]) and torch.equal(sub_t[:2], t[8:10])
    # k tokens masked, k in 1..T; t in (0, 1); x_t has MASK exactly where masked
    assert bool(((k >= 1) & (k <= 16)).all()) and torch.equal(masked.sum(-1), k)
    assert bool(((t > 0) & (t < 1)).all()) and torch.equal(xt == 10, masked)
    other = validation_masks(x, keys, 2, seed=6, mask_id=10)[1]
    assert not torch.equal(other, masked)


def test_validation_is_independent_of_batch_size_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(11, 11, generator=gen)
    model = lambda x, n=None, t=None: ModelOutput(table[x], 1.0)  # noqa: E731 - per-token logits
    windows = torch.randint(0, 10, (5, 16))
    a = validation_elbo(model, windows, list(range(5)), 10, draws=2, seed=3, batch_size=2)
    b = validation_elbo(model, windows, list(range(5)), 10, draws=2, seed=3, batch_size=64)
    assert torch.allclose(a.values, b.values) and a.nll == pytest.approx(b.nll)
    assert validation_elbo(model, windows, list(range(5)), 10, draws=2, seed=3).nll == pytest.approx(a.nll)


def test_k_subset_estimator_matches_the_continuous_time_elbo():
    """The k-subset form equals the 1/t-weighted ELBO it replaces: for a model whose per-token loss
    depends on how many tokens are masked, both estimate the same integral (many draws)."""
    V, T = 6, 8

    def model(x, n=None, t=None):  # loss of a masked token grows with the masked fraction
        frac = (x == V).float().mean(-1, keepdim=True)
        logits = torch.zeros(*x.shape, V + 1)
        logits[..., 0] = 4.0 * (1 - frac)  # token 0 likelier when more context is visible
        return ModelOutput(logits, 1.0)

    windows = torch.zeros(400, T, dtype=torch.long)
    new = validation_elbo(model, windows, list(range(400)), V, draws=8, seed=0)
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    n = 200
    for _ in range(n):
        t = sample_t(400, gen)
        xt, masked = mask_tokens(windows, t, V, gen)
        total += elbo(masked_nll(model(xt).logits, windows, masked, V), t).item()
    old = total / n
    assert new.nll == pytest.approx(old, abs=4 * new.se + 0.01)
