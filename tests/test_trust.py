"""Numbers with their errors: the validation's reported standard error matches the real spread
over mask draws, replicates and confirmations work end to end, and the leaderboard's rows carry
the intervals (loopsearch/stats.py, diffusion.validation_elbo, search/confirm.py, results/leaderboard.py)."""

from __future__ import annotations

import json
import statistics

import optuna
import pytest
import torch

from conftest import run_cli
from helpers import tiny_model
from loopsearch.results import leaderboard as lb
from loopsearch.search import study as studies
from loopsearch.search import workers
from loopsearch.search.space import BASELINE_ATTR
from loopsearch.data import PreparedData, validation_windows
from loopsearch.diffusion import validation_elbo
from loopsearch.spec import TrainConfig
from loopsearch import stats
from loopsearch.stats import paired_window_interval
from loopsearch.train import streams, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _text_data(vocab: int = 32) -> PreparedData:
    """A learnable synthetic corpus: a repeating random pattern with noise."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, vocab, (97,), generator=gen)
    ids = base.repeat(400)
    noise = torch.rand(ids.shape, generator=gen) < 0.2
    ids = torch.where(noise, torch.randint(0, vocab, ids.shape, generator=gen), ids)
    return PreparedData(ids[:30000], ids[30000:], "", vocab, "synthetic")


def test_reported_standard_error_matches_the_spread_over_mask_seeds():
    """Two tiny trained models, each scored under 12 mask keys: the SD of their val NLLs (unpaired)
    and of their difference (paired, same masks) agree with the mean reported SE within 2x."""
    data = _text_data()
    cfg = TrainConfig(batch_size=8, seq_len=32, lr=3e-3, min_steps=1, eval_points=1, eval_sequences=64)
    models = []
    for loop in (None, (1, 3, {"n_loops": 2})):
        model = tiny_model(vocab=32, seq_len=32, loop=loop)
        train(model, data, cfg, 4e9, seed=0, progress=False)
        models.append(model.eval())
    windows, keys = validation_windows(data.valid, 32, 200)
    nll = {0: [], 1: []}
    se = {0: [], 1: []}
    diffs, diff_se = [], []
    for seed in range(12):
        vals = [validation_elbo(m, windows, keys, 32, draws=2, seed=100 + seed) for m in models]
        for i, v in enumerate(vals):
            nll[i].append(v.nll)
            se[i].append(v.se)
        diffs.append(vals[1].nll - vals[0].nll)
        diff_se.append(paired_window_interval(vals[0].flat(12), vals[1].flat(12), 2).se)
    for i in (0, 1):
        spread, reported = statistics.stdev(nll[i]), statistics.fmean(se[i])
        assert 0.5 < reported / spread < 2.0, (i, reported, spread)
    spread, reported = statistics.stdev(diffs), statistics.fmean(diff_se)
    assert 0.5 < reported / spread < 2.0, (reported, spread)
    assert statistics.fmean(diff_se) < 0.6 * statistics.fmean(se[0])  # pairing removes most of the noise


def test_loop_count_draws_do_not_shift_the_data_order():
    """Separate streams: a trial that draws loop counts (uniform) sees the same batches as one
    that does not, and masks come from their own stream."""
    a, b = streams(3), streams(3)
    torch.randint(1, 4, (50,), generator=b["loops"])  # draw loop counts in one of them only
    assert torch.equal(torch.randint(0, 1000, (16,), generator=a["data"]),
                       torch.randint(0, 1000, (16,), generator=b["data"]))
    assert not torch.equal(torch.rand(4, generator=streams(3)["data"]), torch.rand(4, generator=streams(3)["masks"]))


def test_validation_masks_do_not_depend_on_the_batch_size():
    data = _text_data()
    model = tiny_model(vocab=32, seq_len=32).eval()
    windows, keys = validation_windows(data.valid, 32, 40)
    a = validation_elbo(model, windows, keys, 32, draws=2, seed=0, batch_size=3)
    b = validation_elbo(model, windows, keys, 32, draws=2, seed=0, batch_size=40)
    assert torch.allclose(a.values, b.values, atol=1e-5)


@pytest.fixture
def seeded_study(tiny_recipe):
    """A tiny search with 2 seeds per trial: baseline + 2 searched trials."""
    spec = studies.spec_from_options("rep", "early_middle", str(tiny_recipe), None, None, None, None, 3, seeds=2)
    assert spec.space.seeds == 2 and spec.seeds == 2
    studies.create(spec)
    assert workers.run("rep", progress=False) == 3
    return studies.load("rep")


def test_seeds_train_every_configuration_with_each_seed(seeded_study):
    st, spec = seeded_study
    for t in st.get_trials():
        a = t.user_attrs
        assert t.state == optuna.trial.TrialState.COMPLETE
        rows = a["seed_results"]
        assert [r["seed_offset"] for r in rows] == [0, 1] and a["seeds"] == 2
        assert t.value == pytest.approx(statistics.fmean(r["val_nll"] for r in rows))
        assert a["train_flops"] == pytest.approx(sum(r["train_flops"] for r in rows))  # both seeds are paid for
        assert rows[0]["val_nll"] != rows[1]["val_nll"]  # a different initialisation and data order
        assert a["seed_lo"] < a["val_nll"] < a["seed_hi"]
    df = lb.frame(studies=["rep"])
    looped = df.filter(~df["baseline"]).row(0, named=True)
    assert looped["seeds"] == 2 and looped["delta_basis"] == "2 seeds"
    assert looped["delta_lo"] < looped["delta_nll"] < looped["delta_hi"]
    # t with 1 degree of freedom: the half-width is 12.706 standard errors
    assert (looped["delta_hi"] - looped["delta_nll"]) == pytest.approx(12.706 * looped["delta_se"], rel=1e-3)
    # does a looped trial differ from the other beyond seed noise? the F test on their 2 shared seeds
    (line,) = lb.spread_tests(studies=["rep"])
    by_seed = [[r["val_nll"] for r in t.user_attrs["seed_results"]] for t in st.get_trials()
               if not t.user_attrs.get(BASELINE_ATTR)]
    a = stats.blocked_anova(by_seed)
    assert line.startswith("rep: of its 2 looped trials (paired by seeds 0, 1), ")
    assert f"F(1, 1) = {a.f:.2f}, p = {a.p:.2g}" in line and ("a tie" in line) == (not a.differ())
    table = run_cli("leaderboard", "--study", "rep")
    assert "of its 2 looped trials (paired by seeds 0, 1)" in " ".join(table.stdout.split())


def test_confirm_retrains_top_trials_and_the_baseline_with_new_seeds(seeded_study):
    st, spec = seeded_study
    r = run_cli("study", "confirm", "rep", "--top", "1", "--seeds", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "confirming trials" in r.stdout and "Δ base" in r.stdout
    st, _ = studies.load("rep")
    confirms = [t for t in st.get_trials() if t.user_attrs.get(studies.CONFIRM_OF_ATTR) is not None]
    assert len(confirms) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in confirms)
    assert all(t.user_attrs[studies.CONFIRM_SEEDS_ATTR] == [2] for t in confirms)
    df = lb.frame(studies=["rep"])
    assert len(df) == 3  # merged into the trials they confirm
    confirmed = df.filter(df["trial"].is_in([t.user_attrs[studies.CONFIRM_OF_ATTR] for t in confirms]))
    assert confirmed["seeds"].to_list() == [3, 3] and confirmed["confirmed"].all()
    others = df.filter(~df["trial"].is_in(confirmed["trial"].to_list()))
    assert others["seeds"].to_list() == [2] and not others["confirmed"].any()  # 2 seeds, never confirmed
    looped = confirmed.filter(~confirmed["baseline"]).row(0, named=True)
    assert looped["delta_basis"] == "3 seeds"
    # after a confirmation only the confirmed looped trials count, on the new seeds: one trial, one seed
    assert lb.spread_tests(studies=["rep"]) == []
    # the study's own trial count is unchanged: `study run` has nothing more to do
    assert workers.run("rep", progress=False) == 0
    # a second confirmation uses seeds after every one used so far
    from loopsearch.search import confirm

    planned = confirm.plan(st, top=1, seeds=2)
    assert all(offsets == [3, 4] for _, offsets in planned)
    # confirming both looped trials with 2 new seeds each (after each one's own: 3, 4 and 2, 3): the F
    # test pairs them on the confirmation seeds both have (2, 3), never on 0 and 1, which ranked them
    r = run_cli("study", "confirm", "rep", "--top", "2", "--seeds", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    again = [t for t in studies.load("rep")[0].get_trials() if t.user_attrs.get(studies.CONFIRM_SEEDS_ATTR) == [3, 4]
             or t.user_attrs.get(studies.CONFIRM_SEEDS_ATTR) == [2, 3]]
    # never pruned: Optuna's default median pruner pruned these once the study had 5 finished trials
    assert len(again) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in again)
    (line,) = lb.spread_tests(studies=["rep"])
    assert line.startswith("rep: of its 2 confirmed trials (paired by their confirmation seeds 2, 3), ")


def test_leaderboard_json_carries_errors_intervals_and_ties(tiny_recipe):
    spec = studies.spec_from_options("one", "early_middle", str(tiny_recipe), None, None, None, None, 2)
    studies.create(spec)
    workers.run("one", progress=False)
    r = run_cli("leaderboard", "--study", "one", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    for row in rows:
        for key in ("val_nll", "val_nll_se", "val_nll_lo", "val_nll_hi", "seeds", "delta_nll", "delta_se",
                    "delta_lo", "delta_hi", "delta_basis", "tie", "vs_baseline"):
            assert key in row
        assert row["val_nll_lo"] < row["val_nll"] < row["val_nll_hi"]
    looped = next(row for row in rows if not row["baseline"])
    # one seed each: paired on identical windows and masks (validation noise only)
    assert looped["delta_basis"] == "masks" and looped["delta_se"] > 0
    assert looped["tie"] == (looped["delta_lo"] <= 0 <= looped["delta_hi"])
    assert looped["vs_baseline"] == ("tie" if looped["tie"] else ("better" if looped["delta_hi"] < 0 else "worse"))
    table = run_cli("leaderboard", "--study", "one")
    assert "Δ base [95% CI]" in table.stdout and looped["vs_baseline"] in table.stdout
    assert lb.spread_tests(studies=["one"]) == [] and "seed noise" not in table.stdout  # one seed: no F test


def test_head_only_at_masked_positions_gives_the_same_validation():
    """validation_elbo runs the head only where the loss is (LoopedMDM.forward positions=); the
    values equal those from full logits."""
    data = _text_data()
    model = tiny_model(vocab=32, seq_len=32, loop=(1, 3, {"n_loops": 2})).eval()
    windows, keys = validation_windows(data.valid, 32, 24)

    class Full:  # a model without the positions path
        def __call__(self, *args, **kwargs):
            return model(*args, **kwargs)

    fast = validation_elbo(model, windows, keys, 32, draws=2, seed=1)
    full = validation_elbo(Full(), windows, keys, 32, draws=2, seed=1)
    assert torch.allclose(fast.values, full.values, atol=1e-5)


def test_the_trial_record_is_typed_and_round_trips(seeded_study):
    """What the objective stores reads back as a validated TrialRecord (the contract between the
    search and the results)."""
    from loopsearch.search.record import TrialRecord

    st, _ = seeded_study
    for t in st.get_trials():
        r = TrialRecord.of(t)
        assert r.val_nll == t.user_attrs["val_nll"] and r.seeds == 2 and len(r.seed_results) == 2
        assert r.seed_results[1].seed_offset == 1 and r.seed_results[1].attrs["val_draws"] == 2
        assert r.strategy in ("none", "fixed") and r.history and len(r.history[0]) == 3
    with pytest.raises(ValueError):
        TrialRecord.attrs(val_nll="not a number")
