"""Everyday study tools (issue 15): `study enqueue`, `study retry`, `study delete`, and `--json` on
the listing commands."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import run_cli
from loopsearch.errors import LoopsearchError
from loopsearch.search import manage, workers
from loopsearch.search import study as studies

GOOD = {"strategy": "fixed", "fixed.n_loops": 3, "fixed.train_loops": "uniform", "block_length": 1, "loop_start": 1}


@pytest.fixture
def created(tiny_recipe):
    studies.create(studies.spec_from_options("tools", "early_middle", str(tiny_recipe), None, None, None, None, 2))
    return "tools"


def test_parse_value():
    assert manage.parse_value("3") == 3 and manage.parse_value("0.5") == 0.5
    assert manage.parse_value("true") is True and manage.parse_value("uniform") == "uniform"
    assert manage.parse_value("nan") == "nan"


def test_enqueue_checks_against_the_space_and_the_queued_configuration_runs(created):
    with pytest.raises(LoopsearchError, match="needs 'loop_start' too"):
        manage.enqueue(created, {k: v for k, v in GOOD.items() if k != "loop_start"})
    with pytest.raises(LoopsearchError, match=r"fixed.n_loops=40 is outside the space 'early_middle': allowed 2..12"):
        manage.enqueue(created, {**GOOD, "fixed.n_loops": 40})
    with pytest.raises(LoopsearchError, match=r"train_loops='sometimes'.*allowed one of \['constant', 'uniform'\]"):
        manage.enqueue(created, {**GOOD, "fixed.train_loops": "sometimes"})
    with pytest.raises(LoopsearchError, match="--param lr: not drawn by space"):
        manage.enqueue(created, {**GOOD, "lr": 0.1})
    st, _ = studies.load(created)
    assert len(st.get_trials()) == 1  # only the baseline: nothing bad was queued
    r = run_cli("study", "enqueue", created, *[f"--param={k}={v}" for k, v in GOOD.items()])
    assert r.returncode == 0, r.stderr
    assert "queued in tools: strategy=fixed" in r.stdout
    workers.run(created, n_trials=2, progress=False)
    done = [t for t in st.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and done[1].params == GOOD  # the queued configuration ran, as given


def test_enqueue_errors_are_one_line_on_the_cli(created):
    r = run_cli("study", "enqueue", created, "--param", "strategy=fixed", "--param", "fixed.n_loops=99")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fixed.n_loops=99 is outside the space" in lines[0]


def failed_trial(st, params: dict):
    dists = {"strategy": CategoricalDistribution(["fixed"]), "fixed.n_loops": IntDistribution(2, 12),
             "fixed.train_loops": CategoricalDistribution(["constant", "uniform"]),
             "block_length": IntDistribution(1, 2), "loop_start": IntDistribution(0, 2)}
    st.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=dists,
                                           user_attrs={"seed": 0}))
    return st.get_trials()[-1].number


def test_retry_queues_a_failed_trial_with_its_parameters_and_history(created):
    st, _ = studies.load(created)
    number = failed_trial(st, GOOD)
    r = run_cli("study", "retry", created, str(number))
    assert r.returncode == 0, r.stderr
    assert f"trial {number} of tools queued again" in r.stdout
    retry = st.get_trials()[-1]
    assert retry.state == TrialState.WAITING and retry.params == GOOD
    assert retry.system_attrs["failed_trial"] == number and retry.system_attrs["retry_history"] == [number]
    with pytest.raises(LoopsearchError, match="is waiting: only failed trials are retried"):
        manage.retry(created, retry.number)
    # a second retry of the same failure would train beside the first in one state directory
    with pytest.raises(LoopsearchError, match=f"was retried already \\(as trial {retry.number}\\)"):
        manage.retry(created, number)
    with pytest.raises(LoopsearchError, match="has no trial 99"):
        manage.retry(created, 99)


def test_delete_asks_and_removes_the_checkpoints(created, tmp_path):
    _, spec = studies.load(created)
    root = studies.artifacts_root(spec)
    (root / "trial-0000").mkdir(parents=True)
    r = run_cli("study", "delete", created)  # stdin is not a terminal: no silent deletion
    assert r.returncode != 0 and "pass --yes" in r.stderr
    assert created in studies.study_names()
    r = run_cli("study", "delete", created, "--yes")
    assert r.returncode == 0, r.stderr
    assert created not in studies.study_names() and not root.exists()
    assert f"and {root}" in r.stdout


def test_listings_have_json(created):
    r = run_cli("study", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows == [{"name": "tools", "trials": 1, "best_val_nll": None, "created": rows[0]["created"]}]
    r = run_cli("spaces", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    quickstart = next(x for x in rows if x["name"] == "quickstart")
    assert quickstart["kind"] == "recipe" and "d=48" in quickstart["description"]
    assert any(x["kind"] == "space" and x["name"] == "early_middle" for x in rows)
