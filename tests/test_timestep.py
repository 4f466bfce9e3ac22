"""The ``timestep`` strategy: loop count as a function of the mask rate t.

Schedules stay in [min_loops, n_loops] and have the promised shape; a batch whose sequences
need different loop counts gives what each sequence gives alone; the FLOPs charged are what runs
(FlopCounterMode, forward + backward); t falls back to the masked share; a tiny study runs."""

import math

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_model
from loopsearch.looping import LoopContext, LoopedMDM
from loopsearch.registry import get_registry
from loopsearch_builtins.timestep import TimestepLoops, TimestepParams, loops_for_t
from loopsearch_builtins.transformer import Transformer, TransformerParams

SEQ = 16
LINEAR_1_4 = dict(schedule="linear", min_loops=1, n_loops=4)
# linear 1..4 gives every count a quarter of the t axis: these t need 1, 2, 3, 4, 4 loops
T_MIXED = torch.tensor([0.1, 0.3, 0.6, 0.9, 0.95])
COUNTS_MIXED = [1, 2, 3, 4, 4]


def timestep_model(loop_start=1, loop_end=3, seed=0, n_layer=4, d_model=32, **params) -> LoopedMDM:
    torch.manual_seed(seed)
    bb = Transformer(TransformerParams(n_layer=n_layer, d_model=d_model, n_heads=2), 50, SEQ)
    return LoopedMDM(bb, TimestepLoops(TimestepParams(**params), d_model), loop_start, loop_end)


def reference_logits(model: LoopedMDM, x: torch.Tensor, loops: int) -> torch.Tensor:
    """The looped model run by hand on its own: prelude, block ``loops`` times, coda, head."""
    b = model.backbone
    h = model.run_range(b.embed(x), 0, model.loop_start)
    for _ in range(loops):
        h = model.run_range(h, model.loop_start, model.loop_end)
    return b.head(model.run_range(h, model.loop_end, b.n_layer))


def block_rows(model: LoopedMDM) -> list[int]:
    """Rows (sequences) that enter the loop block's first layer, one entry per call."""
    rows: list[int] = []
    model.backbone.blocks[model.loop_start].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows


# ---- the schedules ---------------------------------------------------------------------------
params_st = st.builds(
    TimestepParams,
    schedule=st.sampled_from(["constant", "linear", "step", "middle"]),
    min_loops=st.integers(1, 64), n_loops=st.integers(1, 64), increasing=st.booleans(),
    threshold=st.floats(0.0, 1.0), width=st.floats(0.01, 1.0),
)
ts_st = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(p=params_st, ts=ts_st)
def test_every_schedule_stays_within_bounds(p, ts):
    assert 1 <= p.min_loops <= p.n_loops <= 64  # min > max was swapped, never rejected
    loops = loops_for_t(torch.tensor(ts, dtype=torch.float64), p)
    assert loops.dtype == torch.long and loops.shape == (len(ts),)
    assert int(loops.min()) >= p.min_loops and int(loops.max()) <= p.n_loops
    assert p.min_loops <= TimestepLoops(p, 8).expected_train_loops() <= p.n_loops


@settings(max_examples=100, deadline=None)
@given(lo=st.integers(1, 64), hi=st.integers(1, 64), increasing=st.booleans(), ts=ts_st)
def test_linear_is_monotone_and_reaches_both_ends(lo, hi, increasing, ts):
    p = TimestepParams(schedule="linear", min_loops=lo, n_loops=hi, increasing=increasing)
    lo, hi = min(lo, hi), max(lo, hi)
    t = torch.tensor(sorted(ts + [0.0, 1.0]), dtype=torch.float64)
    loops = loops_for_t(t, p)
    diffs = loops.diff()
    assert bool((diffs >= 0).all()) if increasing else bool((diffs <= 0).all())
    assert sorted([int(loops[0]), int(loops[-1])]) == [lo, hi]


@settings(max_examples=100, deadline=None)
@given(lo=st.integers(1, 20), span=st.integers(1, 20), width=st.floats(0.05, 1.0), ts=ts_st)
def test_middle_peaks_at_half(lo, span, width, ts):
    hi = lo + span
    p = TimestepParams(schedule="middle", min_loops=lo, n_loops=hi, width=width)
    assert int(loops_for_t(torch.tensor([0.5]), p)) == hi
    left = torch.tensor(sorted(t * 0.5 for t in ts) + [0.5], dtype=torch.float64)
    right = torch.tensor([0.5] + sorted(0.5 + t * 0.5 for t in ts), dtype=torch.float64)
    assert bool((loops_for_t(left, p).diff() >= 0).all())  # rises up to t = 0.5
    assert bool((loops_for_t(right, p).diff() <= 0).all())  # falls after it
    if width < 0.99:  # the ends lie outside the tent
        assert loops_for_t(torch.tensor([0.0, 1.0]), p).tolist() == [lo, lo]


def test_step_and_constant_values():
    step = TimestepParams(schedule="step", min_loops=2, n_loops=5, threshold=0.3)
    assert loops_for_t(torch.tensor([0.0, 0.3, 0.31, 1.0], dtype=torch.float64), step).tolist() == [2, 2, 5, 5]
    down = step.model_copy(update={"increasing": False})
    assert loops_for_t(torch.tensor([0.0, 0.3, 0.31, 1.0], dtype=torch.float64), down).tolist() == [5, 5, 2, 2]
    const = TimestepParams(schedule="constant", min_loops=2, n_loops=5)
    assert loops_for_t(torch.rand(7), const).tolist() == [5] * 7
    assert loops_for_t(T_MIXED, TimestepParams(**LINEAR_1_4)).tolist() == COUNTS_MIXED


@pytest.mark.parametrize("lo,hi", [(1, 4), (2, 2), (3, 8), (1, 64)])
@pytest.mark.parametrize("width", [0.2, 0.6, 1.0])
def test_expected_loops_are_the_mean_over_uniform_t(lo, hi, width):
    """Closed forms: linear (lo + hi) / 2; step lo*thr + hi*(1 - thr); middle (a tent of width w)
    lo + sum_{j=1..span} w (1 - j / (span + 1)); constant hi."""
    s = lambda **kw: TimestepLoops(TimestepParams(min_loops=lo, n_loops=hi, **kw), 8)  # noqa: E731
    span, n = hi - lo, hi - lo + 1
    assert s(schedule="linear").expected_train_loops() == pytest.approx((lo + hi) / 2, abs=1e-3)
    assert s(schedule="linear", increasing=False).expected_train_loops() == pytest.approx((lo + hi) / 2, abs=1e-3)
    assert s(schedule="step", threshold=0.3).expected_train_loops() == pytest.approx(0.3 * lo + 0.7 * hi, abs=1e-2)
    middle = lo + sum(width * (1 - j / n) for j in range(1, span + 1))
    assert s(schedule="middle", width=width).expected_train_loops() == pytest.approx(middle, abs=2e-2)
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
    shares = torch.bincount(loops_for_t(grid, TimestepParams(schedule="linear", min_loops=lo, n_loops=hi)) - lo)
    equal = torch.full((n,), 1 / n, dtype=torch.float64)
    assert torch.allclose(shares.double() / 10_000, equal, atol=1e-3)  # every count gets an equal share of t
    const = s(schedule="constant")
    assert const.expected_train_loops() == hi
    for strategy in (const, s(schedule="middle", width=width)):
        assert strategy.train_loops(torch.Generator()) == strategy.max_train_loops() == strategy.eval_loops() == hi


def test_min_above_max_is_swapped_and_params_are_validated():
    p = TimestepParams(schedule="linear", min_loops=3, n_loops=2)
    assert (p.min_loops, p.n_loops) == (2, 3)
    for bad in ({"n_loops": 65}, {"min_loops": 0}, {"width": 0.0}, {"threshold": 1.5}, {"loops": 2}):
        with pytest.raises(ValueError):
            TimestepParams(**bad)
    assert get_registry().get("loop_strategy", "timestep") is TimestepLoops


# ---- running a batch with mixed loop counts -----------------------------------------------------
def test_grouped_batch_equals_each_sequence_alone():
    model = timestep_model(**LINEAR_1_4)
    x = torch.randint(0, 51, (5, SEQ))
    rows = block_rows(model)
    out = model(x, t=T_MIXED)
    assert sum(rows) == sum(COUNTS_MIXED)  # each sequence entered the block exactly its own count
    assert out.applications == pytest.approx(sum(COUNTS_MIXED) / 5)
    assert out.stats == {"mean_loops": pytest.approx(2.8), "max_loops": 4.0}
    for i, k in enumerate(COUNTS_MIXED):
        alone = reference_logits(model, x[i:i + 1], k)
        assert torch.allclose(out.logits[i:i + 1], alone, atol=1e-5), i
        assert torch.allclose(model(x[i:i + 1], t=T_MIXED[i:i + 1]).logits, alone, atol=1e-5), i


def test_grouped_gradients_equal_per_sequence_gradients():
    model = timestep_model(**LINEAR_1_4)
    x = torch.randint(0, 51, (5, SEQ))
    model(x, t=T_MIXED).logits.float().logsumexp(-1).sum().backward()
    grouped = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for i, k in enumerate(COUNTS_MIXED):
        reference_logits(model, x[i:i + 1], k).float().logsumexp(-1).sum().backward()
    for g, p in zip(grouped, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4, rtol=1e-4)


def test_explicit_n_loops_caps_every_sequence():
    model = timestep_model(**LINEAR_1_4)
    x = torch.randint(0, 51, (5, SEQ))
    rows = block_rows(model)
    out = model(x, n_loops=2, t=T_MIXED)
    capped = [min(k, 2) for k in COUNTS_MIXED]
    assert sum(rows) == sum(capped) and out.applications == pytest.approx(sum(capped) / 5)
    for i, k in enumerate(capped):
        assert torch.allclose(out.logits[i:i + 1], reference_logits(model, x[i:i + 1], k), atol=1e-5)


def test_t_is_estimated_from_masks_when_not_given():
    model = timestep_model(**LINEAR_1_4)
    mask = model.backbone.mask_id
    x = torch.randint(0, 50, (3, SEQ))
    x[0, :2] = mask  # t = 2/16  -> 1 loop
    x[1, :8] = mask  # t = 8/16  -> 3 loops
    x[2, :15] = mask  # t = 15/16 -> 4 loops
    rows = block_rows(model)
    out = model(x)
    assert sum(rows) == 8 and out.applications == pytest.approx(8 / 3)
    given_t = model(x, t=torch.tensor([2 / 16, 8 / 16, 15 / 16]))
    assert torch.allclose(out.logits, given_t.logits, atol=1e-6)
    for i, k in enumerate([1, 3, 4]):
        assert torch.allclose(out.logits[i:i + 1], reference_logits(model, x[i:i + 1], k), atol=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "linear", "middle"])
def test_one_loop_equals_plain_model(schedule):
    plain = tiny_model(seed=3)
    looped = timestep_model(loop_start=1, loop_end=3, seed=3, schedule=schedule, min_loops=1, n_loops=1)
    looped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 51, (4, SEQ))
    out = looped(x, t=torch.tensor([0.05, 0.4, 0.5, 0.99]))
    assert out.applications == 1.0
    assert torch.equal(out.logits, plain(x).logits)


def test_exit_criterion_runs_to_the_batch_maximum():
    class Never:  # never says stop: the batch loops to its largest count
        def init(self, h):
            return None

        def check(self, h, new, state, ctx: LoopContext):
            return torch.zeros(h.shape[0], dtype=torch.bool), state, 7.0

    model = timestep_model(**LINEAR_1_4)
    x = torch.randint(0, 51, (3, SEQ))
    out = model(x, t=torch.tensor([0.1, 0.3, 0.6]), exit=Never())
    assert out.applications == 3.0 and out.extra_flops == 14.0  # checks after loops 1 and 2; none at the cap
    assert torch.allclose(out.logits, reference_logits(model, x, 3), atol=1e-6)


# ---- FLOPs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("params,block", [
    (LINEAR_1_4, (1, 3)),
    (dict(schedule="middle", min_loops=1, n_loops=6, width=0.8), (0, 2)),
    (dict(schedule="step", min_loops=2, n_loops=5, threshold=0.5, increasing=False), (2, 3)),
])
def test_training_step_flops_match_flop_counter(params, block):
    model = timestep_model(block[0], block[1], **params)
    x = torch.randint(0, 51, (5, SEQ))
    t = torch.tensor([0.05, 0.3, 0.5, 0.62, 0.97])
    counts = loops_for_t(t, model.strategy.params)
    assert len(set(counts.tolist())) > 1  # the batch really mixes loop counts
    out = {}

    def step():
        res = model(x, t=t)
        out["apps"] = res.applications
        res.logits.float().logsumexp(-1).sum().backward()

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    counted = counter.get_total_flops()
    assert out["apps"] == pytest.approx(counts.double().mean().item())
    analytic = model.train_step_flops(SEQ, batch_size=5, applications=out["apps"])
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)
    at_max = model.train_step_flops(SEQ, batch_size=5, applications=model.strategy.max_train_loops())
    assert counted < at_max * 0.98  # grouping runs less than looping the whole batch to the maximum


# ---- a study -----------------------------------------------------------------------------------
def test_tiny_study_with_timestep_space(tiny_recipe):
    from loopsearch.search import study, workers

    spec = study.spec_from_options("ts", "timestep", str(tiny_recipe), None, None, None, "random", None)
    assert spec.space.strategies == ["timestep"]
    study.create(spec)
    workers.run("ts", n_trials=2, progress=False)
    trials, _ = study.load("ts")
    searched = [t for t in trials.get_trials() if not t.user_attrs.get("loopsearch.baseline")]
    assert len(searched) == 1
    t = searched[0]
    assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs.get("rejected")
    assert t.user_attrs["strategy"] == "timestep"
    assert math.isfinite(t.user_attrs["val_nll"]) and math.isfinite(t.value)
    assert 0 < t.user_attrs["train_flops"] <= t.user_attrs["budget"] == spec.budget
    p = TimestepParams(**t.user_attrs["strategy_params"])
    assert p.min_loops <= t.user_attrs["mean_train_loops"] <= p.n_loops
