"""loopsearch/stats.py on hand-built cases: t quantiles, intervals over seeds and mask draws, verdicts."""

import math

import pytest

from loopsearch import stats
from loopsearch.stats import Interval


def test_t_quantiles_use_the_degrees_of_freedom():
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile(0.975, None) == pytest.approx(1.960, abs=1e-3)
    assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.975, 0.5)


def test_mean_interval_of_three_values():
    iv = stats.mean_interval([1, 2, 3])
    se = 1 / math.sqrt(3)  # s.d. 1
    assert (iv.mean, iv.df, iv.n) == (2.0, 2, 3)
    assert iv.se == pytest.approx(0.577, abs=1e-3) and iv.se == pytest.approx(se)
    assert iv.lo == pytest.approx(2 - 4.303 * se, abs=1e-3) and iv.hi == pytest.approx(2 + 4.303 * se, abs=1e-3)
    assert iv.half_width == pytest.approx(stats.t_quantile(0.975, 2) * se)
    assert iv.text() == f"+2.0000 [{iv.lo:+.4f}, {iv.hi:+.4f}]"
    d = iv.as_dict("delta")
    assert d == {"delta": 2.0, "delta_se": iv.se, "delta_lo": iv.lo, "delta_hi": iv.hi}
    with pytest.raises(ValueError, match="no values"):
        stats.mean_interval([])


def test_a_single_value_has_no_interval():
    iv = stats.mean_interval([0.3])
    assert iv.mean == 0.3 and iv.se is None and iv.lo is None and iv.hi is None and iv.tie is None
    assert iv.text() == "+0.3000"
    assert stats.verdict(iv) == "inconclusive" and stats.tie_words(iv) == ""


def test_window_interval_is_the_monte_carlo_variance_given_the_windows():
    # 3 windows x 2 draws; window-major: index w * draws + r
    values = [1.0, 3.0, 2.0, 2.0, 4.0, 0.0]
    iv = stats.window_interval(values, draws=2)
    # within-window variances: 2, 0, 8; Var(mean) = (2 + 0 + 8) / 2 / 3^2 = 10 / 18
    assert iv.mean == pytest.approx(2.0)
    assert iv.se == pytest.approx(math.sqrt(10 / 18))
    assert iv.df == 3 * (2 - 1)
    assert iv.half_width == pytest.approx(stats.t_quantile(0.975, 3) * math.sqrt(10 / 18))
    # the spread between windows is not Monte-Carlo noise: equal draws give no error at all
    assert stats.window_interval([1.0, 1.0, 5.0, 5.0], draws=2).se == 0.0
    with pytest.raises(ValueError, match=">= 2 mask draws"):
        stats.window_interval(values, draws=1)
    with pytest.raises(ValueError, match="do not split"):
        stats.window_interval(values, draws=4)


def test_paired_window_interval_is_the_interval_of_the_differences():
    a = [1.0, 3.0, 2.0, 2.0, 4.0, 0.0]
    b = [1.5, 3.0, 2.5, 2.0, 4.0, 1.0]
    paired = stats.paired_window_interval(a, b, 2)
    direct = stats.window_interval([y - x for x, y in zip(a, b)], 2)
    assert paired == direct
    assert paired.mean == pytest.approx(2.0 / 6)  # b - a
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_window_interval(a, b[:4], 2)


def test_paired_results_pair_only_the_same_windows_and_masks():
    a = {"val_windows": [1.0, 3.0, 2.0, 2.0], "val_draws": 2, "eval_key": "k"}
    b = {"val_windows": [1.5, 3.0, 2.5, 2.0], "val_draws": 2, "eval_key": "k"}
    assert stats.paired_results(a, b) == stats.paired_window_interval(a["val_windows"], b["val_windows"], 2)
    assert stats.paired_results(a, {**b, "eval_key": "other"}) is None
    assert stats.paired_results(a, {**b, "val_draws": 4}) is None
    assert stats.paired_results({"val_nll": 1.0}, b) is None
    assert stats.paired_results({**a, "eval_key": None}, {**b, "eval_key": None}) is None


def test_verdicts_need_the_interval_to_exclude_zero():
    # a 0.001 lead with a 0.005 standard error is noise, not agreement
    assert stats.verdict(Interval(0.001, 0.005, 10)) == "inconclusive"
    assert stats.verdict(Interval(0.001, 0.005)) == "inconclusive"
    assert stats.verdict(Interval(0.05, 0.01, 10)) == "agrees"  # [0.028, 0.072]
    assert stats.verdict(Interval(-0.05, 0.01, 10)) == "disagrees"
    # 2 s.e. is not enough with 1 degree of freedom
    assert stats.verdict(Interval(0.05, 0.02, 1)) == "inconclusive"
    assert stats.verdict(Interval(0.05, 0.02, None)) == "agrees"


def test_tie_words():
    assert stats.tie_words(Interval(0.001, 0.005, 5)) == "tie"
    assert stats.tie_words(Interval(-0.05, 0.01, 5)) == "better"
    assert stats.tie_words(Interval(0.05, 0.01, 5)) == "worse"
    assert stats.tie_words(Interval(-0.05, 0.01, 5), "wins", "loses") == "wins"
    assert stats.tie_words(Interval(0.05, None)) == ""
    assert Interval(0.001, 0.005, 5).tie is True and Interval(0.05, 0.01, 5).tie is False


def test_wilson_interval_for_accuracies():
    from loopsearch.stats import proportion_interval

    lo, hi = proportion_interval(0, 8)
    assert lo == 0.0 and 0.3 < hi < 0.33  # 0 of 8 correct still allows ~32%
    lo, hi = proportion_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    with pytest.raises(ValueError):
        proportion_interval(0, 0)


def test_blocked_anova_matches_the_textbook_two_way_table():
    # arms x seeds; a seed effect shared by every arm must not count as noise
    rows = [[1.0, 2.0, 3.0], [1.5, 2.5, 3.5], [1.2, 2.1, 3.3]]
    a = stats.blocked_anova(rows)
    # by hand: arm means 2, 2.5, 2.2; grand 2.2333; SS arms 0.38 on 2 df, residual SS 0.01333 on 4 df:
    # F = 0.19 / 0.003333 = 57, p = 0.00115 (F(2, 4) upper tail)
    assert (a.df_arms, a.df_residual) == (2, 4)
    assert a.f == pytest.approx(57.0) and a.p == pytest.approx(0.001149, rel=1e-3)
    ss_arms = 3 * ((2 - 6.7 / 3) ** 2 + (2.5 - 6.7 / 3) ** 2 + (2.2 - 6.7 / 3) ** 2)
    block = [(1 + 1.5 + 1.2) / 3, (2 + 2.5 + 2.1) / 3, (3 + 3.5 + 3.3) / 3]
    arm = [2.0, 2.5, 2.2]
    ss_res = sum((rows[i][j] - arm[i] - block[j] + 6.7 / 3) ** 2 for i in range(3) for j in range(3))
    assert a.f == pytest.approx((ss_arms / 2) / (ss_res / 4))
    from scipy import stats as st
    assert a.p == pytest.approx(st.f.sf(a.f, 2, 4))
    assert a.snr == pytest.approx(math.sqrt(a.f))
    assert a.differ()  # 0.5 nats apart with residual noise ~0.1
    # the same arms without the shared seed effect but with the residuals: identical F
    shifted = [[v - b for v, b in zip(r, block)] for r in rows]
    assert stats.blocked_anova(shifted).f == pytest.approx(a.f)


def test_blocked_anova_calls_arms_of_one_mean_a_tie_about_as_often_as_it_should():
    import random
    rng = random.Random(0)
    rejections = 0
    for _ in range(400):
        seed_effect = [rng.gauss(0, 1.0) for _ in range(3)]  # large, shared: removed by blocking
        rows = [[3.0 + s + rng.gauss(0, 0.05) for s in seed_effect] for _ in range(10)]
        rejections += stats.blocked_anova(rows).differ()
    assert 5 <= rejections <= 40  # 5% of 400 = 20
    # a real difference of 4 residual sds between two halves of ten arms is found
    rows = [[3.0 + s + rng.gauss(0, 0.05) + (0.2 if i < 5 else 0) for s in (0.3, -0.2, 0.5)] for i in range(10)]
    assert stats.blocked_anova(rows).p < 0.05


def test_blocked_anova_edge_cases():
    same = stats.blocked_anova([[1.0, 2.0], [1.0, 2.0]])  # two identical runs: no difference, not infinite F
    assert same.f == 0.0 and same.p == 1.0 and not same.differ() and math.isnan(same.snr)
    exact = stats.blocked_anova([[1.0, 2.0], [1.5, 2.5]])  # a constant difference, no noise at all
    assert exact.f == math.inf and exact.p == 0.0 and exact.differ()
    with pytest.raises(ValueError, match="finite values"):
        stats.blocked_anova([[1.0, float("nan")], [1.0, 2.0]])


def test_blocked_anova_refuses_an_incomplete_table():
    with pytest.raises(ValueError, match=">= 2 arms and >= 2 seeds"):
        stats.blocked_anova([[1.0, 2.0]])
    with pytest.raises(ValueError, match="every arm needs a value in every block"):
        stats.blocked_anova([[1.0, 2.0], [1.0]])
