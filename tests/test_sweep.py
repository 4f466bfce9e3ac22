"""Budget sweeps: arms at a ladder of budgets, paired differences and the crossover budget."""

import json
import math

import polars as pl
import pytest

from conftest import run_cli
from loopsearch import stats
from loopsearch.experiments import sweep as sweeping
from loopsearch.results import report, sweep
from loopsearch.search import study as studies
from loopsearch.errors import LoopsearchError

ARMS = """name = "pair"
[arms.baseline]
[arms.looped]
strategy = "fixed"
params = { n_loops = 2, train_loops = "uniform" }
block = [1, 3]
"""


def rows(deltas, ses=None, df=None):
    """Paired rows of one arm at budgets 1e12, 2e12, ...: intervals from s.e. and t on df (None: normal)."""
    budgets = [1e12 * 2 ** k for k in range(len(deltas))]
    ses = ses or [None] * len(deltas)
    out = []
    for b, d, s in zip(budgets, deltas, ses):
        iv = stats.Interval(d, s, df)
        out.append({"arm": "looped", "budget": b, "delta": d, "se": s, "lo": iv.lo, "hi": iv.hi, "df": df, "pairs": 2})
    return out


def test_crossover_is_log_interpolated_where_the_difference_turns_negative():
    c = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3], [0.01] * 4))
    assert c["budget"] == pytest.approx(math.exp((math.log(2e12) + math.log(4e12)) / 2))  # halfway in log budget
    assert c["verdict"].startswith("crosses at") and c["kind"] == "crosses"
    # without intervals the same change of sign is no crossover, only an inconclusive one
    bare = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3]))
    assert bare["kind"] == "inconclusive" and bare["verdict"].startswith("inconclusive crossing")
    assert bare["budget"] == pytest.approx(c["budget"]) and bare["low"] is None and bare["high"] is None


def test_tight_intervals_cross_with_a_crossing_interval():
    c = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3], [0.05] * 4))  # 95% half-width 0.098 (normal)
    assert c["kind"] == "crosses"
    assert 2e12 < c["low"] < c["budget"] < c["high"] < 4e12  # the lower bound curve crosses first
    h = 1.959964 * 0.05
    lo0, lo1, hi0, hi1 = 0.1 - h, -0.1 - h, 0.1 + h, -0.1 + h  # the bound curves at 2e12 and 4e12
    assert c["low"] == pytest.approx(2e12 * 2 ** (lo0 / (lo0 - lo1)), rel=1e-6)
    assert c["high"] == pytest.approx(2e12 * 2 ** (hi0 / (hi0 - hi1)), rel=1e-6)


def test_wide_intervals_make_the_crossing_inconclusive():
    wide = sweep.crossover(rows([0.2, 0.1, -0.1, -0.3], [0.5] * 4))
    assert wide["kind"] == "inconclusive" and wide["verdict"].startswith("inconclusive crossing")
    assert "2e+12: tie" in wide["verdict"] and "4e+12: tie" in wide["verdict"]
    assert wide["low"] is None  # the lower bound is below zero at the first budget already: outside the ladder
    assert wide["high"] is None  # and the upper bound never turns negative
    # two seeds: t with 1 degree of freedom turns a 'normal' crossing into an inconclusive one
    assert sweep.crossover(rows([0.2, 0.1, -0.1, -0.3], [0.05] * 4, df=1))["kind"] == "inconclusive"


@pytest.mark.parametrize("deltas", [(0.1, -0.1, 0.1, 0.1), (-0.1, 0.1, -0.1, -0.1)])
def test_more_than_one_change_of_sign_is_mixed(deltas):
    c = sweep.crossover(rows(list(deltas), [0.001] * 4))
    assert c["kind"] == "mixed" and c["verdict"].startswith("mixed") and c["budget"] is None
    assert "changes 2 time(s)" in c["verdict"]


def test_crossover_verdicts_without_a_change_of_sign():
    wins = sweep.crossover(rows([-0.1, -0.2]))
    assert wins["verdict"].startswith("wins at every budget") and wins["kind"] == "wins"
    loses = sweep.crossover(rows([0.1, 0.2], [0.01, 0.01]))
    assert loses["verdict"].startswith("no crossover up to 2e+12") and loses["kind"] == "loses"
    assert "loses at 95% at the largest budget" in loses["verdict"]
    tie = sweep.crossover(rows([0.1, 0.2], [0.01, 0.5]))
    assert "tie at the largest budget" in tie["verdict"]
    mixed = sweep.crossover(rows([-0.1, 0.2]))  # wins below a budget where it loses: no crossover
    assert mixed["verdict"].startswith("mixed") and mixed["kind"] == "mixed"


def frame_of(arms):
    """A sweep frame from {(arm, budget, seed): val_nll or (val_nll, windows, draws, key)}."""
    recs = []
    for i, ((arm, budget, seed), v) in enumerate(arms.items()):
        nll, windows, draws, key = v if isinstance(v, tuple) else (v, None, None, None)
        recs.append({"trial": i, "arm": arm, "budget": budget, "budget_scale": 1.0, "seed_offset": seed,
                     "val_nll": nll, "train_flops": budget, "steps": 1, "val_windows": windows, "val_draws": draws,
                     "eval_key": key})
    return pl.DataFrame(recs, schema={
        "trial": pl.Int64, "arm": pl.Utf8, "budget": pl.Float64, "budget_scale": pl.Float64, "seed_offset": pl.Int64,
        "val_nll": pl.Float64, "train_flops": pl.Float64, "steps": pl.Int64, "val_windows": pl.List(pl.Float64),
        "val_draws": pl.Int64, "eval_key": pl.Utf8})


def test_two_seeds_use_t_with_one_degree_of_freedom():
    df = frame_of({("baseline", 1e12, 0): 3.0, ("baseline", 1e12, 1): 3.1,
                   ("looped", 1e12, 0): 3.2, ("looped", 1e12, 1): 3.1})
    (r,) = sweep.paired(df, "baseline")
    assert r["delta"] == pytest.approx(0.1) and r["pairs"] == 2 and r["df"] == 1
    se = math.sqrt(0.02) / math.sqrt(2)  # the differences are 0.2 and 0.0: s.d. 0.141, s.e. 0.1
    assert r["se"] == pytest.approx(se)
    assert r["hi"] - r["delta"] == pytest.approx(12.7062 * se, rel=1e-4)
    assert r["lo"] < 0 < r["hi"] and r["verdict"] == "tie"  # 2 s.e. would have called it a loss
    assert "significant" not in r


def test_one_seed_uses_the_paired_validation_noise_or_no_interval():
    base = [3.0, 3.2, 2.9, 3.1]  # 2 windows x 2 draws
    arm = [3.1, 3.3, 3.0, 3.2]  # exactly 0.1 worse on every draw: no Monte-Carlo spread
    arm_noisy = [3.2, 3.2, 3.0, 3.2]
    df = frame_of({("baseline", 1e12, 0): (3.05, base, 2, "k"), ("looped", 1e12, 0): (3.15, arm_noisy, 2, "k"),
                   ("baseline", 2e12, 0): (3.0, base, 2, "k"), ("looped", 2e12, 0): (3.1, arm, 2, "other")})
    r1, r2 = sweep.paired(df, "baseline")
    mc = stats.paired_window_interval(base, arm_noisy, 2)
    assert r1["basis"] == sweep.MC_ONLY and r1["se"] == pytest.approx(mc.se) and r1["lo"] == pytest.approx(mc.lo)
    assert r1["delta"] == pytest.approx(0.1) and r1["verdict"] == "tie"  # s.e. 0.05 on 2 df: half-width 0.215
    # different evaluation keys: not scored on the same masks, so no pairing and no interval
    assert r2["se"] is None and r2["lo"] is None and r2["verdict"] == "no interval (1 seed)" and r2["basis"] is None


def test_scales_parse_and_reject_nonsense():
    assert sweeping.parse_scales("x1,x2, x4,8") == [1.0, 2.0, 4.0, 8.0]
    with pytest.raises(LoopsearchError, match="not a number"):
        sweeping.parse_scales("1,two")
    with pytest.raises(LoopsearchError, match="positive"):
        sweeping.parse_scales("0,1")


def test_sweep_command_runs_every_arm_at_every_budget_and_seed(tiny_recipe, tmp_path):
    space = tmp_path / "pair.toml"
    space.write_text(ARMS)
    r = run_cli("sweep", "--name", "iso", "--recipe", str(tiny_recipe), "--space", str(space), "--scales", "1,2,4",
                "--seeds", "2", "--budget", "2e9", "--train-tokens", "4000", "--no-progress", "--json",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["baseline"] == "baseline"
    assert sorted((p["budget"], p["pairs"]) for p in result["paired"]) == [(2e9, 2), (4e9, 2), (8e9, 2)]
    assert all(p["se"] is not None for p in result["paired"])
    assert set(result["crossover"]) == {"looped"}
    fit = result["fit"]["looped"]  # three budgets: a power-law fit per arm, no held-out check (needs 4)
    assert fit["fitted_budgets"] == [2e9, 4e9, 8e9] and fit["bootstrap"] > 0 and "check" not in fit
    assert set(fit["fit"]) == {"baseline", "looped"} and fit["words"]
    st, spec = studies.load("iso")
    assert spec.train.train_tokens == 4000 and spec.n_trials == 12
    done = [t for t in st.get_trials() if t.state.name == "COMPLETE"]
    assert sorted((t.user_attrs["arm"], t.user_attrs["budget"], t.user_attrs["seed_offset"]) for t in done) == sorted(
        (a, b, s) for a in ("baseline", "looped") for b in (2e9, 4e9, 8e9) for s in (0, 1))
    # the two seeds train differently; the same seed sees the same data in both arms
    base = {(t.user_attrs["budget"], t.user_attrs["seed_offset"]): t.user_attrs["val_nll"] for t in done
            if t.user_attrs["arm"] == "baseline"}
    assert base[(2e9, 0)] != base[(2e9, 1)]
    rep = report.write("iso", tmp_path / "rep")
    sec = next(s for s in rep.sections if s.key == "sweep")
    assert sec.image == "iso_flop.png" and (tmp_path / "rep" / "iso_flop.png").stat().st_size > 5000
    assert len(sec.rows) == 3 and "Fit, looped:" in sec.caption
    r = run_cli("sweep", "--name", "iso")  # finished: prints the tables, the fit included
    assert r.returncode == 0 and "iso-FLOP fit" in r.stdout, r.stderr


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
