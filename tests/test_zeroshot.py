"""Zero-shot perplexity bounds on held-out text files (loopsearch/eval/zeroshot.py)."""

import json
import math

import pytest

from conftest import SHARED_DATA
from helpers import tiny_model
from loopsearch.data import train_tokenizer
from loopsearch.errors import LoopsearchError
from loopsearch.eval.zeroshot import read_eval_text, token_byte_lengths, tokenize, zeroshot_checkpoint, zeroshot_nll

SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = ("The quick brown fox jumps over the lazy dog. Naïve café — déjà vu ✓.\n" * 3
        + "It was the best of times, it was the worst of times.\n" * 40)


@pytest.fixture(scope="module")
def tok_json():
    return train_tokenizer(TEXT * 5, 300).to_str()


@pytest.fixture(scope="module")
def vocab(tok_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json).get_vocab_size()


# ---- reading files ---------------------------------------------------------------------------------
def test_read_eval_text_formats(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Some text , here .\n", encoding="utf-8")
    assert read_eval_text(raw) == raw.read_text()
    ptb = tmp_path / "ptb.test.txt"
    ptb.write_text(" no it was n't black monday \n but N points <unk>\n")
    assert read_eval_text(ptb) == ptb.read_text()
    docs = ["first doc\n\nwith a blank line", "second ✓"]
    jl = tmp_path / "lambada_test.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "\n")
    assert read_eval_text(jl) == "first doc\n\nwith a blank line\n\nsecond ✓"
    sniffed = tmp_path / "records.txt"  # jsonl by content, whatever the extension
    sniffed.write_text(jl.read_text())
    assert read_eval_text(sniffed) == read_eval_text(jl)


def test_read_eval_text_errors(tmp_path):
    with pytest.raises(LoopsearchError, match="evaluation text not found: .*missing.txt; pass an existing"):
        read_eval_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(LoopsearchError, match="empty.txt is empty"):
        read_eval_text(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(LoopsearchError, match=r"bad.jsonl:2 is not a JSON object with a `text` field"):
        read_eval_text(bad)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(LoopsearchError, match="is not UTF-8 text"):
        read_eval_text(latin)


REAL = {
    "wikitext-2/wiki.test.raw": (" \n = Robert Boulter = \n", 1_290_590),
    "lambada/lambada_test.jsonl": ("In my palm is a clear stone", None),
    "ptb/ptb.test.txt": (" no it was n't black monday", 449_945),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_read_eval_text_on_the_real_files(name):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    text = read_eval_text(path)
    start, size = REAL[name]
    assert text.startswith(start)
    if size is not None:
        assert len(text.encode("utf-8")) == size  # plain text: read byte for byte
    else:
        lines = path.read_text().splitlines()
        assert text.count("\n\n") >= len(lines) - 1  # documents joined by a blank line
        assert text.endswith(json.loads(lines[-1])["text"])


# ---- the bound -----------------------------------------------------------------------------------------
def test_byte_lengths_are_exact(tok_json):
    lengths = token_byte_lengths(tok_json)
    ids = tokenize(tok_json, TEXT)
    assert int(lengths[ids.numpy()].sum()) == len(TEXT.encode("utf-8"))


def test_zeroshot_nll_on_a_tiny_untrained_model(tok_json, vocab):
    model = tiny_model(vocab=vocab, seq_len=SEQ, loop=(1, 3, {"n_loops": 3}))
    ids = tokenize(tok_json, TEXT)
    out = zeroshot_nll(model, tok_json, TEXT, seq_len=SEQ, batch_size=4, draws=4)
    n = len(ids) // SEQ
    assert out["windows"] == n and out["tokens"] == n * SEQ and out["tokens_available"] == len(ids)
    assert math.isfinite(out["nll"]) and abs(out["nll"] - math.log(vocab)) < 0.5  # untrained: near uniform
    assert out["perplexity_bound"] == pytest.approx(math.exp(out["nll"]))
    assert out["total_nats"] == pytest.approx(out["nll"] * out["tokens"])
    assert out["bits_per_byte"] == pytest.approx(out["total_nats"] / math.log(2) / out["bytes"])
    assert out["bytes"] == int(token_byte_lengths(tok_json)[ids[: n * SEQ].numpy()].sum())
    assert out["bytes"] < len(TEXT.encode("utf-8"))  # the tail shorter than a window is not scored
    # FLOPs: what ran (3 loops of the block in every call), summed over windows and mask draws
    assert out["mean_loops"] == 3.0
    assert out["inference_flops_per_token"] == pytest.approx(model.inference_flops_per_token(SEQ))
    assert out["eval_flops"] == pytest.approx(out["inference_flops_per_token"] * out["tokens"] * 4)
    # deterministic, and the same as a second call
    assert zeroshot_nll(model, tok_json, TEXT, seq_len=SEQ, batch_size=4, draws=4) == out
    fewer = zeroshot_nll(model, tok_json, TEXT, seq_len=SEQ, n_sequences=2, batch_size=4, draws=4, n_loops=1)
    assert fewer["windows"] == 2 and fewer["mean_loops"] == 1.0
    assert fewer["inference_flops_per_token"] < out["inference_flops_per_token"]


def test_zeroshot_nll_errors(tok_json, vocab):
    model = tiny_model(vocab=vocab, seq_len=SEQ)
    with pytest.raises(LoopsearchError, match="fewer than one window of seq_len=32"):
        zeroshot_nll(model, tok_json, "short text", seq_len=SEQ)
    with pytest.raises(LoopsearchError, match="the evaluation text is empty"):
        zeroshot_nll(model, tok_json, "  \n", seq_len=SEQ)
    with pytest.raises(LoopsearchError, match="n_sequences must be >= 1"):
        zeroshot_nll(model, tok_json, TEXT, seq_len=SEQ, n_sequences=0)


def test_zeroshot_checkpoint(tok_json, vocab, tmp_path):
    from loopsearch import checkpoint
    from loopsearch.spec import PluginRef, TrainConfig, TrialConfig

    config = TrialConfig(study="t", trial=0,
                         backbone=PluginRef(name="transformer", params={"n_layer": 2, "d_model": 32, "n_heads": 2}),
                         strategy=PluginRef(name="none"), corpus=PluginRef(name="shakespeare"), vocab_size=300,
                         train=TrainConfig(seq_len=SEQ, batch_size=4, eval_draws=2), budget=1e9, seed=0)
    model = checkpoint.build_model(config, vocab)
    checkpoint.save(tmp_path / "ck", model, config, tok_json)
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    out = zeroshot_checkpoint(tmp_path / "ck", path, n_sequences=3, device="cpu")
    assert out["windows"] == 3 and out["draws"] == 2 and out["seq_len"] == SEQ and out["path"] == str(path)
    assert out["mean_loops"] == 1.0 and math.isfinite(out["bits_per_byte"])
    with pytest.raises(LoopsearchError, match="seq_len 64 must be between 1 and 32"):
        zeroshot_checkpoint(tmp_path / "ck", path, seq_len=64)
