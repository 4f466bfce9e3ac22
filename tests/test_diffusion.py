"""MDLM objective: masking follows t, SUBS never predicts MASK, the ELBO weights by 1/t."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopsearch.looping import ModelOutput
from loopsearch.diffusion import (elbo, mask_tokens, masked_nll, sample_t, subs_log_probs, t_grid,
                                  validation_nll)


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
    """A model with uniform predictions over V clean tokens has ELBO = log V nats/token
    (in expectation over masks; the t grid's midpoint rule is exact here because E[masked]/t = 1)."""
    V = 20

    def model(x, n_loops=None, t=None):
        return ModelOutput(torch.zeros(*x.shape, V + 1), 1.0)

    batches = [torch.randint(0, V, (8, 256))]
    nll = validation_nll(model, batches, mask_id=V, n_t=8, seed=0)
    assert abs(nll - math.log(V)) < 0.05 * math.log(V)


def test_validation_is_deterministic_and_grid_is_midpoints():
    assert torch.allclose(t_grid(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    model = lambda x, n=None, t=None: ModelOutput(torch.randn(*x.shape, 11, generator=torch.Generator().manual_seed(1)), 1.0)  # noqa
    b = [torch.randint(0, 10, (2, 16))]
    assert validation_nll(model, b, 10, seed=3) == validation_nll(model, b, 10, seed=3)
