"""The analytic FLOP accounting agrees with torch's FlopCounterMode (math SDPA backend: the
fused CPU attention kernel is counted as 0 FLOPs by FlopCounterMode)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_model
from loopsearch.flops import FlopProfile

CONFIGS = [
    dict(loop=None),
    dict(loop=(1, 3, {"n_loops": 3})),
    dict(loop=(0, 1, {"n_loops": 5, "reinject": True})),
    dict(loop=(2, 4, {"n_loops": 1})),
    dict(loop=(1, 2, {"n_loops": 4}), mlp="gelu", tie_embeddings=False),
    dict(loop=(0, 4, {"n_loops": 2}), n_layer=4, d_model=64, n_heads=4, seq_len=48),
]


def measured(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c.get("loop")))
def test_training_step_flops_match_flop_counter(cfg):
    seq_len = cfg.pop("seq_len", 16)
    model = tiny_model(seq_len=seq_len, **cfg)
    x = torch.randint(0, 50, (3, seq_len))
    out = {}

    def step():
        res = model(x)
        out["apps"] = res.applications
        res.logits.float().logsumexp(-1).sum().backward()

    counted = measured(step)
    analytic = model.train_step_flops(seq_len, batch_size=3, applications=out["apps"])
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)


@pytest.mark.parametrize("n_loops", [1, 2, 6])
def test_inference_flops_per_token_match_flop_counter(n_loops):
    model = tiny_model(loop=(1, 3, {"n_loops": n_loops}), seq_len=32)
    x = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        counted = measured(lambda: model(x))
    analytic = model.inference_flops_per_token(32) * 32 * 2
    assert abs(analytic - counted) / counted < 0.02


def test_every_loop_is_counted():
    p = FlopProfile(seq_len=8, layers=(10.0, 20.0, 30.0), head=5.0)
    assert p.forward() == 65.0
    assert p.forward(1, 3, applications=4) == 10 + 4 * 50 + 5
    assert p.forward(1, 3, applications=1) == p.forward()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: str(c.get("loop")))
def test_training_with_the_head_only_at_masked_positions_is_charged_what_runs(cfg):
    """The trainer runs the head only where the loss is (the masked positions): the step is
    charged the head's share that ran, within 1% of FlopCounterMode, and the loss is unchanged."""
    from loopsearch.diffusion import diffusion_loss

    cfg = dict(cfg)
    seq_len = cfg.pop("seq_len", 16)
    model = tiny_model(seq_len=seq_len, **cfg)
    x0 = torch.randint(0, 49, (4, seq_len))
    got = {}

    def step():
        loss, out = diffusion_loss(model, x0, model.backbone.mask_id, torch.Generator().manual_seed(3), positions=True)
        got.update(loss=loss, out=out)
        loss.backward()

    counted = measured(step)
    out = got["out"]
    assert 0 < out.head_share < 1
    analytic = model.train_step_flops(seq_len, 4, out.applications, out.extra_flops, out.head_share)
    assert abs(analytic - counted) / counted < 0.01, (analytic, counted)
    assert analytic < model.train_step_flops(seq_len, 4, out.applications, out.extra_flops)  # the bound: every position
    full, _ = diffusion_loss(model, x0, model.backbone.mask_id, torch.Generator().manual_seed(3), positions=False)
    assert abs(full.item() - got["loss"].item()) < 1e-5
