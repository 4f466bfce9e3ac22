"""Budget sweeps: arms at a ladder of budgets, paired differences and the crossover budget."""

import json
import math

import pytest

from conftest import run_cli
from loopsearch import report, sweep
from loopsearch import study as studies
from loopsearch.errors import LoopsearchError

ARMS = """name = "pair"
[arms.baseline]
[arms.looped]
strategy = "fixed"
params = { n_loops = 2, train_loops = "uniform" }
block = [1, 3]
"""


def rows(deltas, ses=None):
    budgets = [1e12 * 2 ** k for k in range(len(deltas))]
    ses = ses or [None] * len(deltas)
    return [{"arm": "looped", "budget": b, "delta": d, "se": s, "pairs": 2} for b, d, s in zip(budgets, deltas, ses)]


def test_crossover_is_log_interpolated_where_the_difference_turns_negative():
    c = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3]))
    assert c["budget"] == pytest.approx(math.exp((math.log(2e12) + math.log(4e12)) / 2))  # halfway in log budget
    assert c["verdict"].startswith("crosses at")


def test_crossover_interval_comes_from_one_standard_error():
    c = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3], [0.05, 0.05, 0.05, 0.05]))
    assert c["low"] < c["budget"] < c["high"]  # the optimistic curve crosses first
    wide = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3], [0.5, 0.5, 0.5, 0.5]))
    assert wide["low"] is None  # mean - s.e. is below zero at the first budget already: outside the ladder


def test_crossover_verdicts_without_a_change_of_sign():
    assert sweep.crossover(rows([-0.1, -0.2]))["verdict"].startswith("wins at every budget")
    assert sweep.crossover(rows([0.1, 0.2]))["verdict"].startswith("no crossover up to 2e+12")
    assert sweep.crossover(rows([-0.1, 0.2]))["verdict"].startswith("mixed")


def test_scales_parse_and_reject_nonsense():
    assert sweep.parse_scales("x1,x2, x4,8") == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(LoopsearchError, match="not a number"):
        sweep.parse_scales("1,two")
    with pytest.raises(LoopsearchError, match="positive"):
        sweep.parse_scales("0,1")


def test_sweep_command_runs_every_arm_at_every_budget_and_seed(tiny_recipe, tmp_path):
    space = tmp_path / "pair.toml"
    space.write_text(ARMS)
    r = run_cli("sweep", "--name", "iso", "--recipe", str(tiny_recipe), "--space", str(space), "--scales", "1,2",
                "--seeds", "2", "--budget", "2e9", "--train-tokens", "4000", "--no-progress", "--json",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["baseline"] == "baseline"
    assert sorted((p["budget"], p["pairs"]) for p in result["paired"]) == [(2e9, 2), (4e9, 2)]
    assert all(p["se"] is not None for p in result["paired"])
    assert set(result["crossover"]) == {"looped"}
    st, spec = studies.load("iso")
    assert spec.train.train_tokens == 4000 and spec.n_trials == 8
    done = [t for t in st.get_trials() if t.state.name == "COMPLETE"]
    assert sorted((t.user_attrs["arm"], t.user_attrs["budget"], t.user_attrs["seed_offset"]) for t in done) == sorted(
        (a, b, s) for a in ("baseline", "looped") for b in (2e9, 4e9) for s in (0, 1))
    # the two seeds train differently; the same seed sees the same data in both arms
    base = {(t.user_attrs["budget"], t.user_attrs["seed_offset"]): t.user_attrs["val_nll"] for t in done
            if t.user_attrs["arm"] == "baseline"}
    assert base[(2e9, 0)] != base[(2e9, 1)]
    rep = report.write("iso", tmp_path / "rep")
    sec = next(s for s in rep.sections if s.key == "sweep")
    assert sec.image == "iso_flop.png" and (tmp_path / "rep" / "iso_flop.png").stat().st_size > 5000
    assert len(sec.rows) == 2


def test_sweep_needs_an_arms_space_and_the_baseline(tiny_recipe):
    r = run_cli("sweep", "--recipe", str(tiny_recipe), "--no-run")
    assert r.returncode == 2 and "has no [arms.NAME] tables" in r.stderr
    r = run_cli("sweep", "--arms", "early_middle,late", "--no-run")
    assert r.returncode == 2 and "keep the baseline arm" in r.stderr, r.stderr


def test_data_limited_training_draws_only_from_the_first_tokens(monkeypatch, tiny_recipe):
    import loopsearch.train as train_mod

    seen = []
    real = train_mod.random_batch
    monkeypatch.setattr(train_mod, "random_batch", lambda ids, *a: seen.append(len(ids)) or real(ids, *a))
    space_spec = studies.spec_from_options("d", None, str(tiny_recipe), None, None, None, None, 1)
    config = studies.trial_config(space_spec, 0, studies.BASELINE)
    config = config.model_copy(update={"train": config.train.model_copy(update={"train_tokens": 500})})
    from loopsearch import checkpoint
    from loopsearch.data import prepare
    from loopsearch.registry import get_registry

    corpus = get_registry().get("corpus", "shakespeare")
    data = prepare(corpus(corpus.Params()), config.vocab_size)
    train_mod.train(checkpoint.build_model(config, data.vocab_size), data, config.train, 1e9, 0, progress=False)
    assert seen and set(seen) == {500}
