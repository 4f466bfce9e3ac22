"""The builtin ``exit_gate`` (Ouro-style learned exit) and ``router`` (Mixture-of-Recursions token
routing) strategies, issue 16 item 4. Their conformance suites (FLOPs against FlopCounterMode in
training and inference, determinism, gradients, planning means) are in test_conformance.py; these
tests check what is particular to each: the training objective, the exit rule, the routing and the
planned step count."""

import pytest
import torch

from helpers import random_data, tiny_model, tiny_train_config
from loopsearch.diffusion import diffusion_loss, elbo, mask_tokens, masked_nll, sample_t
from loopsearch.errors import SpecError
from loopsearch.looping import LoopedMDM
from loopsearch.train import plan_steps, train
from loopsearch_builtins.exit_gate import ExitGate, ExitGateParams
from loopsearch_builtins.router import Router, RouterParams


def looped(cls, params_cls, seed=0, **params):
    bb = tiny_model(seed=seed, seq_len=16).backbone
    torch.manual_seed(seed + 1)
    return LoopedMDM(bb, cls(params_cls(**params), bb.d_model), 1, 3)


data = random_data
CFG = tiny_train_config()


# ---- exit_gate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", [False, True])
def test_exit_gate_trains_the_expected_loss_over_exits_minus_the_entropy_bonus(positions):
    """diffusion_loss of the strategy equals sum_k p_k L_k - beta H(p), written out here loop by loop,
    in value and in the gate's gradient (the last exit's weight carries it too), with the head on
    every position or only where the loss is (as the trainer runs it)."""
    model = looped(ExitGate, ExitGateParams, n_loops=3, beta=0.2, init_bias=0.3).train()
    with torch.no_grad():  # a gate that depends on the state, so the p_k differ between tokens
        model.strategy.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    x0 = torch.randint(0, 49, (4, 16), generator=torch.Generator().manual_seed(1))
    loss, out = diffusion_loss(model, x0, model.backbone.mask_id, torch.Generator().manual_seed(2), n_loops=3,
                               positions=positions)
    gate = model.strategy.gate.weight
    (got,) = torch.autograd.grad(loss, gate)

    gen = torch.Generator().manual_seed(2)  # the same draws diffusion_loss made
    t = sample_t(4, gen)
    xt, masked = mask_tokens(x0, t, model.backbone.mask_id, gen)
    b, st = model.backbone, model.strategy
    h = model.run_range(b.embed(xt), 0, 1)
    survive, total, entropy = torch.ones(4, 16), 0.0, torch.zeros(4, 16)
    for k in range(3):
        h = model.run_range(h, 1, 3)
        if k < 2:
            lam = torch.sigmoid(st.gate(torch.nn.functional.rms_norm(h, (h.shape[-1],))).squeeze(-1))
            p, survive = survive * lam, survive * (1 - lam)
        else:
            p = survive
        nll = masked_nll(model.readout(h), x0, masked, b.mask_id)
        total = total + elbo(p * nll, t)
        entropy = entropy - p * torch.log(p + 1e-9)
    want = total - 0.2 * (entropy * masked).mean()
    assert torch.allclose(loss, want, atol=1e-5), (loss.item(), want.item())
    (expected,) = torch.autograd.grad(want, gate)
    assert got.abs().sum() > 0 and torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    assert out.applications == 3.0 and 1.0 <= out.stats["mean_exit_loop"] <= 3.0


def test_exit_gate_exits_by_the_cdf_threshold_at_inference():
    eager = looped(ExitGate, ExitGateParams, n_loops=5, init_bias=6.0).eval()  # lambda ~ 1: exit after loop 1
    x = torch.randint(0, 49, (3, 16), generator=torch.Generator().manual_seed(4))
    x[:, ::2] = eager.backbone.mask_id  # half the positions masked
    late = looped(ExitGate, ExitGateParams, n_loops=5, init_bias=-6.0).eval()  # lambda ~ 0: run to the cap
    mid = looped(ExitGate, ExitGateParams, n_loops=5, init_bias=0.0, threshold=0.7).eval()  # cdf 0.5, 0.75: loop 2
    with torch.no_grad():
        e, lt, m = eager(x), late(x), mid(x)
    assert (e.applications, e.stats["mean_token_loops"]) == (1.0, 1.0)
    assert e.extra_flops == eager.strategy.gate_flops(16)  # one gate, no readout at inference
    assert (lt.applications, lt.stats["mean_token_loops"]) == (5.0, 5.0)
    assert lt.extra_flops == 4 * late.strategy.gate_flops(16)  # no gate on the cap loop
    assert (m.applications, m.stats["mean_token_loops"]) == (2.0, 2.0)
    with torch.no_grad():  # every token exited after loop 1: the same as running one loop
        assert torch.equal(e.logits, eager(x, n_loops=1).logits)


def test_exited_tokens_keep_their_state_while_the_others_loop():
    model = looped(ExitGate, ExitGateParams, n_loops=3, init_bias=0.0, threshold=0.5).eval()
    st, b = model.strategy, model.backbone
    with torch.no_grad():
        st.gate.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(7))  # lambda spread around 0.5
        x = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(8))
        x[:, 1::2] = b.mask_id
        h0 = model.run_range(b.embed(x), 0, 1)
        h1 = model._block(h0)
        masked = x == b.mask_id
        logit = st.gate(torch.nn.functional.rms_norm(h1, (h1.shape[-1],))).squeeze(-1)
        st.gate.bias.fill_(-float(logit[masked].median()) + 1e-4)  # about half the masked tokens: lambda >= 0.5
        first = masked & (st.exit_prob(h1) >= 0.5)  # exit after loop 1
        assert 0 < int(first.sum()) < int(masked.sum())  # some exit, some loop on
        from loopsearch.looping import LoopContext
        out = st.run(h0, model._block, 3, LoopContext(masked=masked, generator=torch.Generator()))
    assert torch.equal(out.h[first], h1[first])
    assert not torch.allclose(out.h[masked & ~first], h1[masked & ~first])
    assert out.applications >= 2.0 and 1.0 < out.stats["mean_token_loops"] < out.applications
    # a gate after every loop that ran, but none on the cap loop
    assert out.extra_flops == (out.applications if out.applications < 3 else 2) * st.gate_flops(16)


def test_exit_gate_plans_its_readouts_and_trains_within_one_step_of_the_plan():
    model = looped(ExitGate, ExitGateParams, n_loops=3)
    planned = plan_steps(model, CFG, 3e8)
    plain = plan_steps(looped(ExitGate, ExitGateParams, n_loops=1), CFG, 3e8)
    r = train(model, data(), CFG, 3e8, seed=0, progress=False)
    assert abs(r.steps - planned) <= 1 and r.mean_train_loops == 3.0
    assert planned < plain / 2  # three loops and two readouts per step cost more than a third of the steps


# ---- router ------------------------------------------------------------------------------------
def test_router_capacities_follow_the_schedule():
    lin = looped(Router, RouterParams, n_loops=3).strategy
    geo = looped(Router, RouterParams, n_loops=4, capacity="geometric", keep=0.5).strategy
    assert lin.capacities(32, 3) == [32, 22, 11]
    assert geo.capacities(32, 4) == [32, 16, 8, 4]
    assert lin.capacities(2, 3) == [2, 2, 1]  # at least one token
    assert lin.equivalent_applications(16, 1) == 1.0
    # 16 + 11 + 6 tokens: less than that share of the block's FLOPs, since attention is quadratic in tokens
    assert 1.0 < lin.equivalent_applications(16, 3) < (16 + 11 + 6) / 16


def test_tokens_the_router_drops_keep_their_state_and_kept_ones_see_their_own_positions():
    model = looped(Router, RouterParams, n_loops=2).eval()
    x = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(5))
    b = model.backbone
    with torch.no_grad():
        b.blocks[1].qkv.weight.mul_(30.0)  # sharp attention, so that positions matter visibly
        h1 = model.run_range(model.run_range(b.embed(x), 0, 1), 1, 3)  # after loop 1
        out = model.strategy.run(model.run_range(b.embed(x), 0, 1), model._block, 2, _ctx())
        changed = (out.h - h1).abs().amax(-1) > 0
        assert changed.sum(1).tolist() == [8, 8]  # linear: half the tokens run loop 2
        # the block on an index that covers every position in order is the block itself
        full = torch.arange(16).expand(2, 16)
        assert torch.allclose(b.run_block(1, h1, index=full), b.run_block(1, h1), atol=1e-6)
        # and a subset runs at its own rotary positions, not at 0..k-1
        idx = torch.tensor([[1, 5, 9, 13]] * 2)
        sub = h1.gather(1, idx[..., None].expand(-1, -1, h1.shape[-1]))
        assert not torch.allclose(b.run_block(1, sub, index=idx), b.run_block(1, sub), atol=1e-4)
        assert torch.allclose(b.run_block(1, sub, index=idx), b.run_block(1, sub, index=idx + 2), atol=1e-5)  # relative


def _ctx():
    from loopsearch.looping import LoopContext
    return LoopContext(generator=torch.Generator().manual_seed(0))


def test_router_plans_within_one_step_and_is_cheaper_than_looping_everything():
    from loopsearch_builtins.strategies import FixedLoops, FixedParams
    model = looped(Router, RouterParams, n_loops=3)
    planned = plan_steps(model, CFG, 3e8)
    bb = tiny_model(seq_len=16).backbone
    every = plan_steps(LoopedMDM(bb, FixedLoops(FixedParams(n_loops=3), bb.d_model), 1, 3), CFG, 3e8)
    r = train(model, data(), CFG, 3e8, seed=0, progress=False)
    assert abs(r.steps - planned) <= 1
    assert planned > every  # dropped tokens are not charged, so the budget buys more steps


def test_router_needs_a_backbone_that_runs_token_subsets():
    bb = tiny_model(seq_len=16).backbone
    bb.supports_token_index = False  # as a third-party backbone without run_block(i, h, index=)
    with pytest.raises(SpecError, match="supports_token_index"):
        LoopedMDM(bb, Router(RouterParams(), bb.d_model), 1, 3)
