"""`loopsearch sample`, `loopsearch evaluate --metric genppl|zeroshot|task`, `loopsearch reference
train`, and studies whose objective is a generation metric (task accuracy, gen-PPL)."""

import json

import optuna
import pytest
import torch

from conftest import SHARED_DATA, run_cli
from loopsearch.eval import metrics
from loopsearch.results import leaderboard
from loopsearch.search import study as studies
from loopsearch.errors import LoopsearchError

TINY_REF = ["--param", "n_layer=1", "--param", "d_model=32", "--param", "n_heads=2", "--param", "seq_len=32",
            "--param", "steps=15", "--param", "batch_size=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sample_prints_samples_and_their_cost(trained):
    r = run_cli("sample", "scale", "1", "--sampler", "confidence", "--steps", "8", "-n", "2", "--prompt", "ROMEO:",
                "--loop-schedule", "middle:1-4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["samples"]) == 2 and all(s.startswith("ROMEO:") for s in out["samples"])
    assert out["cost"]["network_calls"] == 8 and out["cost"]["flops"] > 0
    assert out["loops_per_call"] == [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]
    text = run_cli("sample", "scale", "1", "--steps", "4", "-n", "1")
    assert text.returncode == 0 and "network calls" in text.stdout and "FLOPs" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["--sampler", "nope"], "unknown sampler 'nope'; available: ancestral, cached, confidence, threshold"),
    (["--loop-schedule", "sideways:1-2"], "cannot read loop schedule"),
    (["--param", "threshold"], "cannot read --param 'threshold'"),
    (["--sampler", "threshold", "--param", "threshold=7"], "bad parameters for sampler 'threshold'"),
    (["--seq-len", "999"], "must be between 1 and 32"),
    (["--model-schedule", "0.5-0.2:0"], "must satisfy 0 <= start < end <= 1"),
])
def test_sample_errors_are_one_line(trained, args, message):
    r = run_cli("sample", "scale", "1", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_reference_train_and_genppl_are_stored_and_shown(trained):
    r = run_cli("reference", "train", "scale", *TINY_REF)
    assert r.returncode == 0, r.stderr
    assert "reference LM for 'scale'" in r.stdout
    again = run_cli("reference", "train", "scale")
    assert again.returncode == 2 and "--force" in again.stderr
    r = run_cli("evaluate", "scale", "1", "--metric", "gen_ppl", "-n", "4", "--steps", "8", "--sampler", "cached",
                "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["gen_ppl"] > 1 and 0 < row["sample_entropy"] <= torch.log(torch.tensor(32.0)).item()
    assert row["sampler"] == "cached" and row["network_calls"] + row["cached_calls"] <= 8 and row["flops"] > 0
    study = optuna.load_study(study_name="scale", storage=studies.open_storage(None))
    assert metrics.stored(study)[1][0]["gen_ppl"] == row["gen_ppl"]
    df = leaderboard.frame(None, ["scale"])
    assert df.filter(df["trial"] == 1)["gen_ppl"].item() == pytest.approx(row["gen_ppl"])
    assert "gen PPL" in run_cli("leaderboard", "--study", "scale").stdout


def test_evaluate_zeroshot_on_a_text_file(trained, tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20)
    r = run_cli("evaluate", "scale", "0", "--metric", "zeroshot_bpb", "--data", str(path), "--sequences", "4",
                "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["windows"] == 4 and row["bits_per_byte"] > 0 and row["nll"] > 0
    assert row["bits_per_byte"] == pytest.approx(row["total_nats"] / row["bytes"] / torch.log(torch.tensor(2.0)).item())
    missing = run_cli("evaluate", "scale", "0", "--metric", "zeroshot_bpb")
    assert missing.returncode == 2 and "needs --data" in missing.stderr


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2" / "wiki.test.raw").exists(), reason="needs ../shared/data")
def test_evaluate_zeroshot_on_wikitext_lambada_and_ptb(trained):
    files = [SHARED_DATA / "wikitext-2" / "wiki.test.raw", SHARED_DATA / "lambada" / "lambada_test.jsonl",
             SHARED_DATA / "ptb" / "ptb.test.txt"]
    args = [a for f in files for a in ("--data", str(f))]
    r = run_cli("evaluate", "scale", "0", "--metric", "zeroshot_bpb", *args, "--sequences", "8", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["data"] for row in rows] == [str(f) for f in files]
    assert all(0 < row["bits_per_byte"] < 20 for row in rows)


def test_evaluate_task_on_addition(trained):
    r = run_cli("evaluate", "scale", "1", "--metric", "task_accuracy", "--task", "addition", "--task-param", "digits=2",
                "--n", "6", "--steps", "6", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["n"] + row["n_skipped"] == 6 and 0 <= row["accuracy"] <= 1 and row["network_calls"] > 0
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning:")]  # trained on Shakespeare
    assert len(warning) == 1 and "'shakespeare'" in warning[0] and "never saw the task" in warning[0], r.stderr
    bad = run_cli("evaluate", "scale", "1", "--metric", "task_accuracy", "--task", "chess")
    assert bad.returncode == 2 and "addition" in bad.stderr and "gsm8k" in bad.stderr


TASK_STUDY = """
[objective]
metrics = ["task_accuracy", "val_nll"]
task = { name = "addition", params = { digits = 2 } }
n_task = 8
steps = 4
"""


def test_a_study_with_task_accuracy_as_objective_runs_end_to_end(tiny_recipe, tmp_path):
    """Multi-objective: task accuracy (maximised) and val NLL, trained on the addition corpus."""
    recipe = tmp_path / "task.toml"
    recipe.write_text(tiny_recipe.read_text().replace('name = "shakespeare"',
                                                      'name = "addition"\nparams = { digits = 2 }')
                      + TASK_STUDY)
    r = run_cli("study", "create", "--recipe", str(recipe), "--space", "early_middle", "--name", "adder",
                "--n-trials", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("study", "run", "adder", "--no-progress")
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="adder", storage=studies.open_storage(None))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        acc, nll = t.values
        assert 0 <= acc <= 1 and acc == t.user_attrs["task_accuracy"] and nll == t.user_attrs["val_nll"]
    board = run_cli("leaderboard", "--study", "adder", "--format", "json")
    assert all(row["task_accuracy"] is not None for row in json.loads(board.stdout))
    assert run_cli("study", "list").returncode == 0


def test_bad_objectives_fail_at_creation(tiny_recipe, tmp_path):
    cases = {
        '[objective]\nmetrics = ["task_accuracy"]\ntask = { name = "chess" }\n': "unknown task 'chess'",
        '[objective]\nmetrics = ["zeroshot_nll"]\n': "needs zeroshot = PATH",
        '[objective]\nmetrics = ["zeroshot_nll"]\nzeroshot = "nope.txt"\n': "is not a file",
        '[objective]\nmetrics = ["gen_ppl"]\nsampler = { name = "nope" }\n': "unknown sampler 'nope'",
        '[objective]\nmetrics = ["bleu"]\n': "objective.metrics",
    }
    for i, (extra, message) in enumerate(cases.items()):
        recipe = tmp_path / f"bad{i}.toml"
        recipe.write_text(tiny_recipe.read_text() + extra)
        with pytest.raises(LoopsearchError, match=message):
            studies.spec_from_options(f"bad{i}", "early_middle", str(recipe), None, None, None, None, None)


def test_the_leaderboard_fits_80_columns_with_evaluate_metrics(trained, tmp_path):
    """Issue 15: at 80 columns, with evaluate metrics stored, no cell is cut and every row's val
    NLL is printed in full; columns that do not fit are named, and --wide shows them."""
    path = tmp_path / "held_out.txt"
    path.write_text("To be, or not to be, that is the question:\n" * 40)
    for trial in ("0", "1"):
        assert run_cli("evaluate", "scale", trial, "--metric", "zeroshot_bpb", "--data", str(path),
                       "--sequences", "4").returncode == 0
    assert run_cli("evaluate", "scale", "1", "--metric", "task_accuracy", "--task", "addition", "--task-param",
                   "digits=2", "--n", "4", "--steps", "4").returncode == 0
    r = run_cli("leaderboard", "--study", "scale", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in r.stdout
    df = leaderboard.frame(None, ["scale"])
    for row in df.iter_rows(named=True):
        assert f"{row['val_nll']:.4f} ± {row['val_nll_se']:.4f}" in r.stdout
    assert "baseline" in r.stdout and "L1-2 x4 U" in r.stdout and "steps" in r.stdout
    flat = " ".join(r.stdout.split())  # the caption wraps at 80 columns
    assert "Not shown at this width" in flat and "--wide shows every column" in flat
    wide = run_cli("leaderboard", "--study", "scale", "--wide", env={"COLUMNS": "250"})
    assert wide.returncode == 0 and "0-shot" in wide.stdout and "task acc" in wide.stdout
    named = " ".join(wide.stdout.split())  # the caption names what the metric columns measured
    assert "task acc: addition" in named and "0-shot bits/B: held_out.txt" in named, wide.stdout
    assert set(df["task"].drop_nulls()) == {"addition"} and set(df["zeroshot_data"].drop_nulls()) == {str(path)}
