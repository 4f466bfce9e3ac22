"""The builtin ``recurrent`` strategy (issue 16 item 4): Huginn-style recurrent depth with a
noise-initialised state, input injection every loop and truncated backprop charged as
forward-only loops. Its conformance suites are in test_conformance.py (FLOPs against
FlopCounterMode with truncation on and off)."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import random_data, tiny_model, tiny_train_config
from loopsearch.looping import LoopContext, LoopedMDM
from loopsearch.search.space import load_space
from loopsearch.train import plan_steps, train
from loopsearch_builtins.recurrent import RecurrentDepth, RecurrentParams


def recurrent_model(seed=0, **params):
    bb = tiny_model(seed=seed, seq_len=16).backbone
    torch.manual_seed(seed)
    return LoopedMDM(bb, RecurrentDepth(RecurrentParams(**params), bb.d_model), 1, 3)


data = random_data
CFG = tiny_train_config()


def counted_step(model, n):
    x = torch.randint(0, 49, (3, 16), generator=torch.Generator().manual_seed(1))
    got = {}

    def step():
        out = model(x, n, generator=torch.Generator().manual_seed(0))
        got["out"] = out
        out.logits.float().logsumexp(-1).sum().backward()

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    out = got["out"]
    return counter.get_total_flops(), out, model.train_step_flops(16, 3, out.applications, out.extra_flops,
                                                                   forward_only=out.forward_only)


def test_truncation_charges_the_no_grad_loops_once_with_the_adapter():
    full_counted, full, full_analytic = counted_step(recurrent_model(n_loops=5, backprop_loops=8).train(), 5)
    cut_counted, cut, cut_analytic = counted_step(recurrent_model(n_loops=5, backprop_loops=2).train(), 5)
    assert full.forward_only == 0.0 and cut.forward_only == 3.0 and cut.applications == full.applications == 5.0
    for analytic, counted in ((full_analytic, full_counted), (cut_analytic, cut_counted)):
        assert abs(analytic - counted) / counted < 0.02
    assert cut_counted < full_counted  # three loops ran without backward


def test_planning_predicts_the_steps_and_mean_train_loops_is_the_real_count():
    model = recurrent_model(n_loops=4, train_loops="constant", backprop_loops=1)
    planned = plan_steps(model, CFG, 3e8)
    r = train(model, data(), CFG, 3e8, seed=0, progress=False)
    assert r.mean_train_loops == 4.0  # forward-only loops included
    assert abs(r.steps - planned) <= 1


def test_lognormal_draws_with_truncation_plan_the_mean_step():
    model = recurrent_model(n_loops=6, mean_loops=3.0, backprop_loops=2)
    planned = plan_steps(model, CFG, 6e8)
    r = train(model, data(), CFG, 6e8, seed=0, progress=False)
    assert abs(r.mean_train_loops - model.strategy.expected_train_loops()) < 0.35  # ~100 random draws
    assert abs(r.steps - planned) / planned < 0.1


def test_the_state_starts_from_noise_drawn_from_the_context_generator():
    model = recurrent_model(n_loops=2).eval()
    x = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(x, generator=torch.Generator().manual_seed(5)).logits
        b = model(x, generator=torch.Generator().manual_seed(5)).logits
        c = model(x, generator=torch.Generator().manual_seed(6)).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    quiet = recurrent_model(n_loops=2, init_std=0.0).eval()
    with torch.no_grad():
        assert torch.equal(quiet(x, generator=torch.Generator().manual_seed(5)).logits,
                           quiet(x, generator=torch.Generator().manual_seed(6)).logits)


def test_the_strategies_v2_space_searches_every_strategy():
    space = load_space("strategies_v2")
    assert set(space.strategies) == {"none", "fixed", "halting", "timestep", "recurrent", "exit_gate", "router"}


def test_the_adapter_keeps_the_residual_stream_in_its_dtype_under_bf16_autocast():
    """A bf16 matmul output fed back as the state would turn the residual stream bf16 (precision lost,
    RMSNorm's fused kernel refused with a warning): the adapter's output is cast back."""
    model = recurrent_model(n_loops=3, init_std=0.5).train()
    h = torch.randn(2, 16, model.backbone.d_model)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.strategy.run(h, lambda s: seen.append(s.dtype) or s * 1.0, 3,
                                 LoopContext(generator=torch.Generator().manual_seed(0)))
    assert seen == [torch.float32] * 3 and out.h.dtype == torch.float32
