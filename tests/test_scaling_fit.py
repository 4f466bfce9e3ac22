"""Iso-FLOP fits (loopsearch/results/scaling_fit.py) on synthetic sweeps with a known answer."""

import math

import numpy as np
import pytest

from loopsearch.results import scaling_fit as sf

BUDGETS = [1e12, 2e12, 4e12, 8e12, 16e12]


def synthetic(base=(2.0, 1.0, 0.5), arm=(1.8, 1.5, 0.5), budgets=BUDGETS, seeds=3, noise=0.005, seed=0):
    """Rows of a sweep whose arms follow E + A (C/1e12)^-alpha plus a per-seed offset shared by
    both arms (what pairing by seed removes) and independent noise. With the defaults the
    curves cross where 0.5 x^-0.5 = 0.2: x = 6.25, C* = 6.25e12."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in budgets:
        x = b / 1e12
        for s in range(seeds):
            shared = rng.normal(0, 0.02)
            for name, (e, a, alpha) in (("baseline", base), ("looped", arm)):
                rows.append({"arm": name, "budget": b, "seed_offset": s,
                             "val_nll": e + a * x ** -alpha + shared + rng.normal(0, noise)})
    return rows


def test_the_fit_recovers_a_noise_free_power_law():
    c = np.array(BUDGETS)
    law = sf.fit_power_law(c, 1.5 + 0.8 * (c / 1e12) ** -0.3)
    assert law.e == pytest.approx(1.5, abs=1e-3) and law.a == pytest.approx(0.8, abs=1e-3)
    assert law.alpha == pytest.approx(0.3, abs=1e-3) and law.c0 == 1e12


def test_the_fit_respects_its_bounds_and_needs_three_budgets():
    law = sf.fit_power_law([1, 2, 4, 8], [3.0, 2.0, 1.5, 1.0])  # steep: E pushed to its bounds
    assert 0.0 <= law.e <= 1.0 and law.a >= 0 and sf.ALPHA_BOUNDS[0] <= law.alpha <= sf.ALPHA_BOUNDS[1]
    with pytest.raises(ValueError, match="at least 3 budgets"):
        sf.fit_power_law([1, 2, 2], [3.0, 2.0, 2.1])


def test_a_known_crossover_is_predicted_inside_its_interval():
    p = sf.predict(synthetic(), "baseline", "looped", n_boot=200)
    assert p["crossover"] == pytest.approx(6.25e12, rel=0.1)
    assert p["crossover_lo"] <= 6.25e12 <= p["crossover_hi"]
    assert p["boot_share_crossing"] == 1.0 and not p["wins_from_start"]
    assert "predicted crossover at 6." in p["words"]


def test_the_held_out_budget_is_checked_against_the_measurement():
    p = sf.predict(synthetic(), "baseline", "looped", hold_out=16e12, n_boot=200)
    assert p["fitted_budgets"] == BUDGETS[:4]  # the held-out budget is not fitted
    h = p["hold_out"]
    true_delta = (1.8 + 1.5 * 16 ** -0.5) - (2.0 + 1.0 * 16 ** -0.5)
    assert h["predicted_delta"] == pytest.approx(true_delta, abs=0.02)
    assert h["measured_delta"] == pytest.approx(true_delta, abs=0.02) and h["seeds"] == 3
    assert h["within"] is True and "inside the predicted interval" in sf.hold_out_words(h)
    # a measurement far from the power law is flagged
    rows = [dict(r, val_nll=r["val_nll"] + (0.5 if r["arm"] == "looped" and r["budget"] == 16e12 else 0))
            for r in synthetic()]
    bad = sf.predict(rows, "baseline", "looped", hold_out=16e12, n_boot=200)["hold_out"]
    assert bad["within"] is False and "outside" in sf.hold_out_words(bad)


def test_parallel_curves_never_cross_and_the_interval_says_so():
    p = sf.predict(synthetic(arm=(2.1, 1.0, 0.5)), "baseline", "looped", n_boot=200)
    assert p["crossover"] is None and p["boot_share_crossing"] < 0.5
    assert math.isinf(p["crossover_hi"]) and "no crossover predicted below" in p["words"]
    assert "beyond the horizon" in p["words"]


def test_an_arm_that_wins_everywhere_is_not_called_a_crossing():
    p = sf.predict(synthetic(arm=(1.7, 0.9, 0.5)), "baseline", "looped", n_boot=50)
    assert p["wins_from_start"] and "already below the baseline" in p["words"]


def test_analyse_fits_every_arm_and_checks_with_four_or_more_budgets():
    out = sf.analyse(synthetic(), "baseline", n_boot=50)
    assert set(out) == {"looped"} and "check" in out["looped"]
    three = sf.analyse(synthetic(budgets=BUDGETS[:3]), "baseline", n_boot=50)
    assert "check" not in three["looped"] and three["looped"]["fit"]["looped"]["alpha"] > 0
    two = sf.analyse(synthetic(budgets=BUDGETS[:2]), "baseline", n_boot=50)
    assert "needs 3" in two["looped"]["skipped"]


def test_one_seed_gives_a_fit_without_an_interval():
    p = sf.predict(synthetic(seeds=1), "baseline", "looped")
    assert p["bootstrap"] == 0 and p["crossover_lo"] is None and "95%" not in p["words"]
