"""The reference causal LM (loopsearch/eval/reference.py) and the causal flag of the builtin transformer."""

import json
import math

import pytest
import torch

from loopsearch.data import prepare, random_batch
from loopsearch.errors import BudgetError, LoopsearchError
from loopsearch.eval.reference import (ReferenceConfig, build_reference, causal_logits, check_tokenizer, gen_ppl,
                                  load_reference, plan_steps, reference_dir, save_reference, train_reference,
                                  unigram_entropy)
from loopsearch_builtins.corpora import Shakespeare, ShakespeareParams
from loopsearch_builtins.transformer import Transformer, TransformerParams

TINY = dict(n_layer=2, d_model=32, n_heads=2, seq_len=32, batch_size=8, lr=1e-2, eval_sequences=16, device="cpu")


@pytest.fixture(scope="module")
def data(cache_dir):
    with pytest.MonkeyPatch.context() as mp:  # the session cache of conftest (module scope runs before it is set)
        mp.setenv("LOOPSEARCH_CACHE", str(cache_dir))
        return prepare(Shakespeare(ShakespeareParams()), 300)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny reference trained briefly (and its info). One thread: the model is too small to gain
    from more, and two threads on a busy 2-core machine ran 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_reference(data, ReferenceConfig(**TINY, steps=60), progress=False)
    finally:
        torch.set_num_threads(threads)


def backbone(causal: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerParams(n_layer=2, d_model=32, n_heads=2, causal=causal), 50, 16).eval()


def logits(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    h = model.embed(x)
    for i in range(model.n_layer):
        h = model.run_block(i, h)
    return model.head(h)


def test_causal_flag_hides_the_future():
    model = backbone(causal=True)
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 50
    with torch.no_grad():
        a, b = logits(model, x), logits(model, y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    probs = model.attention_probs(0, model.embed(x))
    assert probs.triu(1).abs().max() == 0 and torch.allclose(probs.sum(-1), torch.ones(()))


def test_bidirectional_default_is_unchanged():
    assert TransformerParams().causal is False
    bi, causal = backbone(causal=False), backbone(causal=True)
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 50
    with torch.no_grad():
        assert not torch.allclose(logits(bi, x)[:, :9], logits(bi, y)[:, :9])  # sees the future
        h = bi.embed(x)  # one layer: the last query sees every key either way
        torch.testing.assert_close(bi.run_block(0, h)[:, -1], causal.run_block(0, h)[:, -1])
        assert not torch.allclose(bi.run_block(0, h)[:, :-1], causal.run_block(0, h)[:, :-1])
    assert bi.flop_profile(16) == causal.flop_profile(16)  # full T x T counted either way
    assert bi.attention_probs(0, bi.embed(x)).triu(1).abs().max() > 0


def test_training_lowers_the_loss(data, trained):
    model, info = trained
    x = random_batch(data.valid, 16, 33, torch.Generator().manual_seed(0))
    untrained = build_reference(ReferenceConfig(**TINY), data.vocab_size)
    assert gen_ppl(model, x)["nll"] < gen_ppl(untrained, x)["nll"] - 0.5
    assert info["val_nll"] < math.log(data.vocab_size) - 0.5
    assert info["val_ppl"] == pytest.approx(math.exp(info["val_nll"]))
    assert info["steps"] == 60 and info["train_flops"] > 0 and info["wall_s"] > 0


def test_budget_sets_the_steps(data):
    cfg = ReferenceConfig(**TINY)
    model = build_reference(cfg, data.vocab_size)
    per_step = 3 * cfg.batch_size * model.flop_profile(cfg.seq_len).forward()
    assert plan_steps(model, ReferenceConfig(**TINY, budget=10.5 * per_step)) == 10
    assert plan_steps(model, ReferenceConfig(**TINY, budget=f"{per_step * 3 / 1e9} GFLOP")) == 3
    with pytest.raises(BudgetError, match="below one training step"):
        plan_steps(model, ReferenceConfig(**TINY, budget=per_step / 2))
    with pytest.raises(ValueError, match="not both"):
        ReferenceConfig(steps=5, budget=1e12)
    with pytest.raises(ValueError, match="extra"):
        ReferenceConfig(n_layers=2)


def test_save_load_round_trips(data, trained, tmp_path):
    model, info = trained
    d = save_reference(reference_dir(tmp_path / "runs", "study"), model, ReferenceConfig(**TINY, steps=60),
                       data.tokenizer_json, info)
    assert d == tmp_path / "runs" / "study" / "reference"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, cfg, tok, loaded_info = load_reference(d)
    assert cfg == ReferenceConfig(**TINY, steps=60) and tok == data.tokenizer_json and loaded_info == info
    x = torch.randint(0, data.vocab_size, (3, 20))
    with torch.no_grad():
        assert torch.equal(causal_logits(model, x), causal_logits(loaded, x))
    with pytest.raises(LoopsearchError, match="loopsearch reference train"):
        load_reference(tmp_path / "nowhere")


def test_corpus_text_scores_better_than_random_tokens(data, trained):
    model, _ = trained
    real = random_batch(data.valid, 8, 33, torch.Generator().manual_seed(1))
    noise = torch.randint(0, data.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))
    assert gen_ppl(model, real)["gen_ppl"] < gen_ppl(model, noise)["gen_ppl"] / 3


def test_gen_ppl_matches_a_hand_computation(data, trained):
    model, _ = trained
    x = torch.tensor([[5, 17, 42, 9], [100, 3, 3, 250]])
    out = gen_ppl(model, x, batch_size=1)
    with torch.no_grad():
        logp = torch.log_softmax(logits(model, x)[..., : data.vocab_size], -1)  # MASK is not a prediction
    nll = -sum(logp[b, i - 1, x[b, i]].item() for b in range(2) for i in range(1, 4)) / 6
    assert out["tokens"] == 6
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["gen_ppl"] == pytest.approx(math.exp(out["nll"]))
    # the uncertainty from 2 samples: their mean NLLs' spread, t with 1 degree of freedom
    per = [-sum(logp[b, i - 1, x[b, i]].item() for i in range(1, 4)) / 3 for b in range(2)]
    assert out["nll_se"] == pytest.approx(abs(per[0] - per[1]) / 2, rel=1e-5)
    assert out["gen_ppl_lo"] == pytest.approx(math.exp(out["nll"] - 12.706 * out["nll_se"]), rel=1e-3)
    assert out["gen_ppl_lo"] < out["gen_ppl"] < out["gen_ppl_hi"]


def test_long_samples_are_scored_in_windows(data, trained):
    model, _ = trained  # trained at seq_len 32: windows of 33 tokens
    x = random_batch(data.valid, 2, 80, torch.Generator().manual_seed(2))
    out = gen_ppl(model, x)
    assert out["tokens"] == 2 * 79
    assert abs(out["nll"] - gen_ppl(model, x[:, :33])["nll"]) < 1.0
    with pytest.raises(LoopsearchError, match="MASK"):
        gen_ppl(model, torch.full((1, 4), data.vocab_size))


def test_unigram_entropy():
    assert unigram_entropy(torch.full((3, 10), 7)) == 0.0
    assert unigram_entropy(torch.tensor([[4, 8, 15, 16, 23]])) == pytest.approx(math.log(5))
    assert unigram_entropy([[1, 1], [1, 2]]) == pytest.approx(math.log(2) / 2)  # mean over samples


def test_tokenizer_mismatch_raises(data):
    check_tokenizer(data.tokenizer_json, json.dumps(json.loads(data.tokenizer_json)))  # formatting is irrelevant
    tok = json.loads(data.tokenizer_json)
    tok["model"]["merges"] = tok["model"]["merges"][:-1]  # one merge fewer: another tokeniser
    other = json.dumps(tok)
    with pytest.raises(LoopsearchError, match="loopsearch reference train em"):
        check_tokenizer(data.tokenizer_json, other, study="em")
