"""Inference-time loop scaling of a trained checkpoint (`loopsearch evaluate --metric loop_scaling`)."""

import json

import pytest

from conftest import run_cli
from loopsearch.eval import loop_scaling as evaluate
from loopsearch.results import leaderboard
from loopsearch.errors import LoopsearchError

def test_parse_loops():
    assert evaluate.parse_loops("1,2,4,8") == [1, 2, 4, 8]
    assert evaluate.parse_loops("3-5,1") == [1, 3, 4, 5]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(LoopsearchError, match="--loops"):
            evaluate.parse_loops(bad)


def test_loop_scaling_rows_and_storage(trained):
    r = run_cli("evaluate", "scale", "1", "--metric", "loop_scaling", "--loops", "1-4,8", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["n_loops"] for row in rows] == [1, 2, 3, 4, 8]
    assert all(row["exit"] == "none" and row["mean_loops"] == row["n_loops"] for row in rows)
    flops = [row["inference_flops_per_token"] for row in rows]
    assert flops == sorted(flops) and flops[1] - flops[0] == pytest.approx(flops[2] - flops[1])
    # the trained loop count reproduces the val NLL recorded in training
    trial = trained.get_trials()[1]
    at_trained = next(row for row in rows if row["n_loops"] == 4)
    assert at_trained["val_nll"] == pytest.approx(trial.user_attrs["val_nll"], rel=1e-5)
    assert at_trained["inference_flops_per_token"] == pytest.approx(trial.user_attrs["inference_flops_per_token"])
    df = leaderboard.scaling_frame(studies=["scale"])
    assert df["n_loops"].to_list() == [1, 2, 3, 4, 8] and set(df["trial"]) == {1}
    assert set(df["exit"]) == {"none"} and df["mean_loops"].to_list() == [1.0, 2.0, 3.0, 4.0, 8.0]
    assert (evaluate.trial_checkpoint(trained, 1) / "eval.json").exists()
    table = run_cli("leaderboard", "--study", "scale", "--scaling")
    assert table.returncode == 0 and "loop scaling" in table.stdout and "mean loops" in table.stdout


def test_plain_model_evaluates_once_and_says_so(trained):
    r = run_cli("evaluate", "scale", "0", "--metric", "loop_scaling", "--json")  # the default loop counts
    assert r.returncode == 0, r.stderr
    assert [row["n_loops"] for row in json.loads(r.stdout)] == [1]
    assert "plain model" in r.stderr and "one loop count" in r.stderr
    # asked explicitly for loop counts it cannot run: an error, not a silent single row (issue 15)
    r = run_cli("evaluate", "scale", "0", "--metric", "loop_scaling", "--loops", "1,2,3")
    assert r.returncode != 0 and "plain model" in r.stderr and "--loops 1" in r.stderr and "Traceback" not in r.stderr
    assert run_cli("eval", "scale", "0", "--loops", "1", "--json").returncode == 0


def test_unknown_trial_is_one_line_error(trained):
    r = run_cli("evaluate", "scale", "42", "--metric", "loop_scaling")
    assert r.returncode == 2 and "no trial 42" in r.stderr and "Traceback" not in r.stderr


def test_old_spellings_still_work_with_a_deprecation_line(trained, tiny_recipe):
    """`loopsearch eval` is `evaluate --metric loop_scaling`; `--metric genppl|zeroshot|task` and
    `study create --sampler` keep working and say what the new spelling is."""
    r = run_cli("eval", "scale", "1", "--loops", "1,2", "--json")
    assert r.returncode == 0, r.stderr
    assert "deprecated: loopsearch eval is now loopsearch evaluate --metric loop_scaling" in r.stderr
    assert [row["n_loops"] for row in json.loads(r.stdout)] == [1, 2]
    r = run_cli("evaluate", "scale", "0", "--metric", "zeroshot")
    assert "deprecated: --metric zeroshot is now --metric zeroshot_bpb" in r.stderr
    assert r.returncode == 2 and "--metric zeroshot_bpb needs --data" in r.stderr
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", "old",
                "--sampler", "random")
    assert r.returncode == 0, r.stderr
    assert "deprecated: --sampler is now --optuna-sampler" in r.stderr
    from loopsearch.search import study as studies

    assert studies.load("old")[1].optuna_sampler == "random"


def test_the_python_api_loads_a_trained_trial(trained):
    import torch

    import loopsearch
    from loopsearch.errors import LoopsearchError

    t = loopsearch.load_trial("scale", 1)
    assert t.config.strategy.name == "fixed" and (t.model.loop_start, t.model.loop_end) == (1, 3)
    assert t.record.val_nll == trained.trials[1].user_attrs["val_nll"] and not t.model.training
    ids = torch.tensor([t.tokenizer.encode("To be, or not to be").ids[:8]])
    out = t.model(ids)
    assert out.logits.shape[:2] == ids.shape and out.applications == 4.0
    with pytest.raises(LoopsearchError, match="no trial 9"):
        loopsearch.load_trial("scale", 9)
