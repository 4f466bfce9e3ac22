"""Looping semantics: n_loops = 1 is the plain model, loops share weights, draws stay in range."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_model


@settings(max_examples=15, deadline=None)
@given(start=st.integers(0, 3), length=st.integers(1, 4), reinject=st.booleans(), seed=st.integers(0, 100))
def test_one_loop_equals_plain_model(start, length, reinject, seed):
    end = min(4, start + length)
    plain = tiny_model(seed=seed)
    looped = tiny_model(seed=seed, loop=(start, end, {"n_loops": 1, "reinject": reinject}))
    looped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 51, (2, 16))
    a = plain(x).logits
    out = looped(x)
    assert out.applications == 1.0
    assert torch.equal(a, out.logits)


def test_loops_share_weights_and_change_output():
    looped = tiny_model(loop=(1, 3, {"n_loops": 3}))
    plain = tiny_model()
    assert sum(p.numel() for p in looped.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randint(0, 51, (2, 16))
    one = looped(x, n_loops=1)
    three = looped(x)
    assert three.applications == 3.0 and not torch.allclose(one.logits, three.logits)


def test_looped_block_runs_exactly_n_times():
    model = tiny_model(loop=(1, 2, {"n_loops": 4}))
    calls = []
    model.backbone.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    model.backbone.blocks[0].register_forward_hook(lambda *a: calls.append(0))
    model(torch.randint(0, 51, (1, 16)))
    assert calls.count(1) == 4 and calls.count(0) == 1


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_uniform_training_loops_within_bounds(n, seed):
    model = tiny_model(loop=(0, 1, {"n_loops": n, "train_loops": "uniform"}))
    g = torch.Generator().manual_seed(seed)
    draws = [model.strategy.train_loops(g) for _ in range(50)]
    assert all(1 <= d <= n for d in draws)
    assert model.strategy.max_train_loops() == n
    assert model.strategy.expected_train_loops() == (n + 1) / 2
    assert model.strategy.eval_loops() == n


def test_uniform_draws_cover_range():
    model = tiny_model(loop=(0, 1, {"n_loops": 4, "train_loops": "uniform"}))
    g = torch.Generator().manual_seed(0)
    assert {model.strategy.train_loops(g) for _ in range(200)} == {1, 2, 3, 4}
