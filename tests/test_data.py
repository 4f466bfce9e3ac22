"""Corpora and caches: the bundled corpus, local files, and no second tokenisation."""

import pytest
import torch

from conftest import SHARED_DATA, run_cli
from loopsearch import data as data_mod
from loopsearch.data import prepare, random_batch, validation_batches
from loopsearch.errors import LoopsearchError
from loopsearch_builtins.corpora import Shakespeare, ShakespeareParams, TextFiles, TextParams


def test_bundled_corpus_splits_and_round_trips():
    splits = Shakespeare(ShakespeareParams()).load_splits()
    assert splits["train"].startswith("First Citizen:")
    assert 0.08 < len(splits["valid"]) / (len(splits["train"]) + len(splits["valid"])) < 0.12
    d = prepare(Shakespeare(ShakespeareParams()), 300)
    assert d.vocab_size == 300 and int(d.train.max()) < 300
    assert d.decode(d.valid[:50].tolist()) == splits["valid"][: len(d.decode(d.valid[:50].tolist()))]


def test_second_prepare_reads_the_cache(tmp_path, monkeypatch):
    (tmp_path / "train.txt").write_text("the cat sat on the mat\n" * 400)
    (tmp_path / "valid.txt").write_text("the mat sat on the cat\n" * 40)
    corpus = TextFiles(TextParams(train=str(tmp_path / "train.txt"), valid=str(tmp_path / "valid.txt")))
    first = prepare(corpus, 270)

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data_mod, "train_tokenizer", boom)
    monkeypatch.setattr(data_mod, "_encode", boom)
    second = prepare(corpus, 270)
    assert torch.equal(first.train, second.train) and first.fingerprint == second.fingerprint


def test_text_corpus_holds_out_a_fraction(tmp_path):
    (tmp_path / "all.txt").write_text("".join(f"line {i}\n" for i in range(1000)))
    splits = TextFiles(TextParams(train=str(tmp_path / "all.txt"), valid_fraction=0.2)).load_splits()
    assert splits["valid"].startswith("line 80") and splits["train"].endswith("\n")
    assert splits["train"] + splits["valid"] == (tmp_path / "all.txt").read_text()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LoopsearchError, match="not found"):
        TextFiles(TextParams(train=str(tmp_path / "nope.txt"))).load_splits()


def test_batches_have_the_right_shape_and_are_seeded():
    ids = torch.arange(1000)
    a = random_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    b = random_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous windows
    val = validation_batches(ids, 16, n_sequences=10, batch_size=4)
    assert [v.shape[0] for v in val] == [4, 4, 2] and torch.equal(val[0][0], ids[:16])


@pytest.mark.skipif(not (SHARED_DATA / "ptb").is_dir(), reason="../shared/data/ptb not present")
def test_ptb_directory_as_corpus(tiny_recipe):
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", "ptb",
                "--corpus", str(SHARED_DATA / "ptb"))
    assert r.returncode == 0, r.stderr
    show = run_cli("study", "show", "ptb", "--json")
    import json

    corpus = json.loads(show.stdout)["corpus"]
    assert corpus["name"] == "text"
    assert corpus["params"]["train"].endswith("ptb.train.txt") and corpus["params"]["valid"].endswith("ptb.valid.txt")
