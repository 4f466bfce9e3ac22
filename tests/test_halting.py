"""The ``halting`` strategy (ACT): valid weights, gradients, inference halting, frozen unmasked
positions, FLOPs of what is executed (checked against torch's FlopCounterMode), a tiny study."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from loopsearch.looping import LoopContext, LoopedMDM
from loopsearch_builtins.halting import Halting, HaltingParams, act_weights
from loopsearch_builtins.strategies import FixedLoops, FixedParams
from loopsearch_builtins.transformer import Transformer, TransformerParams

VOCAB, SEQ = 50, 16
PROPERTY = settings(max_examples=40, deadline=None)


def halting_model(loop=(1, 3), n_layer=4, d_model=32, n_heads=2, seq_len=SEQ, seed=0, head_std=None,
                  **params) -> LoopedMDM:
    """A tiny transformer looped by ``halting``; ``head_std``: random halting-head weights (the
    default zero weight gives every token the same p = sigmoid(init_bias))."""
    torch.manual_seed(seed)
    bb = Transformer(TransformerParams(n_layer=n_layer, d_model=d_model, n_heads=n_heads), VOCAB, seq_len)
    model = LoopedMDM(bb, Halting(HaltingParams(**params), d_model), loop[0], loop[1])
    if head_std is not None:
        with torch.no_grad():
            model.strategy.head.weight.normal_(0.0, head_std)
    return model


def fixed_twin(model: LoopedMDM, n_loops: int) -> LoopedMDM:
    """The ``fixed`` strategy with n_loops on the same backbone (same weights)."""
    return LoopedMDM(model.backbone, FixedLoops(FixedParams(n_loops=n_loops), model.backbone.d_model),
                     model.loop_start, model.loop_end)


def tokens(batch=3, seq_len=SEQ, rate=0.5, seed=0) -> torch.Tensor:
    """Random tokens with about ``rate`` of the positions MASK (at least one of each kind)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, seq_len), generator=g)
    masked = torch.rand(batch, seq_len, generator=g) < rate
    masked[:, 0], masked[:, 1] = True, False
    return torch.where(masked, torch.full_like(x, VOCAB), x)  # MASK is the last id (= VOCAB)


def measured(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- the ACT rule --------------------------------------------------------------------------------------
@st.composite
def halting_probs(draw):
    k, m = draw(st.integers(1, 8)), draw(st.integers(1, 5))
    prob = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, 0.99, 1e-7]))
    p = torch.tensor(draw(st.lists(prob, min_size=k * m, max_size=k * m)), dtype=torch.float32).view(k, m)
    first = torch.tensor(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
    threshold = draw(st.floats(0.01, 1.0))
    return p, threshold, first


@PROPERTY
@given(halting_probs())
def test_act_weights_are_a_distribution_over_loops(case):
    p, threshold, first = case
    K = p.shape[0]
    w, n, r = act_weights(p, threshold, first)
    assert w.shape == p.shape
    assert (w >= 0).all() and (w <= 1).all()
    assert torch.allclose(w.sum(0), torch.ones(p.shape[1]), atol=1e-6)
    for j in range(p.shape[1]):
        halt = int(n[j])
        assert 1 <= halt <= K
        assert (w[halt:, j] == 0).all()  # no weight after halting
        assert torch.equal(w[: halt - 1, j], p[: halt - 1, j])  # p before halting
        assert r[j] == w[halt - 1, j] and math.isclose(float(r[j]), 1 - float(p[: halt - 1, j].sum()), abs_tol=1e-6)
        if first[j]:
            assert halt == 1 and w[0, j] == 1  # an unmasked position: one loop, weight 1
        elif halt < K:
            assert float(p[:halt, j].sum()) >= threshold - 1e-6  # halted because the threshold was reached
        if not first[j]:  # never halts before the threshold is reached
            assert all(float(p[: i + 1, j].sum()) < threshold + 1e-6 for i in range(halt - 1))


@PROPERTY
@given(bias=st.floats(-20, 20), scale=st.floats(0.0, 1e3), h_scale=st.sampled_from([1e-6, 1.0, 1e4]),
       seed=st.integers(0, 100))
def test_halting_probabilities_are_in_unit_interval(bias, scale, h_scale, seed):
    torch.manual_seed(seed)
    s = Halting(HaltingParams(init_bias=bias), 8)
    with torch.no_grad():
        s.head.weight.normal_(0.0, scale)
    p = s.halting_prob(torch.randn(2, 5, 8) * h_scale)
    assert p.shape == (2, 5) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()


class ShiftBlock:
    """A fake loop block whose k-th application gives h + k (for a running token), so the ACT
    output is h + sum_k w_k * k. Records every input it is applied to."""

    def __init__(self):
        self.calls = []

    def __call__(self, h):
        self.calls.append(h)
        return h + 1.0


@PROPERTY
@given(n_loops=st.integers(1, 6), bias=st.floats(-4, 4), threshold=st.floats(0.3, 1.0),
       training=st.booleans(), seed=st.integers(0, 1000))
def test_run_outputs_the_act_mean_of_the_loop_states(n_loops, bias, threshold, training, seed):
    torch.manual_seed(seed)
    s = Halting(HaltingParams(n_loops=n_loops, init_bias=bias, threshold=threshold), 8)
    with torch.no_grad():
        s.head.weight.normal_(0.0, 3.0)
    h = torch.randn(2, 6, 8)
    masked = torch.rand(2, 6) < 0.6
    block = ShiftBlock()
    with torch.no_grad():
        res = s.run(h, block, n_loops, LoopContext(masked=masked, training=training))
        p = torch.stack([s.halting_prob(h + k) for k in range(1, n_loops + 1)])
    w, n, _ = act_weights(p, threshold, ~masked)
    expected = h + (w * torch.arange(1, n_loops + 1, dtype=torch.float32)[:, None, None]).sum(0)[..., None]
    assert torch.allclose(res.h, expected, atol=1e-5)
    ran = int(n.max()) if not training else n_loops  # inference stops once every token halted
    assert res.applications == ran == res.stats["loops_run"] == len(block.calls)
    assert res.extra_flops == s.head_flops(6) * (ran - 1 if ran == n_loops else ran)
    assert res.extra_flops <= s.extra_flops_bound(n_loops, 6)
    assert math.isclose(res.stats["mean_token_loops"], float(n[masked].mean()), rel_tol=1e-6)
    assert (res.aux_loss is not None) == training


@pytest.mark.parametrize("training", [False, True])
def test_unmasked_positions_are_frozen_after_the_first_loop(training):
    torch.manual_seed(0)
    s = Halting(HaltingParams(n_loops=5, init_bias=-20.0), 8)  # masked tokens run all 5 loops
    lin = torch.nn.Linear(8, 8)
    h = torch.randn(2, 7, 8)
    masked = torch.rand(2, 7) < 0.5
    masked[0, 0], masked[0, 1] = True, False

    def block(x):  # mixes tokens, as attention does
        return torch.tanh(lin(x) + x.mean(1, keepdim=True))

    calls = []
    with torch.no_grad():
        res = s.run(h, lambda x: calls.append(x) or block(x), 5, LoopContext(masked=masked, training=training))
        first = block(h)
    assert res.applications == 5 == len(calls)
    assert torch.equal(res.h[~masked], first[~masked])  # unmasked: the first loop's output, weight 1
    for x in calls[1:]:
        assert torch.equal(x[~masked], first[~masked])  # their state never changes after loop 1
    assert not torch.allclose(res.h[masked], first[masked])  # masked positions kept looping
    assert res.stats["mean_token_loops"] == 5.0


# ---- the model ------------------------------------------------------------------------------------
def test_strategy_is_registered_and_its_head_is_trained_with_the_model():
    from loopsearch.registry import get_registry

    assert get_registry().get("loop_strategy", "halting") is Halting
    model = halting_model()
    ids = {id(p) for p in model.parameters()}
    assert id(model.strategy.head.weight) in ids and id(model.strategy.head.bias) in ids
    assert "strategy.head.weight" in model.state_dict()
    s = model.strategy
    assert s.train_loops(torch.Generator()) == s.max_train_loops() == s.eval_loops() == 4
    assert s.expected_train_loops() == 4.0
    with pytest.raises(Exception):
        HaltingParams(bogus=1)
    with pytest.raises(Exception):
        HaltingParams(n_loops=0)


def test_gradients_reach_the_halting_head_and_the_block():
    model = halting_model(loop=(1, 3), n_loops=4, init_bias=-1.0, head_std=0.5)
    model.train()
    x = tokens()
    out = model(x)
    assert out.aux_loss is not None and out.aux_loss.requires_grad and out.aux_loss > 0
    (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    s = model.strategy
    block_params = [*model.backbone.blocks[1].parameters(), *model.backbone.blocks[2].parameters()]
    for p in (s.head.weight, s.head.bias, *block_params):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the ponder cost alone reaches the head (through the remainder R)
    model.zero_grad()
    model(x).aux_loss.backward()
    assert s.head.bias.grad is not None and s.head.bias.grad.abs() > 0
    # the ponder cost is tau * mean over masked positions of N + R
    with torch.no_grad():
        out = model(x)
    assert out.stats["ponder"] >= 1.0 and math.isclose(float(out.aux_loss), 0.01 * out.stats["ponder"], rel_tol=1e-6)
    # never halting: N = n_loops and R = 1 for every masked token; unmasked ones are not charged
    never = halting_model(n_loops=3, init_bias=-20.0, ponder_cost=0.5).train()
    with torch.no_grad():
        out = never(x)
    assert math.isclose(out.stats["ponder"], 4.0, rel_tol=1e-6) and math.isclose(float(out.aux_loss), 2.0, rel_tol=1e-6)


def test_halting_at_the_first_loop_equals_fixed_with_one_loop():
    model = halting_model(n_loops=4, init_bias=20.0).eval()  # p = 1: every token halts at loop 1
    x = tokens()
    with torch.no_grad():
        out = model(x)
        ref = fixed_twin(model, 1)(x)
    assert out.applications == 1.0 and out.stats["loops_run"] == 1.0 and out.stats["mean_token_loops"] == 1.0
    assert torch.equal(out.logits, ref.logits)
    assert out.extra_flops == model.strategy.head_flops(SEQ)  # the head ran once (to decide to halt)


def test_never_halting_runs_n_loops_and_equals_fixed():
    model = halting_model(n_loops=5, init_bias=-20.0).eval()  # p ~ 2e-9: the cap decides
    x = torch.full((3, SEQ), VOCAB)  # every position MASK (unmasked ones would stop after loop 1)
    with torch.no_grad():
        out = model(x)
        ref = fixed_twin(model, 5)(x)
    assert out.applications == 5.0 and out.stats["mean_token_loops"] == 5.0
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert out.extra_flops == 4 * model.strategy.head_flops(SEQ)


def test_inference_stops_early_and_matches_training_mode_output():
    model = halting_model(n_loops=6, init_bias=-1.0, head_std=0.5, seed=3)  # tokens halt at varied loops
    x = tokens(batch=4, rate=0.7, seed=3)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert train_out.applications == 6.0
    assert 1 <= eval_out.stats["mean_token_loops"] < eval_out.applications < 6  # some halted before others
    assert eval_out.stats["mean_token_loops"] == train_out.stats["mean_token_loops"]
    # halted tokens are frozen and get no more weight: the extra training loops change nothing
    assert torch.allclose(eval_out.logits, train_out.logits, atol=1e-5)
    assert eval_out.aux_loss is None


# ---- FLOPs ------------------------------------------------------------------------------------------
FLOP_CONFIGS = [
    dict(loop=(1, 3), n_loops=3),
    dict(loop=(0, 1), n_loops=5, head_std=1.0),
    dict(loop=(2, 4), n_loops=1),
    dict(loop=(0, 4), n_loops=2, d_model=64, n_heads=4, seq_len=48),
]


@pytest.mark.parametrize("cfg", FLOP_CONFIGS, ids=lambda c: f"{c['loop']}x{c['n_loops']}")
def test_training_step_flops_match_flop_counter(cfg):
    cfg = dict(cfg)
    seq_len = cfg.get("seq_len", SEQ)
    model = halting_model(**cfg).train()
    x = tokens(batch=3, seq_len=seq_len)
    out = {}

    def step(m, key):
        res = m(x)
        out[key] = res
        loss = res.logits.float().logsumexp(-1).sum()
        (loss if res.aux_loss is None else loss + res.aux_loss).backward()

    counted = measured(lambda: step(model, "halting"))
    res = out["halting"]
    n = cfg["n_loops"]
    assert res.applications == n and res.extra_flops == model.strategy.extra_flops_bound(n, seq_len)
    analytic = model.train_step_flops(seq_len, 3, res.applications, res.extra_flops)
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)
    # the halting head's share is exact: fixed with as many loops costs 3 * B * extra_flops less
    twin = fixed_twin(model, n).train()
    counted_fixed = measured(lambda: step(twin, "fixed"))
    assert counted - counted_fixed == 3 * 3 * res.extra_flops


@pytest.mark.parametrize("bias,expect_loops", [(20.0, 1), (-20.0, 4), (-0.7, None)])
def test_inference_flops_match_flop_counter(bias, expect_loops):
    model = halting_model(loop=(1, 3), n_loops=4, init_bias=bias, head_std=None if expect_loops else 0.3,
                          seed=3, seq_len=32).eval()
    x = tokens(batch=2, seq_len=32, rate=0.7, seed=3)
    out = {}
    with torch.no_grad():
        counted = measured(lambda: out.setdefault("r", model(x)))
    res = out["r"]
    if expect_loops is not None:
        assert res.applications == expect_loops
    else:  # tokens halted at different loops, and the batch stopped before the cap
        assert res.stats["mean_token_loops"] < res.applications < 4
    analytic = model.inference_flops_per_token(32, res.applications, res.extra_flops) * 32 * 2
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)
    # halted tokens are still computed: the block is charged for loops_run, for every token
    twin = fixed_twin(model, int(res.applications)).eval()
    with torch.no_grad():
        counted_fixed = measured(lambda: twin(x))
    assert counted - counted_fixed == 2 * res.extra_flops


# ---- search space and study -----------------------------------------------------------------------------
def test_search_space_loads():
    from loopsearch.search.space import check_space, load_space
    from loopsearch.spec import FloatRange, IntRange

    space = load_space("halting")
    assert space.strategies == ["halting"]
    assert space.strategy["halting"]["n_loops"] == IntRange(low=2, high=8)
    assert space.strategy["halting"]["ponder_cost"] == FloatRange(low=1e-3, high=1e-1, log=True)
    check_space(space, "transformer", {"n_layer": 4, "d_model": 32, "n_heads": 2}, "halting")


def test_tiny_study_trains_a_halting_trial(tiny_recipe):
    from optuna.trial import TrialState

    from loopsearch.search import study, workers

    spec = study.spec_from_options("halt", "halting", str(tiny_recipe), None, None, None, "random", None)
    study.create(spec)
    workers.run("halt", n_trials=2, progress=False)
    s, spec = study.load("halt")
    trials = [t for t in s.get_trials(deepcopy=False) if not t.user_attrs.get("loopsearch.baseline")]
    assert len(trials) == 1
    t = trials[0]
    assert t.state == TrialState.COMPLETE, t.user_attrs.get("rejected")
    assert t.user_attrs["strategy"] == "halting"
    assert math.isfinite(t.user_attrs["val_nll"])
    assert 0 < t.user_attrs["train_flops"] <= spec.budget
    assert 2 <= t.user_attrs["strategy_params"]["n_loops"] <= 8
