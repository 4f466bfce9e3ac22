"""Samplers (plugins/samplers.py) and the sampling core (loopsearch/sampling.py): invariants,
cache equivalence, loop schedules and what generation costs."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import tiny_model
from loopsearch.errors import LoopsearchError, SpecError, UnknownPluginError
from loopsearch.looping import ModelOutput
from loopsearch.registry import get_registry
from loopsearch.sampling import (Denoiser, LoopSchedule, generate, get_sampler, gumbel, make_init,
                                 parse_loop_schedule)

SAMPLERS = ["ancestral", "cached", "confidence", "threshold"]
VOCAB, T = 50, 16


def looped(n_loops=4, seed=0):
    return tiny_model(vocab=VOCAB, seq_len=T, loop=(1, 3, {"n_loops": n_loops, "train_loops": "uniform"}),
                      seed=seed).eval()


@pytest.fixture(scope="module")
def model():
    return looped()


def record_inputs(monkeypatch) -> list[torch.Tensor]:
    """Every input the denoiser is called with, in order."""
    seen, original = [], Denoiser.__call__

    def spy(self, x, step, steps, rows=None):
        seen.append(x.clone())
        return original(self, x, step, steps, rows)

    monkeypatch.setattr(Denoiser, "__call__", spy)
    return seen


def test_builtin_samplers_are_registered_plugins():
    items = get_registry().items("sampler")
    assert set(SAMPLERS) <= set(items)
    assert {items[n].distribution for n in SAMPLERS} == {"loopsearch"}
    with pytest.raises(UnknownPluginError, match="available: ancestral, cached, confidence, threshold"):
        get_sampler("nope")
    with pytest.raises(SpecError, match="bad parameters for sampler 'threshold'.*accepted: threshold"):
        get_sampler("threshold", {"threshold": 2.0})


@pytest.mark.parametrize("name", SAMPLERS)
def test_no_mask_left_and_prompt_preserved_exactly(model, name):
    mask = model.backbone.mask_id
    init = make_init(3, T, mask, prefix=[5, 6, 7], suffix=[8, 9])
    res = generate(model, init, sampler=name, steps=8, seed=1)
    assert not (res.tokens == mask).any()
    assert res.tokens[:, :3].tolist() == [[5, 6, 7]] * 3
    assert res.tokens[:, -2:].tolist() == [[8, 9]] * 3
    assert res.tokens.shape == (3, T) and res.tokens.max() < mask
    assert res.cost.generated_tokens == 3 * (T - 5) and 1 <= res.cost.network_calls <= 8


@pytest.mark.parametrize("name", SAMPLERS)
def test_committed_tokens_never_change(model, monkeypatch, name):
    mask = model.backbone.mask_id
    seen = record_inputs(monkeypatch)
    res = generate(model, make_init(4, T, mask, prefix=[1]), sampler=name, steps=10, seed=3)
    states = [*seen, res.tokens]
    assert len(states) > 2
    for before, after in zip(states, states[1:]):
        done = before != mask
        assert torch.equal(after[done], before[done])
        assert (after != mask).sum() >= (before != mask).sum()


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_samples_other_seed_other_samples(model, name):
    init = make_init(4, T, model.backbone.mask_id)
    params = {"temperature": 1.0} if name in ("confidence", "threshold") else None  # greedy by default
    a = generate(model, init, sampler=name, steps=8, seed=7, params=params).tokens
    assert torch.equal(a, generate(model, init, sampler=name, steps=8, seed=7, params=params).tokens)
    assert not torch.equal(a, generate(model, init, sampler=name, steps=8, seed=8, params=params).tokens)


@pytest.mark.parametrize("loops", [None, "decreasing:1-4", "middle:1-4@mask_rate"])
def test_cached_equals_ancestral_with_fewer_calls(model, loops):
    init = make_init(4, T, model.backbone.mask_id, prefix=[3])
    anc = generate(model, init, sampler="ancestral", steps=64, seed=11, loops=loops)
    cac = generate(model, init, sampler="cached", steps=64, seed=11, loops=loops)
    assert torch.equal(anc.tokens, cac.tokens)  # a cache that outlived a loop-count change would differ
    assert cac.cost.network_calls < anc.cost.network_calls  # 64 steps for 15 tokens: most change nothing
    assert cac.cost.network_calls + cac.cost.cached_calls == anc.cost.network_calls
    assert cac.cost.flops < anc.cost.flops


def test_cached_runs_only_the_sequences_that_changed(model):
    """With many sequences some token changes at almost every step; the cache is per sequence,
    so the saving survives a large batch."""
    init = make_init(32, T, model.backbone.mask_id)
    anc = generate(model, init, sampler="ancestral", steps=64, seed=5)
    cac = generate(model, init, sampler="cached", steps=64, seed=5)
    assert torch.equal(anc.tokens, cac.tokens)
    assert anc.cost.sequence_calls == 32 * anc.cost.network_calls
    assert cac.cost.sequence_calls < 0.5 * anc.cost.sequence_calls  # 16 tokens over 64 steps: most rows idle
    assert cac.cost.flops == pytest.approx(anc.cost.flops * cac.cost.sequence_calls / anc.cost.sequence_calls)


def test_cached_calls_again_when_the_loop_count_changes(model):
    """With a step schedule, every step whose loop count differs from the cached call's is a fresh call."""
    init = make_init(2, T, model.backbone.mask_id)
    res = generate(model, init, sampler="cached", steps=64, seed=0, loops="decreasing:1-4")
    sched = LoopSchedule(kind="decreasing", min_loops=1, max_loops=4)
    distinct = {sched.loops_at(i / 63, 4) for i in range(64)}
    assert set(res.cost.loops_per_call) == distinct  # every level of the schedule ran at least once


class ConstantModel(nn.Module):
    """A denoiser whose prediction p(x_0) is the same distribution everywhere."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.logits = torch.cat((probs.log(), torch.tensor([0.0])))  # + a MASK logit (dropped by SUBS)
        self.backbone = SimpleNamespace(mask_id=len(probs), n_tokens=len(probs) + 1)
        self.strategy = SimpleNamespace(loops_block=False, eval_loops=lambda: 1)

    def forward(self, x, n_loops=None, t=None, exit=None):
        return ModelOutput(self.logits.expand(*x.shape, -1).clone(), 1.0)

    def inference_flops_per_token(self, seq_len, applications=None, extra_flops=None):
        return 10.0


@pytest.mark.parametrize("name, params", [("ancestral", None), ("cached", None),
                                          ("confidence", {"remasking": "random", "temperature": 1.0})])
def test_samples_follow_the_model_distribution(name, params):
    """Under a constant p(x_0), samplers that reveal tokens as draws from p at random positions
    produce tokens with frequencies p."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    m = ConstantModel(probs)
    res = generate(m, make_init(64, 32, m.backbone.mask_id), sampler=name, params=params, steps=8, seed=0)
    freq = torch.bincount(res.tokens.flatten(), minlength=4).double() / res.tokens.numel()
    assert torch.allclose(freq, probs, atol=0.02), freq  # 2048 draws: 3 sigma is about 0.033 at p=0.5
    assert res.cost.flops == 10.0 * 32 * res.cost.sequence_calls  # 10 FLOPs per token, 32 tokens per sequence


def test_low_confidence_remasking_favours_the_mode():
    """LLaDA's low-confidence remasking commits the most confident draws first, so the mode is
    over-represented (a known bias of confidence-ordered decoding, not a bug)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    m = ConstantModel(probs)
    res = generate(m, make_init(64, 32, m.backbone.mask_id), sampler="confidence", steps=8, seed=0,
                   params={"temperature": 1.0})
    assert (res.tokens == 0).double().mean() > 0.6


@pytest.mark.parametrize("sampler", ["confidence", "threshold"])
def test_greedy_is_the_default_of_confidence_and_threshold(sampler):
    """LLaDA and Fast-dLLM decode greedily (temperature 0): the default commits the argmax."""
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    m = ConstantModel(probs)
    res = generate(m, make_init(2, 8, m.backbone.mask_id), sampler=sampler, steps=4, seed=0)
    assert (res.tokens == 1).all()
    sampled = generate(m, make_init(2, 8, m.backbone.mask_id), sampler=sampler, steps=4, seed=0,
                       params={"temperature": 1.0})
    assert not (sampled.tokens == 1).all()


def test_confidence_commits_a_fixed_number_per_step_and_fills_blocks_left_to_right(model, monkeypatch):
    mask = model.backbone.mask_id
    seen = record_inputs(monkeypatch)
    res = generate(model, make_init(2, T, mask), sampler="confidence", steps=8, seed=0,
                   params={"block_length": 4})
    states = [*seen, res.tokens]
    committed = [int((b == mask).sum() - (a == mask).sum()) for b, a in zip(states, states[1:])]
    assert committed == [2 * 2] * 8  # 16 tokens, 8 steps, 2 rows: 2 per row per step
    for x in seen:
        filled = (x != mask).view(2, 4, 4)  # (rows, blocks, positions)
        started = filled.any(dim=2)
        complete = filled.all(dim=2)
        for blk in range(1, 4):  # a block starts only once every block to its left is complete
            assert not (started[:, blk] & ~complete[:, :blk].all(dim=1)).any()


def test_threshold_commits_everything_confident_and_at_most_steps_calls():
    probs = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64)
    m = ConstantModel(probs)
    init = make_init(2, 12, m.backbone.mask_id)
    sure = generate(m, init, sampler="threshold", steps=12, params={"threshold": 0.9, "temperature": 0})
    assert sure.cost.network_calls == 1 and (sure.tokens == 0).all()  # all above threshold: one call
    unsure = generate(m, init, sampler="threshold", steps=6, params={"threshold": 0.99, "temperature": 0})
    assert unsure.cost.network_calls == 6  # nothing above threshold: the quota finishes within the steps


def test_flops_follow_the_loops_that_ran(model):
    init = make_init(2, T, model.backbone.mask_id)
    const = generate(model, init, sampler="confidence", steps=8, loops="constant:4")
    per_call = model.inference_flops_per_token(T, 4.0, 0.0) * T * 2
    assert const.cost.loops_per_call == [4.0] * 8
    assert const.cost.flops == pytest.approx(per_call * 8)
    dec = generate(model, init, sampler="confidence", steps=8, loops="decreasing:1-4")
    assert dec.cost.loops_per_call == [LoopSchedule(kind="decreasing", max_loops=4).loops_at(i / 7, 4)
                                       for i in range(8)]
    expected = sum(model.inference_flops_per_token(T, a, 0.0) * T * 2 for a in dec.cost.loops_per_call)
    assert dec.cost.flops == pytest.approx(expected) and dec.cost.flops < const.cost.flops
    assert dec.cost.flops_per_token == pytest.approx(dec.cost.flops / (2 * T))
    d = dec.cost.as_dict()
    assert {"network_calls", "loop_iterations", "flops", "flops_per_token", "wall_s", "tokens_per_s"} <= set(d)


def test_exit_criterion_cuts_loops_and_flops(model):
    init = make_init(2, T, model.backbone.mask_id)
    full = generate(model, init, sampler="confidence", steps=4, loops="constant:6")
    early = generate(model, init, sampler="confidence", steps=4, loops="constant:6",
                     exit=("hidden_delta", {"tol": 10.0}))
    assert full.cost.loops_per_call == [6.0] * 4
    assert early.cost.loops_per_call == [1.0] * 4  # a huge tolerance stops after the first loop
    assert early.cost.flops < full.cost.flops
    with pytest.raises(LoopsearchError, match="unknown exit criterion"):
        generate(model, init, exit=("nope", {}))


def test_model_schedule_uses_the_other_model_for_its_steps(model):
    plain = tiny_model(vocab=VOCAB, seq_len=T, seed=1).eval()
    init = make_init(2, T, model.backbone.mask_id)
    res = generate(model, init, sampler="confidence", steps=8, models=[(0.0, 0.5, plain)])
    assert res.cost.loops_per_call == [1.0] * 4 + [4.0] * 4
    assert res.cost.flops == pytest.approx(2 * T * (4 * plain.inference_flops_per_token(T)
                                                    + 4 * model.inference_flops_per_token(T)))
    other = tiny_model(vocab=VOCAB + 1, seq_len=T).eval()
    with pytest.raises(LoopsearchError, match="mixes vocabularies"):
        generate(model, init, models=[(0.0, 0.5, other)])


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["constant", "decreasing", "increasing", "middle"]), lo=st.integers(1, 8),
       span=st.integers(0, 8), x=st.floats(0, 1), default=st.integers(1, 12))
def test_loop_schedules_stay_within_their_bounds(kind, lo, span, x, default):
    s = LoopSchedule(kind=kind, min_loops=lo, max_loops=lo + span)
    assert lo <= s.loops_at(x, default) <= lo + span
    auto = LoopSchedule(kind=kind, min_loops=lo)  # max_loops = the model's own count
    assert min(lo, default) <= auto.loops_at(x, default) <= default


def test_loop_schedule_shapes():
    dec, inc, mid = (LoopSchedule(kind=k, min_loops=1, max_loops=8) for k in ("decreasing", "increasing", "middle"))
    xs = [i / 20 for i in range(21)]
    assert [dec.loops_at(x, 1) for x in xs] == sorted((dec.loops_at(x, 1) for x in xs), reverse=True)
    assert [inc.loops_at(x, 1) for x in xs] == sorted(inc.loops_at(x, 1) for x in xs)
    assert mid.loops_at(0.5, 1) == 8 and mid.loops_at(0, 1) == mid.loops_at(1, 1) == 1
    assert LoopSchedule().loops_at(0.3, 5) == 5  # the default: the model's own count at every step


@pytest.mark.parametrize("text, kind, lo, hi, by", [
    ("4", "constant", 1, 4, "step"), ("constant:3", "constant", 1, 3, "step"),
    ("decreasing:1-8", "decreasing", 1, 8, "step"), ("middle:2-6@mask_rate", "middle", 2, 6, "mask_rate")])
def test_parse_loop_schedule(text, kind, lo, hi, by):
    s = parse_loop_schedule(text)
    assert (s.kind, s.min_loops, s.max_loops, s.by) == (kind, lo, hi, by)
    assert parse_loop_schedule(s.label()) == s


@pytest.mark.parametrize("text", ["wobbly:1-2", "decreasing:8-1", "constant:1-2", "middle:x-2", "middle:1-2@time"])
def test_bad_loop_schedule_is_a_one_line_error(text):
    with pytest.raises(SpecError, match=r"cannot read loop schedule .*; write N, constant:N") as err:
        parse_loop_schedule(text)
    assert "\n" not in str(err.value)


def test_gumbel_noise_is_float64_and_seeded():
    g = gumbel((3, 4), torch.Generator().manual_seed(0), "cpu")
    assert g.dtype == torch.float64
    assert torch.equal(g, gumbel((3, 4), torch.Generator().manual_seed(0), "cpu"))


def test_prompt_that_fills_the_sequence_is_an_error():
    with pytest.raises(LoopsearchError, match="leaves nothing to generate"):
        make_init(1, 4, 99, prefix=[1, 2, 3, 4])


def test_readme_sampler_example_works():
    """The plugin guide's sampler, exactly as printed in docs/plugins.md."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    start = readme.index("import torch\nfrom loopsearch import hookimpl\nfrom loopsearch.sampling import Sampler")
    code = readme[start:readme.index("```", start)]
    ns: dict = {}
    exec(code, ns)
    assert ns["register_samplers"]() == [ns["LeftToRight"]]
    m = tiny_model(vocab=VOCAB, seq_len=T).eval()
    res = generate(m, make_init(2, T, m.backbone.mask_id, prefix=[1, 2]), sampler=ns["LeftToRight"](None), steps=14)
    assert res.cost.network_calls == 14 and res.tokens[:, :2].tolist() == [[1, 2], [1, 2]]
