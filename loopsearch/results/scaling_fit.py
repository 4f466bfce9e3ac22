"""Iso-FLOP curve fits: L(C) = E + A * (C / C0)^-alpha per arm of a budget sweep, the crossover
budget they predict, and a check of the prediction against a budget held out of the fit.

A sweep (loopsearch/results/sweep.py) measures each arm's final val NLL at a ladder of training
budgets C. Here each arm's mean over seeds is fitted with a saturating power law (E: the loss the
arm approaches with unlimited compute at this data and shape; A, alpha: how fast it gets there;
C0: the smallest budget, for conditioning). Two fitted curves cross where

    d(C) = L_arm(C) - L_baseline(C)

changes sign from + (the arm loses) to - (it wins); that budget is found by bracketing on a log
grid from C0 up to ``HORIZON`` x the largest measured budget and ``scipy.optimize.brentq``.

Uncertainty is a bootstrap over seeds: seeds are resampled with replacement (the same draw for
every arm, so the pairing by seed is kept), each arm's per-budget means recomputed and refitted,
and the crossover solved again. Its 95% interval is the 2.5 and 97.5 percentiles of the
bootstrap crossovers, where a draw with no crossover below the horizon counts as +inf (so an
upper end "beyond the horizon" says the data cannot rule out that the curves never cross).

The held-out check fits on every budget but the largest and predicts each arm's value and the
paired difference there (with a bootstrap interval); the sweep measured it, so a prediction that
misses says the power law should not be trusted far beyond the data.

Three parameters need three budgets per arm; a fit on exactly three passes through the means, so
the bootstrap spread is the only measure of how well determined it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

HORIZON = 1e4  # crossovers are looked for up to this multiple of the largest measured budget
BOOTSTRAP = 400
ALPHA_BOUNDS = (1e-3, 3.0)


@dataclass(frozen=True)
class PowerLaw:
    """L(C) = e + a * (C / c0)^-alpha."""

    e: float
    a: float
    alpha: float
    c0: float

    def __call__(self, c) -> np.ndarray:
        return self.e + self.a * np.power(np.asarray(c, dtype=float) / self.c0, -self.alpha)

    def as_dict(self) -> dict[str, float]:
        return {"E": self.e, "A": self.a, "alpha": self.alpha, "C0": self.c0}


def _linear_part(z: np.ndarray, y: np.ndarray, hi_e: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of z (alphas x points, z = (C/C0)^-alpha): the least-squares E, A with
    0 <= E <= hi_e and A >= 0, and the residual sum of squares (variable projection: for a fixed
    alpha the model is linear in E and A)."""
    zm, ym = z.mean(1), y.mean()
    var = ((z - zm[:, None]) ** 2).sum(1)
    a = np.where(var > 0, ((z - zm[:, None]) * (y - ym)).sum(1) / np.where(var > 0, var, 1.0), 0.0)
    e = ym - a * zm
    clamp = (e < 0) | (e > hi_e) | (a < 0)
    if clamp.any():  # refit A with E at the violated bound (and A >= 0)
        e_c = np.clip(e, 0.0, hi_e)
        a_c = np.clip(((y - e_c[:, None]) * z).sum(1) / (z ** 2).sum(1), 0.0, None)
        e, a = np.where(clamp, e_c, e), np.where(clamp, a_c, a)
    rss = ((e[:, None] + a[:, None] * z - y) ** 2).sum(1)
    return e, a, rss


def fit_power_law(budgets, values, c0: float | None = None) -> PowerLaw:
    """Least-squares fit of L(C) = E + A (C/C0)^-alpha to (budget, value) points (>= 3 budgets),
    with 0 <= E <= min(value), A >= 0 and alpha in ALPHA_BOUNDS: E and A are solved exactly for
    each alpha on a log grid, then alpha is refined around the best grid point."""
    from scipy.optimize import minimize_scalar

    c = np.asarray(budgets, dtype=float)
    y = np.asarray(values, dtype=float)
    if len(np.unique(c)) < 3:
        raise ValueError(f"a power-law fit needs at least 3 budgets, got {len(np.unique(c))}")
    c0 = float(c.min()) if c0 is None else float(c0)
    x = np.log(c / c0)
    hi_e = float(y.min())
    grid = np.geomspace(*ALPHA_BOUNDS, 240)
    rss = _linear_part(np.exp(-grid[:, None] * x[None, :]), y, hi_e)[2]
    i = int(np.argmin(rss))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]

    def cost(alpha: float) -> float:
        return float(_linear_part(np.exp(-alpha * x)[None, :], y, hi_e)[2][0])

    alpha = float(minimize_scalar(cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}).x)
    if cost(alpha) > rss[i]:
        alpha = float(grid[i])
    e, a, _ = _linear_part(np.exp(-alpha * x)[None, :], y, hi_e)
    return PowerLaw(float(e[0]), float(a[0]), alpha, c0)


def crossing(arm: PowerLaw, base: PowerLaw, start: float, stop: float) -> float | None:
    """The first budget in [start, stop] where arm(C) - base(C) turns from >= 0 to < 0 (the arm
    starts to win), or None. Where the arm already wins at ``start`` there is no crossing to find
    (None as well; ``predict`` says "wins from the start")."""
    from scipy.optimize import brentq

    grid = np.geomspace(start, stop, 400)
    d = arm(grid) - base(grid)
    for i in range(len(grid) - 1):
        if d[i] >= 0 > d[i + 1]:
            f = lambda lc: float(arm(math.exp(lc)) - base(math.exp(lc)))  # noqa: E731
            return math.exp(brentq(f, math.log(grid[i]), math.log(grid[i + 1])))
    return None


def _means(rows: list[dict[str, Any]], arm: str, seeds: list[int]) -> tuple[list[float], list[float]]:
    """Budgets and mean val NLL over ``seeds`` (with repeats: a bootstrap draw) for one arm."""
    by = {(r["budget"], r["seed_offset"]): r["val_nll"] for r in rows if r["arm"] == arm}
    budgets = sorted({b for b, _ in by})
    out_b, out_v = [], []
    for b in budgets:
        vals = [by[(b, s)] for s in seeds if (b, s) in by]
        if vals:
            out_b.append(b)
            out_v.append(float(np.mean(vals)))
    return out_b, out_v


def _percentiles(values: list[float]) -> tuple[float, float]:
    arr = np.sort(np.asarray(values, dtype=float))  # +inf sorts last
    lo = float(arr[int(math.floor(0.025 * (len(arr) - 1)))])
    hi = float(arr[int(math.ceil(0.975 * (len(arr) - 1)))])
    return lo, hi


def predict(rows: list[dict[str, Any]], baseline: str, arm: str, hold_out: float | None = None,
            n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Fit both arms on ``rows`` (dicts with arm, budget, seed_offset, val_nll), excluding the
    budget ``hold_out`` if given, and predict the crossover (and, with ``hold_out``, both arms and
    their difference there). Intervals: percentile bootstrap over seeds (``n_boot`` draws)."""
    rows = [r for r in rows if r["arm"] in (baseline, arm)]
    fit_rows = [r for r in rows if hold_out is None or r["budget"] != hold_out]
    seeds = sorted({r["seed_offset"] for r in fit_rows})
    budgets = sorted({r["budget"] for r in fit_rows})
    if len(budgets) < 3:
        raise ValueError(f"arm {arm!r}: {len(budgets)} budget(s) to fit; a power law needs 3")
    c0, top = budgets[0], budgets[-1]
    horizon = top * HORIZON

    def fit_both(chosen: list[int]) -> tuple[PowerLaw, PowerLaw]:
        return (fit_power_law(*_means(fit_rows, baseline, chosen), c0=c0),
                fit_power_law(*_means(fit_rows, arm, chosen), c0=c0))

    fb, fa = fit_both(seeds)
    point = crossing(fa, fb, c0, horizon)
    wins_from_start = bool(fa(c0) < fb(c0))
    rng = np.random.default_rng(seed)
    boots, at_hold = [], []
    for _ in range(n_boot if len(seeds) > 1 else 0):
        draw = [int(s) for s in rng.choice(seeds, size=len(seeds), replace=True)]
        try:
            b, a = fit_both(draw)
        except ValueError:  # a draw that lost a budget entirely
            continue
        x = crossing(a, b, c0, horizon)
        boots.append(math.inf if x is None else x)
        if hold_out is not None:
            at_hold.append((float(b(hold_out)), float(a(hold_out))))
    out: dict[str, Any] = {
        "arm": arm, "baseline": baseline, "fitted_budgets": budgets, "seeds": len(seeds),
        "fit": {baseline: fb.as_dict(), arm: fa.as_dict()},
        "crossover": point, "wins_from_start": wins_from_start, "horizon": horizon,
        "crossover_lo": None, "crossover_hi": None, "boot_share_crossing": None, "bootstrap": len(boots)}
    if boots:
        out["crossover_lo"], out["crossover_hi"] = _percentiles(boots)
        out["boot_share_crossing"] = float(np.mean([math.isfinite(x) for x in boots]))
    if hold_out is not None:
        out["hold_out"] = held_out_check(rows, baseline, arm, hold_out, fb, fa, at_hold)
    out["words"] = words(out)
    return out


def held_out_check(rows, baseline, arm, budget, fb: PowerLaw, fa: PowerLaw,
                   boots: list[tuple[float, float]]) -> dict[str, Any]:
    """Predicted vs measured at a budget the fit did not see: each arm's value and the paired
    difference, with the prediction's bootstrap interval and the measurement's t interval."""
    from .. import stats

    base = {r["seed_offset"]: r["val_nll"] for r in rows if r["arm"] == baseline and r["budget"] == budget}
    other = {r["seed_offset"]: r["val_nll"] for r in rows if r["arm"] == arm and r["budget"] == budget}
    common = sorted(set(base) & set(other))
    measured = stats.mean_interval([other[s] - base[s] for s in common]) if common else None
    pred = float(fa(budget) - fb(budget))
    lo = hi = None
    if boots:
        lo, hi = _percentiles([a - b for b, a in boots])
    out = {"budget": budget, "predicted_delta": pred, "predicted_lo": lo, "predicted_hi": hi,
           "predicted": {baseline: float(fb(budget)), arm: float(fa(budget))},
           "measured": {baseline: float(np.mean(list(base.values()))) if base else None,
                        arm: float(np.mean(list(other.values()))) if other else None},
           "measured_delta": None if measured is None else measured.mean,
           "measured_lo": None if measured is None else measured.lo,
           "measured_hi": None if measured is None else measured.hi, "seeds": len(common)}
    if measured is not None and lo is not None:
        out["within"] = bool(lo <= measured.mean <= hi)
    else:
        out["within"] = None
    return out


def _c(x: float | None) -> str:
    if x is None:
        return "-"
    return "beyond the horizon" if math.isinf(x) else f"{x:.3g}"


def words(p: dict[str, Any]) -> str:
    """One sentence: the predicted crossover and how sure it is."""
    span = f"fitted on {_c(p['fitted_budgets'][0])}-{_c(p['fitted_budgets'][-1])} FLOPs, {p['seeds']} seed(s)"
    if p["wins_from_start"]:
        head = f"the fitted arm is already below the baseline at {_c(p['fitted_budgets'][0])} FLOPs"
    elif p["crossover"] is None:
        head = f"no crossover predicted below {_c(p['horizon'])} FLOPs"
    else:
        head = f"predicted crossover at {_c(p['crossover'])} FLOPs"
    if p["crossover_lo"] is not None:
        head += (f" (95% bootstrap interval {_c(p['crossover_lo'])} .. {_c(p['crossover_hi'])}; "
                 f"{100 * p['boot_share_crossing']:.0f}% of {p['bootstrap']} draws cross below the horizon)")
    return f"{head}; {span}"


def hold_out_words(h: dict[str, Any]) -> str:
    if h["measured_delta"] is None:
        return f"held-out {h['budget']:.3g}: not measured"
    pred = f"{h['predicted_delta']:+.4f}"
    if h["predicted_lo"] is not None:
        pred += f" [{h['predicted_lo']:+.4f}, {h['predicted_hi']:+.4f}]"
    meas = f"{h['measured_delta']:+.4f}"
    if h["measured_lo"] is not None:
        meas += f" [{h['measured_lo']:+.4f}, {h['measured_hi']:+.4f}]"
    verdict = {True: "inside the predicted interval", False: "outside the predicted interval",
               None: "no interval to compare"}[h["within"]]
    return f"held-out {h['budget']:.3g} FLOPs: predicted Δ {pred}, measured {meas} ({verdict})"


def analyse(rows: list[dict[str, Any]], baseline: str, n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    """Per non-baseline arm: the fit on every budget (the crossover prediction) and, with >= 4
    budgets, the fit without the largest one checked there. Arms with < 3 budgets are skipped
    with a reason."""
    out: dict[str, Any] = {}
    for arm in sorted({r["arm"] for r in rows} - {baseline}):
        budgets = sorted({r["budget"] for r in rows if r["arm"] == arm})
        if len(budgets) < 3:
            out[arm] = {"skipped": f"{len(budgets)} budget(s); a power-law fit needs 3"}
            continue
        entry = predict(rows, baseline, arm, n_boot=n_boot)
        if len(budgets) >= 4:
            entry["check"] = predict(rows, baseline, arm, hold_out=budgets[-1], n_boot=n_boot)["hold_out"]
        out[arm] = entry
    return out
