"""loopsearch analyze attention: attention probabilities, mask-to-mask shares, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from loopsearch.eval import attention
from loopsearch.backbone import Backbone
from loopsearch.errors import LoopsearchError
from loopsearch_builtins.transformer import apply_rotary

from conftest import run_cli
from helpers import tiny_model


def batches(vocab=50, seq_len=16, n=2, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, seq_len), generator=g) for _ in range(n)]


def test_attention_probs_rows_sum_to_one_and_reproduce_sdpa():
    model = tiny_model(loop=(1, 3, {"n_loops": 2}))
    bb = model.backbone
    h = torch.randn(2, 16, 32)
    for i in range(bb.n_layer):
        probs = bb.attention_probs(i, h)
        assert probs.shape == (2, 2, 16, 16)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 16), atol=1e-5)
        assert (probs >= 0).all()
        block = bb.blocks[i]
        B, T, C = h.shape
        q, k, v = block.qkv(block.norm1(h)).view(B, T, 3, block.n_heads, C // block.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = bb.cos[:T], bb.sin[:T]
        y = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        assert torch.allclose(probs @ v, y, atol=1e-5)
        # and the block's output rebuilt from the explicit probabilities equals run_block
        att = h + block.proj((probs @ v).transpose(1, 2).reshape(B, T, C))
        out = att + block.mlp(block.norm2(att))
        assert torch.allclose(out, bb.run_block(i, h), atol=1e-5)


def test_backbone_base_attention_probs_raises_clearly():
    with pytest.raises(NotImplementedError, match="attention probabilities"):
        Backbone.attention_probs(object.__new__(Backbone), 0, torch.zeros(1, 2, 4))


@pytest.mark.parametrize("n_loops", [None, 1, 3])
def test_shares_rows_and_ranges(n_loops):
    model = tiny_model(loop=(1, 3, {"n_loops": 4}))
    rates = (0.15, 0.5, 0.85)
    rows = attention.attention_shares(model, batches(), model.backbone.mask_id, rates, n_loops=n_loops)
    n = 4 if n_loops is None else n_loops
    n_layer, block_len = 4, 2
    assert len(rows) == len(rates) * (n_layer - block_len + block_len * n)
    for r in rows:
        assert 0.0 <= r["mask_to_mask"] <= 1.0 and 0.0 <= r["masked_key_fraction"] <= 1.0 and 0.0 <= r["self"] <= 1.0
        assert r["mask_to_mask"] + r["self"] + r["mask_to_unmasked"] == pytest.approx(1.0)
    for t in rates:
        sub = [(r["layer"], r["loop"]) for r in rows if r["t"] == t]
        assert sub == [(0, 1)] + [(i, k) for k in range(1, n + 1) for i in (1, 2)] + [(3, 1)]
    # more masking -> more masked keys to attend to
    frac = {t: [r["masked_key_fraction"] for r in rows if r["t"] == t][0] for t in rates}
    assert frac[0.15] < frac[0.5] < frac[0.85]


def test_schedule_follows_the_forward(monkeypatch):
    model = tiny_model(loop=(1, 3, {"n_loops": 3}))
    calls = []
    orig = model.backbone.run_block
    monkeypatch.setattr(model.backbone, "run_block", lambda i, h: calls.append(i) or orig(i, h))
    model(batches()[0])
    assert [i for i, _ in attention.layer_schedule(model)] == calls
    plain = tiny_model()
    assert attention.layer_schedule(plain) == [(i, 1) for i in range(4)]


def test_walk_reaches_the_model_output(monkeypatch):
    """The h fed to the last layer application equals the forward's (reinject included)."""
    for kw in ({"n_loops": 3}, {"n_loops": 3, "reinject": True}):
        model = tiny_model(loop=(1, 3, kw))
        x = batches(n=1)[0]
        seen = []
        orig = model.backbone.attention_probs
        monkeypatch.setattr(model.backbone, "attention_probs", lambda i, h: seen.append(h) or orig(i, h))
        attention.attention_shares(model, [x], model.backbone.mask_id, rates=(0.5,), seed=0)
        xt, _ = attention.mask_tokens(x, torch.full((3,), 0.5), model.backbone.mask_id,
                                      torch.Generator().manual_seed(0))
        inputs = []
        orig_run = model.backbone.run_block
        monkeypatch.setattr(model.backbone, "run_block", lambda i, h: inputs.append(h) or orig_run(i, h))
        model(xt)
        monkeypatch.undo()
        assert len(seen) == len(inputs)
        for a, b in zip(seen, inputs):
            assert torch.allclose(a, b, atol=1e-5)


def test_uniform_attention_gives_the_masked_key_fraction():
    model = tiny_model(loop=(1, 3, {"n_loops": 2}))
    with torch.no_grad():
        model.backbone.blocks[2].qkv.weight[:64].zero_()  # q and k = 0 -> uniform attention
    rows = attention.attention_shares(model, batches(), model.backbone.mask_id, (0.3, 0.7))
    layer2 = [r for r in rows if r["layer"] == 2]
    assert len(layer2) == 4
    for r in layer2:  # 1/T on itself; the rest spread over the other keys, a masked_key_fraction of them masked
        assert r["self"] == pytest.approx(1 / 16, abs=1e-6)
        assert r["mask_to_mask"] / (1 - r["self"]) == pytest.approx(r["masked_key_fraction"], abs=1e-6)
    # a trained-looking layer is not uniform (the check is not vacuous)
    other = [r for r in rows if r["layer"] == 0]
    assert any(abs(r["mask_to_mask"] / (1 - r["self"]) - r["masked_key_fraction"]) > 1e-6 for r in other)


def test_self_attention_is_not_mask_to_mask():
    """Hand-built probabilities: T = 4, positions 0, 1, 3 masked (B = 1, H = 1)."""
    masked = torch.tensor([[True, True, False, True]])
    n, own, unmasked, uniform, count = attention._shares(torch.eye(4)[None, None], masked)
    assert count == 3 and own == 3.0 and n == 0.0 and unmasked == 0.0  # identity: self = 1, mask->mask = 0
    assert uniform / count == pytest.approx(2 / 3)  # (3 masked - 1) / (4 - 1) other keys
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4],  # query 0 (masked): others masked 0.2 + 0.4, self 0.1
                          [0.5, 0.5, 0.0, 0.0],  # query 1 (masked): others masked 0.5, self 0.5
                          [1.0, 0.0, 0.0, 0.0],  # query 2 is unmasked: not counted
                          [0.0, 0.0, 1.0, 0.0]])  # query 3 (masked): all on the unmasked key
    n, own, unmasked, uniform, count = attention._shares(probs[None, None], masked)
    assert count == 3
    assert n == pytest.approx(0.6 + 0.5 + 0.0) and own == pytest.approx(0.1 + 0.5 + 0.0)
    assert unmasked == pytest.approx(0.3 + 0.0 + 1.0)
    assert n + own + unmasked == pytest.approx(count)


def test_parse_rates():
    assert attention.parse_rates("0.15, 0.5,0.85") == [0.15, 0.5, 0.85]
    for bad in ("0,0.5", "1", "1.5", "x", "", "nan"):
        with pytest.raises(LoopsearchError):
            attention.parse_rates(bad)


def test_cli_on_trained_study(trained):
    r = run_cli("analyze", "attention", "scale", "1", "--rates", "0.3,0.7", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 * (4 - 2 + 2 * 4)
    for layer in (1, 2):
        for t in (0.3, 0.7):
            assert [x["loop"] for x in rows if x["layer"] == layer and x["t"] == t] == [1, 2, 3, 4]
    assert all(not math.isnan(x["mask_to_mask"]) and 0 <= x["mask_to_mask"] <= 1 for x in rows)

    table = run_cli("analyze", "attention", "scale", "1", "--loops", "2")
    assert table.returncode == 0, table.stderr
    assert "mask→mask" in table.stdout and "uniform share" in table.stdout and "self" in table.stdout
    print(table.stdout)

    bad = run_cli("analyze", "attention", "scale", "1", "--rates", "0.5,1.2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "between 0 and 1" in bad.stderr
    missing = run_cli("analyze", "attention", "scale", "99", "--json")
    assert missing.returncode == 2 and "has no trial 99" in missing.stderr
    unknown = run_cli("analyze", "attention", "nope", "1")
    assert unknown.returncode != 0 and unknown.stderr.strip().count("\n") == 0


def test_strategies_say_whether_they_reinject():
    """The attention walk asks the strategy (``LoopStrategy.reinjects``), not its name or params."""
    assert tiny_model(loop=(1, 3, {"n_loops": 2})).strategy.reinjects() is False
    assert tiny_model(loop=(1, 3, {"n_loops": 2, "reinject": True})).strategy.reinjects() is True
    assert tiny_model().strategy.reinjects() is False  # the base class's default
