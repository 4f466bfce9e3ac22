"""Strategy API v2 (issue 16): forward-only loops charged 1x, the seeded generator in LoopContext,
run_with_exit without a criterion, and the fixed strategy's loop-count distributions."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_model
from loopsearch.data import PreparedData
from loopsearch.looping import LoopContext, LoopedMDM, LoopResult, LoopStrategy, run_with_exit
from loopsearch.spec import TrainConfig
from loopsearch.train import plan_steps, train
from loopsearch_builtins.strategies import FixedParams


class Truncated(LoopStrategy):
    """Recurrent depth with truncated backprop: the state starts from noise drawn from
    ctx.generator, the input is injected before every loop (so the prelude still gets gradients
    through the last loops), the block runs n times, only the last ``k`` with gradients."""

    name = "truncated_test"
    k = 2

    def train_loops(self, generator):
        return 4

    def max_train_loops(self):
        return 4

    def expected_train_loops(self):
        return 4.0

    def expected_forward_only(self):
        return 2.0

    def eval_loops(self):
        return 4

    def run(self, h, block, n_loops, ctx: LoopContext) -> LoopResult:
        noise = torch.randn(h.shape, generator=ctx.generator).to(h)
        s = 0.1 * noise
        free = max(0, n_loops - self.k) if ctx.training else 0
        with torch.no_grad():
            for _ in range(free):
                s = block(s + h)
        for _ in range(n_loops - free):
            s = block(s + h)
        return LoopResult(s, float(n_loops), forward_only=float(free))


def truncated_model(seed=0):
    bb = tiny_model(seed=seed, seq_len=16).backbone
    return LoopedMDM(bb, Truncated(Truncated.Params(), bb.d_model), 1, 3)


def check_truncated_step_flops(model) -> float:
    """One training step with 4 loops (2 forward-only) under FlopCounterMode; the analytic charge
    must match what ran within 2%. Returns the analytic FLOPs."""
    x = torch.randint(0, 49, (3, 16))
    got = {}

    def step():
        out = model(x, 4, generator=torch.Generator().manual_seed(0))
        got["out"] = out
        out.logits.float().logsumexp(-1).sum().backward()

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    out = got["out"]
    assert out.applications == 4.0 and out.forward_only == 2.0
    analytic = model.train_step_flops(16, 3, out.applications, out.extra_flops, forward_only=out.forward_only)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.02
    return analytic


def test_forward_only_loops_are_charged_once_and_match_the_flop_counter():
    model = truncated_model().train()
    analytic = check_truncated_step_flops(model)
    assert analytic < model.train_step_flops(16, 3, 4.0)  # full backprop through 4 loops costs more


def test_planning_and_the_real_loop_count_with_truncation():
    ids = torch.randint(0, 49, (4000,))
    data = PreparedData(ids, ids[:600].clone(), "", 49, "random")
    cfg = TrainConfig(batch_size=4, seq_len=16, min_steps=1, eval_sequences=8, eval_curve_sequences=8,
                      eval_points=1, precision="fp32", compile=False)
    model = truncated_model()
    planned = plan_steps(model, cfg, 3e8)
    r = train(model, data, cfg, 3e8, seed=0, progress=False)
    assert r.mean_train_loops == 4.0  # the real count, forward-only loops included
    assert abs(r.steps - planned) <= 1  # planning charged the forward-only loops 1x, as the trainer does


def test_a_strategy_drawing_from_ctx_is_deterministic_under_a_seed():
    ids = torch.randint(0, 49, (4000,), generator=torch.Generator().manual_seed(1))
    data = PreparedData(ids, ids[:600].clone(), "", 49, "random")
    cfg = TrainConfig(batch_size=4, seq_len=16, min_steps=1, eval_sequences=8, eval_curve_sequences=8,
                      eval_points=1, precision="fp32", compile=False)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)  # the same initial weights; only the trainer's streams differ with the seed
        runs.append(train(truncated_model(), data, cfg, 2e8, seed=seed, progress=False))
    assert runs[0].final_loss == runs[1].final_loss and runs[0].val_nll == runs[1].val_nll
    assert runs[0].final_loss != runs[2].final_loss


def test_run_with_exit_simply_loops_without_a_criterion():
    h = torch.zeros(2, 4, 8)
    res = run_with_exit(h, lambda x: x + 1, 5, LoopContext())
    assert res.applications == 5.0 and torch.equal(res.h, torch.full_like(h, 5.0))


def _fixed(n, kind, **kw):
    model = tiny_model(loop=(1, 3, {"n_loops": n, "train_loops": kind, **kw}), seq_len=16)
    return model, model.strategy


def test_flop_proportional_draws_give_each_count_an_equal_share_of_the_compute():
    model, s = _fixed(4, "flop_proportional")
    cost = torch.tensor([model.forward_flops(k) for k in range(1, 5)], dtype=torch.float64)
    p = s.probabilities()
    assert torch.allclose(p, (1 / cost) / (1 / cost).sum())
    assert torch.allclose(p * cost, (p * cost)[0].expand(4))  # p(S) * FLOPs(S) is the same for every S
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([s.train_loops(g) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=5)[1:].double() / len(draws)
    assert torch.allclose(freq, p, atol=0.015)
    assert abs(float(draws.double().mean()) - s.expected_train_loops()) < 0.03


def test_lognormal_poisson_draws_are_capped_and_match_their_expectation():
    _, s = _fixed(6, "lognormal_poisson", mean_loops=3.0, sigma=0.5)
    g = torch.Generator().manual_seed(7)
    draws = torch.tensor([s.train_loops(g) for _ in range(20000)])
    assert int(draws.min()) >= 1 and int(draws.max()) <= 6
    assert abs(float(draws.double().mean()) - s.expected_train_loops()) < 0.05
    assert 2.5 < s.expected_train_loops() < 3.0  # the cap at 6 trims the mean of 3 a little
    assert s.max_train_loops() == 6 and FixedParams(train_loops="lognormal_poisson").sigma == 0.5


def test_the_plugin_guide_v2_example_runs_as_printed():
    """docs/plugins.md's complete v2 strategy, exactly as printed: truncated loops are charged once
    (FlopCounterMode agrees), planning predicts the steps, and a seed reproduces its noise."""
    from pathlib import Path

    guide = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    start = guide.rindex("```python\n", 0, guide.index("class NoisyRecurrenceParams")) + len("```python\n")
    ns: dict = {}
    exec(guide[start:guide.index("```", start)], ns)
    cls = ns["NoisyRecurrence"]
    assert ns["register_loop_strategies"]() == [cls]
    bb = tiny_model(seed=0, seq_len=16).backbone
    model = LoopedMDM(bb, cls(cls.Params(), bb.d_model), 1, 3).train()
    check_truncated_step_flops(model)
    ids = torch.randint(0, 49, (4000,))
    data = PreparedData(ids, ids[:600].clone(), "", 49, "random")
    cfg = TrainConfig(batch_size=4, seq_len=16, min_steps=1, eval_sequences=8, eval_curve_sequences=8,
                      eval_points=1, precision="fp32", compile=False)
    planned = plan_steps(model, cfg, 3e8)
    runs = []
    for seed in (5, 5):
        fresh = tiny_model(seed=0, seq_len=16).backbone
        runs.append(train(LoopedMDM(fresh, cls(cls.Params(), fresh.d_model), 1, 3), data, cfg, 3e8, seed=seed,
                          progress=False))
    assert abs(runs[0].steps - planned) <= 1 and runs[0].mean_train_loops == 4.0
    assert runs[0].final_loss == runs[1].final_loss
