"""Studies end to end on tiny models: baseline first, budget respected by every trial,
checkpoints reloadable, leaderboard formats, interruption and resumption."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState
import polars as pl
import pytest

from conftest import run_cli
from loopsearch import checkpoint
from loopsearch.results import leaderboard
from loopsearch.search import study as studies
from loopsearch.search import workers
from loopsearch.data import prepare
from loopsearch.diffusion import validation_elbo
from loopsearch.data import validation_windows
from loopsearch.registry import get_registry
from loopsearch.search.space import BASELINE_ATTR


@pytest.fixture
def finished_study(tiny_recipe):
    spec = studies.spec_from_options("tiny", "early_middle", str(tiny_recipe), None, None, None, None, None)
    studies.create(spec)
    ran = workers.run("tiny", progress=False)
    assert ran == 3
    return studies.load("tiny")


def test_baseline_is_first_and_every_trial_respects_the_budget(finished_study):
    st, spec = finished_study
    trials = st.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert trials[0].user_attrs[BASELINE_ATTR] and trials[0].user_attrs["strategy"] == "none"
    for t in trials:
        a = t.user_attrs
        cfg = studies.trial_config(spec, t.number, studies.Choice(a["strategy"], a["strategy_params"],
                                                                    a["loop_start"], a["loop_end"]))
        model = studies.meta_model(cfg, 300)
        one_step = model.train_step_flops(cfg.train.seq_len, cfg.train.batch_size, model.strategy.max_train_loops())
        assert a["train_flops"] <= spec.budget and spec.budget - a["train_flops"] < one_step
        assert math.isfinite(a["val_nll"]) and a["perplexity"] == pytest.approx(math.exp(a["val_nll"]))
        assert t.value == a["val_nll"]
        # intermediate values are keyed by the checkpoints' nominal GFLOPs (budget * i / eval_points, the
        # same steps for every trial; whole GFLOPs fit PostgreSQL's 32-bit step column)
        nominal = [int(spec.budget * (i + 1) / spec.train.eval_points // 1e9) for i in range(spec.train.eval_points)]
        assert sorted(t.intermediate_values) == nominal
    looped = [t for t in trials if t.user_attrs["strategy"] == "fixed"]
    assert looped and all(0 <= t.user_attrs["loop_start"] < t.user_attrs["loop_end"] <= 3 for t in looped)


def test_spec_stored_in_study_is_complete(finished_study):
    st, spec = finished_study
    raw = st.user_attrs[studies.SPEC_ATTR]
    json.dumps(raw)  # plain JSON, no pickles
    assert raw["space"]["name"] == "early_middle" and raw["budget"] == 3e9
    assert raw["backbone"]["params"]["n_layer"] == 4 and raw["backbone"]["params"]["mlp"] == "swiglu"
    assert {"loopsearch", "torch", "optuna"} <= set(raw["versions"])


def test_checkpoint_reloads_to_the_same_validation_nll(finished_study):
    st, spec = finished_study
    t = st.get_trials()[1]
    model, config, tok = checkpoint.load(t.user_attrs["checkpoint"], get_registry())
    assert (config.loop_start, config.loop_end) == (t.user_attrs["loop_start"], t.user_attrs["loop_end"])
    data = prepare(get_registry().get("corpus", "shakespeare")(
        get_registry().get("corpus", "shakespeare").Params()), 300)
    windows, keys = validation_windows(data.valid, config.train.seq_len, config.train.eval_sequences)
    model.eval()
    val = validation_elbo(model, windows, keys, model.backbone.mask_id, config.train.eval_draws, seed=spec.seed)
    assert val.nll == pytest.approx(t.user_attrs["val_nll"], rel=1e-5)
    assert val.se == pytest.approx(t.user_attrs["val_nll_se"], rel=1e-4)


def test_leaderboard_rows_and_formats(finished_study, tmp_path):
    df = leaderboard.frame(studies=["tiny"])
    assert len(df) == 3 and df["val_nll"].is_sorted()
    base = df.filter(pl.col("baseline"))
    assert base["delta_nll"][0] == 0.0
    assert df.filter(~pl.col("baseline"))["strategy"].to_list() == ["fixed", "fixed"]
    for fmt in ("csv", "json", "markdown"):
        text = leaderboard.write(df, fmt)
        assert "fixed" in text and "none" in text
    assert len(json.loads(leaderboard.write(df, "json"))) == 3
    leaderboard.write(df, "parquet", str(tmp_path / "lb.parquet"))
    assert pl.read_parquet(tmp_path / "lb.parquet").shape == df.shape
    assert len(leaderboard.top(df, 1)) == 1
    # --output without --format: the file's extension says which (a .csv file holds CSV, not a table)
    for name, check in (("lb.csv", lambda t: t.splitlines()[0].startswith("study,") and "|" not in t),
                        ("lb.json", lambda t: len(json.loads(t)) == 3)):
        r = run_cli("leaderboard", "--study", "tiny", "--output", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        assert check((tmp_path / name).read_text()), (tmp_path / name).read_text()[:200]


def test_rerun_of_a_finished_study_runs_nothing(finished_study):
    assert workers.run("tiny", progress=False) == 0
    assert workers.run("tiny", n_trials=1, progress=False) == 1
    assert len(studies.load("tiny")[0].get_trials()) == 4


def test_trials_too_expensive_for_min_steps_are_rejected_before_training(tiny_recipe, tmp_path):
    space = tmp_path / "heavy.toml"
    space.write_text('name = "heavy"\nstrategies = ["fixed"]\n[block]\nlayers = [0, 4]\nlength = [4, 4]\n'
                     '[strategy.fixed]\nn_loops = 12\n')
    spec = studies.spec_from_options("heavy", str(space), str(tiny_recipe), None, None, None, None, None)
    studies.create(spec)
    workers.run("heavy", n_trials=2, progress=False)
    trials = studies.load("heavy")[0].get_trials()
    assert trials[0].state.name == "COMPLETE"
    assert trials[1].state.name == "PRUNED" and "min_steps" in trials[1].user_attrs["rejected"]
    assert "train_flops" not in trials[1].user_attrs


def test_interrupted_study_keeps_trials_and_continues(tiny_recipe, tmp_path):
    """Ctrl-C: finished trials are kept; the running one saves its training state, stores why it
    stopped, and the next run retries it first, resuming from that state."""
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", "stop",
                "--n-trials", "4")
    assert r.returncode == 0, r.stderr
    storage = os.environ["LOOPSEARCH_STORAGE"]
    proc = subprocess.Popen([sys.executable, "-m", "loopsearch", "study", "run", "stop", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a finished trial and a running one past its first validation
        trials = optuna.load_study(study_name="stop", storage=storage).get_trials()
        if (any(t.state.name == "COMPLETE" for t in trials)
                and any(t.state.name == "RUNNING" and t.intermediate_values for t in trials)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continues it" in err and "failed with value None" not in err
    trials = optuna.load_study(study_name="stop", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and states.count("COMPLETE") >= 1
    kept = {t.number for t in trials if t.state.name == "COMPLETE"}
    stopped = [t for t in trials if t.state.name == "FAIL"]
    if stopped:  # the signal can land after the trial finished: then there is nothing to retry
        (cut,) = stopped
        assert cut.user_attrs["loopsearch.interrupted"] is True
        assert "interrupted (Ctrl-C or SIGTERM); training state saved at" in cut.user_attrs["failed"]
    r = run_cli("study", "run", "stop", "--no-progress")
    assert r.returncode == 0, r.stderr
    trials = optuna.load_study(study_name="stop", storage=storage).get_trials()
    assert sum(t.state.name == "COMPLETE" for t in trials) == 4
    assert kept <= {t.number for t in trials if t.state.name == "COMPLETE"}
    assert any(t.user_attrs.get(BASELINE_ATTR) and t.state.name == "COMPLETE" for t in trials)
    if stopped:
        assert f"retrying interrupted trial(s) {cut.number} first" in r.stdout + r.stderr
        retry = trials[len(kept) + 1]  # the first trial of the second run
        assert retry.system_attrs["retry_history"] == [cut.number] and retry.params == cut.params
        assert retry.state.name == "COMPLETE" and retry.user_attrs["resumed_from_flops"] > 0
        assert "failed" not in retry.user_attrs and "loopsearch.interrupted" not in retry.user_attrs


def test_quickstart_commands_via_cli(tiny_recipe):
    """The README's command sequence (study create / run / leaderboard) with a tiny recipe."""
    assert run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe)).returncode == 0
    r = run_cli("study", "run", "--no-progress")  # no name: the most recent study
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("trial ") and " complete: " in line]
    n = len(lines)
    assert n >= 2 and f"({n} of {n} finished;" in lines[-1] and "elapsed)" in lines[-1], r.stdout  # study progress
    assert "(1 of " in lines[0] and "to go)" in lines[0]
    r = run_cli("leaderboard")
    assert r.returncode == 0 and "★" in r.stdout and "baseline" in r.stdout and " x" in r.stdout  # e.g. L1-2 x3 U
    r = run_cli("study", "list")
    assert "early_middle-" in r.stdout


def test_halting_trial_reports_executed_inference_flops(tiny_recipe, tmp_path):
    space = tmp_path / "halt.toml"
    space.write_text('name = "halt"\nstrategies = ["halting"]\n[block]\nlayers = [1, 3]\nlength = [2, 2]\n'
                     '[strategy.halting]\nn_loops = 4\n')
    studies.create(studies.spec_from_options("halt", str(space), str(tiny_recipe), None, None, None, None, None))
    workers.run("halt", n_trials=2, progress=False)
    st, spec = studies.load("halt")
    a = st.get_trials()[1].user_attrs
    cfg = studies.TrialConfig.model_validate(a["config"])
    model = studies.meta_model(cfg, 300)
    bound = model.inference_flops_per_token(cfg.train.seq_len)  # all 4 loops and every halting head
    assert 1 <= a["eval_loops_run"] <= 4 and 1 <= a["mean_token_loops"] <= a["eval_loops_run"]
    assert a["inference_flops_per_token"] <= bound
    executed_blocks = model.inference_flops_per_token(cfg.train.seq_len, a["eval_loops_run"], 0.0)
    head_per_loop = 2 * cfg.train.seq_len * 32 / cfg.train.seq_len  # halting head, FLOPs per token per loop
    assert executed_blocks <= a["inference_flops_per_token"] <= executed_blocks + 4 * head_per_loop
    assert "ponder" in a["train_stats"] and a["train_stats"]["loops_run"] == 4


@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "gp", "cmaes", "nsga2"])
def test_every_sampler_choice_works_on_a_real_space(sampler, tiny_recipe):
    """Each `--sampler` choice draws valid configurations from the conditional early_middle space
    (qmc and gp need scipy, cmaes needs cmaes: both are dependencies)."""
    from loopsearch.search.space import suggest

    spec = studies.spec_from_options("s", "early_middle", str(tiny_recipe), None, None, None, sampler, 12)
    study = optuna.create_study(sampler=studies.make_sampler(spec))

    def objective(trial):
        choice = suggest(trial, spec.space, spec.backbone.params)
        return (choice.loop_start - 1) ** 2 + 0.1 * choice.strategy_params["n_loops"]

    study.optimize(objective, n_trials=12)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 12


def test_a_repeated_configuration_is_not_retrained(tiny_recipe, tmp_path):
    """A space with one looped configuration: the sampler can only propose it again; the second
    proposal reuses the first's result (train_flops 0, duplicate_of) and the leaderboard lists it once."""
    space = tmp_path / "one.toml"
    space.write_text('name = "one"\nstrategies = ["fixed"]\n[block]\nlayers = [1, 2]\nlength = [1, 1]\n'
                     '[strategy.fixed]\nn_loops = 2\n')
    studies.create(studies.spec_from_options("one", str(space), str(tiny_recipe), None, None, None, "random", 3))
    workers.run("one", n_trials=3, progress=False)
    st, _ = studies.load("one")
    done = [t for t in st.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 3
    looped = [t for t in done if t.user_attrs.get("strategy") == "fixed"]
    first, again = sorted(looped, key=lambda t: t.number)
    assert again.user_attrs["duplicate_of"] == first.number and again.user_attrs["train_flops"] == 0.0
    assert again.value == first.value and first.user_attrs["train_flops"] > 0
    assert "its result reused" in studies.trial_line(again)
    df = leaderboard.frame(None, ["one"])
    assert df.height == 2 and again.number not in df["trial"].to_list()
    # a worker died in a third attempt at it, leaving its training state; the retry finds the
    # configuration finished meanwhile: it reuses the result and removes the dead attempt's state
    st.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=first.params,
                                           distributions=first.distributions, user_attrs={"seed": 0}))
    dead = st.get_trials()[-1]
    state = studies.artifacts_root(studies.load("one")[1]) / f"trial-{dead.number:04d}" / "state"
    (state / "ckpt-00000010").mkdir(parents=True)
    (state / "latest").write_text("ckpt-00000010")
    # two retries of it queued: while the second waits, the first must leave the shared state alone
    workers.requeue(st, dead)
    workers.requeue(st, dead)
    workers.run("one", n_trials=1, progress=False)
    first_retry, retry = st.get_trials()[-2:]
    assert first_retry.user_attrs.get("duplicate_of") == first.number and state.exists()
    assert retry.state == TrialState.WAITING
    workers.run("one", n_trials=1, progress=False)
    retry = st.get_trials()[-1]
    assert retry.system_attrs["retry_history"] == [dead.number] and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["duplicate_of"] == first.number and retry.user_attrs["train_flops"] == 0.0
    assert not state.exists() and not state.parent.exists()


def test_independent_processes_get_distinct_sampler_seeds():
    from loopsearch.search.workers import sampler_offset

    # a second terminal on one SQLite file, started while the first runs a trial
    assert sampler_offset(5, 0, 1234, True) != sampler_offset(5, 0, 1235, True)
    assert sampler_offset(5, 0, 1234, False) == sampler_offset(5, 0, 1235, False)  # alone: reproducible
    assert sampler_offset(5, 1, 1234, True) != sampler_offset(5, 2, 1234, True)  # workers of one --workers parent
    assert sampler_offset(5, 1, 1234, True) == sampler_offset(5, 1, 999, True)  # ... told apart by index
