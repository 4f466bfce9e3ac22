"""Reasoning tasks (loopsearch/tasks.py) and the addition corpus plugin (plugins/tasks.py)."""

import json

import pytest
import torch

from conftest import SHARED_DATA
from helpers import tiny_model
from loopsearch.data import prepare
from loopsearch.errors import LoopsearchError, SpecError
from loopsearch.registry import get_registry
from loopsearch.sampling import Sampler
from loopsearch.tasks import (AdditionParams, Problem, addition_problems, addition_splits, evaluate_checkpoint,
                              evaluate_task, extract_answer, get_task, load_gsm8k)

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
SMALL = AdditionParams(digits=2, n_train=400, n_valid=40, n_test=40, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def operands(p: Problem) -> list[str]:
    return p.prompt.rstrip("=").split("+")


def test_generation_is_deterministic_and_splits_disjoint():
    a, b = addition_splits(SMALL), addition_splits(SMALL)
    assert a == b
    assert {k: len(v) for k, v in a.items()} == {"train": 400, "valid": 40, "test": 40}
    test, valid, train = ({p.prompt for p in a[s]} for s in ("test", "valid", "train"))
    assert len(test) == 40 and len(valid) == 40  # distinct within the held-out splits
    assert not test & valid and not test & train and not valid & train
    other = addition_splits(SMALL.model_copy(update={"seed": 4}))
    assert other["test"] != a["test"]
    # the test split depends on the seed and the difficulty only, and a longer list extends a shorter one
    assert addition_splits(SMALL.model_copy(update={"n_train": 5, "n_valid": 3}))["test"] == a["test"]
    assert addition_problems(10, 3, seed=7) == addition_problems(25, 3, seed=7)[:10]


@pytest.mark.parametrize("digits", [1, 2, 4, 6])
def test_difficulty_knob_sets_digit_counts_and_answers_are_sums(digits):
    probs = addition_problems(50, digits, seed=1)
    for p in probs:
        assert [len(o) for o in operands(p)] == [digits, digits], p
        assert p.answer == str(eval(p.prompt[:-1])), p  # the prompt is Python: check the sum
        assert p.text == f"{p.prompt}{p.answer}\n" and p.task == "addition"
    three = addition_problems(20, digits, seed=1, n_operands=3)
    assert all(len(operands(p)) == 3 and p.answer == str(eval(p.prompt[:-1])) for p in three)
    ranged = addition_problems(200, 4, seed=1, min_digits=2)
    assert {len(o) for p in ranged for o in operands(p)} == {2, 3, 4}


def test_impossible_split_sizes_are_one_line_errors():
    with pytest.raises(LoopsearchError, match="100 exist.*lower n_valid/n_test or raise digits"):
        addition_splits(AdditionParams(digits=1, n_valid=80, n_test=40, n_train=10))
    with pytest.raises(ValueError, match="min_digits=3 is above digits=2"):
        AdditionParams(digits=2, min_digits=3)
    # a small space still works, train avoiding every held-out problem
    s = addition_splits(AdditionParams(digits=1, n_valid=30, n_test=60, n_train=200))
    held = {p.prompt for p in s["valid"] + s["test"]}
    assert len(held) == 90 and not held & {p.prompt for p in s["train"]}


@pytest.mark.parametrize("task, text, expected", [
    ("addition", "4690\n12+3=15\n", "4690"),
    ("addition", " 4690 \n", "4690"),
    ("addition", "46a0\n", None),
    ("addition", "\n4690", None),
    ("addition", "", None),
    ("gsm8k", " She makes 9 * 2 = $18.\n#### 1,234\nQuestion: next", "1234"),
    ("gsm8k", "#### $18.", "18"),
    ("gsm8k", "#### -7", "-7"),
    ("gsm8k", "#### 18.00", "18"),
    ("gsm8k", "so 3 apples and then 42.", "42"),  # no ####: the last number
    ("gsm8k", "the total is $1,500 dollars", "1500"),
    ("gsm8k", "no number here", None),
])
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


def test_extract_answer_unknown_task():
    with pytest.raises(LoopsearchError, match="no answer extractor for task 'nope'; available: addition, gsm8k"):
        extract_answer("nope", "1")


def test_gsm8k_loader_on_a_small_file(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,234"},
            {"question": "Cost?", "answer": "so\n#### $5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    probs = load_gsm8k(path)
    assert probs == [Problem("Question: How many?\nAnswer:", "1234", "gsm8k"),
                     Problem("Question: Cost?\nAnswer:", "5", "gsm8k")]
    assert load_gsm8k(path, limit=1) == probs[:1]
    assert get_task("gsm8k", {"path": str(path)}).problems() == probs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(LoopsearchError, match=r"bad.jsonl:1 is not a GSM8K record"):
        load_gsm8k(bad)
    with pytest.raises(LoopsearchError, match="GSM8K file not found"):
        load_gsm8k(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"{GSM8K_TEST} not present")
def test_gsm8k_loader_on_the_real_file_and_the_gold_solutions_score_1():
    probs = load_gsm8k(GSM8K_TEST)
    assert len(probs) == 1319
    assert probs[0].prompt.startswith("Question: Janet") and probs[0].prompt.endswith("\nAnswer:")
    assert probs[0].answer == "18"
    solutions = [json.loads(line)["answer"] for line in GSM8K_TEST.open()]
    # oracle: the reference solution, as a completion, is read back as the gold answer every time
    assert all(extract_answer("gsm8k", " " + s) == p.answer for s, p in zip(solutions, probs))


def test_task_registry_and_errors():
    t = get_task("addition", {"digits": 2, "n_train": 10, "n_valid": 5, "n_test": 5})
    assert len(t.problems("test")) == 5 and len(t.problems("train")) == 10
    with pytest.raises(LoopsearchError, match="unknown task 'nope'; available: addition, gsm8k"):
        get_task("nope")
    with pytest.raises(SpecError, match="bad parameters for task 'addition': digitz.*accepted: digits"):
        get_task("addition", {"digitz": 2})
    with pytest.raises(LoopsearchError, match="no split 'dev'; available: train, valid, test"):
        t.problems("dev")


def test_addition_corpus_is_a_plugin_and_prepares():
    reg = get_registry()
    cls = reg.get("corpus", "addition")
    assert reg.items("corpus")["addition"].distribution == "loopsearch"
    params = cls.Params.model_validate({"digits": 2, "n_train": 300, "n_valid": 30, "n_test": 30})
    splits = cls(params).load_splits()
    lines = {s: splits[s].splitlines() for s in ("train", "valid")}
    assert len(lines["train"]) == 300 and len(lines["valid"]) == 30
    test = {p.prompt + p.answer for p in addition_splits(params)["test"]}
    assert not test & set(lines["train"]) and not test & set(lines["valid"])
    data = prepare(cls(params), vocab_size=300)
    assert len(data.train) > 0 and len(data.valid) > 0
    assert data.decode(data.valid.tolist()) == splits["valid"]


@pytest.fixture(scope="module")
def prepared(cache_dir):
    """A small addition corpus, tokenised (once for the module, in the session's cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPSEARCH_CACHE", str(cache_dir))
        cls = get_registry().get("corpus", "addition")
        params = cls.Params.model_validate({"digits": 2, "n_train": 300, "n_valid": 30, "n_test": 30})
        return params, prepare(cls(params), vocab_size=300)


class Oracle(Sampler):
    """Fills each row with the tokens of the right completion (or a wrong one): scores 1.0 (0.0)."""

    name = "oracle"

    def __init__(self, tok, problems, wrong=False):
        self.tok, self.wrong = tok, wrong
        self.by_prefix = {tuple(tok.encode(p.prompt).ids): p for p in problems}

    def sample(self, x, den, steps, generator):
        x = x.clone()
        for row in x:
            n = int((row != den.mask_id).sum())
            p = self.by_prefix[tuple(row[:n].tolist())]
            answer = str(int(p.answer) + 1) if self.wrong else p.answer
            fill = self.tok.encode(answer + "\n" + "1+1=2\n" * 20).ids
            row[n:] = torch.tensor(fill[: len(row) - n])
        return x


def test_evaluate_task_oracle_scores_one_and_wrong_oracle_zero(prepared):
    from tokenizers import Tokenizer

    params, data = prepared
    tok = Tokenizer.from_str(data.tokenizer_json)
    model = tiny_model(vocab=data.vocab_size, seq_len=24).eval()
    probs = addition_splits(params)["test"][:10]
    good = evaluate_task(model, data.tokenizer_json, probs, seq_len=24, sampler=Oracle(tok, probs), batch_size=4)
    assert (good["accuracy"], good["n"], good["correct"], good["n_skipped"]) == (1.0, 10, 10, 0)
    assert good["examples"][0]["prediction"] == probs[0].answer and good["sampler"] == "oracle"
    bad = evaluate_task(model, data.tokenizer_json, probs, seq_len=24, sampler=Oracle(tok, probs, wrong=True))
    assert bad["accuracy"] == 0.0


def test_evaluate_task_on_a_tiny_model_keeps_the_prompt(prepared, monkeypatch):
    from tokenizers import Tokenizer

    import loopsearch.sampling as sampling

    params, data = prepared
    tok = Tokenizer.from_str(data.tokenizer_json)
    model = tiny_model(vocab=data.vocab_size, seq_len=24, loop=(1, 3, {"n_loops": 2})).eval()
    probs = addition_splits(params)["test"][:6]
    seen, original = [], sampling.generate

    def spy(*args, **kwargs):
        res = original(*args, **kwargs)
        seen.append(res)
        return res

    monkeypatch.setattr(sampling, "generate", spy)
    out = evaluate_task(model, data.tokenizer_json, probs, seq_len=24, steps=4, batch_size=4, seed=1)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["n"] == 6 and out["n_skipped"] == 0
    assert len(seen) == 2  # two batches
    rows = [r for res in seen for r in res.tokens.tolist()]
    for p, row in zip(probs, rows):
        ids = tok.encode(p.prompt).ids
        assert row[: len(ids)] == ids and tok.decode(row[: len(ids)]) == p.prompt
        assert model.backbone.mask_id not in row
    cost = out["cost"]
    assert cost["network_calls"] == 8 and cost["sequences"] == 6 and cost["flops"] > 0
    assert cost["loop_iterations"] == pytest.approx(8 * 2)
    expected = sum(res.cost.flops for res in seen)
    assert cost["flops"] == pytest.approx(expected)
    again = evaluate_task(model, data.tokenizer_json, probs, seq_len=24, steps=4, batch_size=4, seed=1)
    assert again["accuracy"] == out["accuracy"] and again["examples"] == out["examples"]


def test_evaluate_task_skips_prompts_too_long(prepared):
    params, data = prepared
    model = tiny_model(vocab=data.vocab_size, seq_len=24).eval()
    long = Problem("1+" * 30 + "1=", "31")
    probs = [long] + addition_splits(params)["test"][:2]
    out = evaluate_task(model, data.tokenizer_json, probs, seq_len=24, steps=2)
    assert out["n"] == 2 and out["n_skipped"] == 1
    with pytest.raises(LoopsearchError, match="every prompt is too long for seq_len=24"):
        evaluate_task(model, data.tokenizer_json, [long], seq_len=24)


def test_evaluate_checkpoint(prepared, tmp_path):
    from loopsearch import checkpoint
    from loopsearch.spec import PluginRef, TrainConfig, TrialConfig

    params, data = prepared
    config = TrialConfig(study="t", trial=0,
                         backbone=PluginRef(name="transformer", params={"n_layer": 2, "d_model": 32, "n_heads": 2}),
                         strategy=PluginRef(name="none"), corpus=PluginRef(name="addition", params=params.model_dump()),
                         vocab_size=300, train=TrainConfig(seq_len=16, batch_size=4), budget=1e9, seed=0)
    model = checkpoint.build_model(config, data.vocab_size)
    checkpoint.save(tmp_path / "ck", model, config, data.tokenizer_json)
    out = evaluate_checkpoint(tmp_path / "ck", "addition", params, limit=3, steps=2, device="cpu")
    assert out["n"] == 3 and out["task"] == "addition" and out["seq_len"] == 16
    with pytest.raises(LoopsearchError, match="seq_len 32 must be between 1 and 16"):
        evaluate_checkpoint(tmp_path / "ck", "addition", params, seq_len=32)
