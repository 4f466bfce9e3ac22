"""Budget sweeps (iso-FLOP curves), the analysis: the same arms at a ladder of training-FLOP budgets.

A sweep (created by ``loopsearch sweep``: loopsearch/experiments/sweep.py) is a study whose
search space lists fixed ``[arms.NAME]`` and ``budget_scales`` (and ``seeds``): every arm trains
at every budget and seed (loopsearch/search/space.py: ``suggest_arm``). At a small budget a
looped model can lose to the plain one (it gets fewer optimizer steps for the same FLOPs) and
win at a larger one; this module finds that crossover budget, and says when the data cannot
place it.

Differences are paired: each arm is compared with the baseline arm trained with the same seed
(same data order) at the same budget, on identical validation windows and masks. With several
seeds the mean difference gets a 95% t interval on n - 1 degrees of freedom (loopsearch/stats.py;
with 2 seeds the quantile is 12.7); with one seed the only interval is the paired Monte-Carlo one
of the validation masks (per-window values stored with the trials), which is validation noise
only, not seed-to-seed variation. A budget's words: the arm wins or loses when the interval
excludes 0, else tie.

The crossover ("crosses") needs the mean difference to change sign exactly once along the
ladder, from + (the arm loses) to - (it wins), with the interval of the last budget before the
change above 0 and that of the first budget after it below 0. The crossing budget is where the
mean difference turns negative, interpolated in log budget; its interval is where the upper and
lower interval bounds cross zero. One change of sign without intervals that exclude 0 on both
sides is an inconclusive crossing; more than one change (or one from - to +) is mixed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import polars as pl
from optuna.trial import TrialState
from rich.table import Table

from .. import stats
from ..errors import LoopsearchError
from . import scaling_fit
from ..search.record import TrialRecord
from .page import NLL_LABEL, Section, figure, flop_axis, save


def frame(study: optuna.Study) -> pl.DataFrame:
    """One row per complete arm trial: arm, budget (training FLOPs), seed_offset, val_nll, and the
    per-window validation values when stored (val_windows, val_draws, eval_key; null if not)."""
    records = [(t, TrialRecord.of(t)) for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    rows = [{"trial": t.number, "arm": r.arm, "budget": float(r.budget),
             "budget_scale": float(r.budget_scale if r.budget_scale is not None else 1.0),
             "seed_offset": int(r.seed_offset or 0), "val_nll": float(r.val_nll),
             "train_flops": float(r.train_flops or 0.0), "steps": int(r.steps or 0),
             "val_windows": r.val_windows or None, "val_draws": r.val_draws, "eval_key": r.eval_key}
            for t, r in records if r.arm is not None and r.val_nll is not None]
    schema = {"trial": pl.Int64, "arm": pl.Utf8, "budget": pl.Float64, "budget_scale": pl.Float64,
              "seed_offset": pl.Int64, "val_nll": pl.Float64, "train_flops": pl.Float64, "steps": pl.Int64,
              "val_windows": pl.List(pl.Float64), "val_draws": pl.Int64, "eval_key": pl.Utf8}
    return pl.DataFrame(rows, schema=schema)


def baseline_arm(spec) -> str:
    """The arm every other is compared with: the space's no-loop, unmodified model."""
    names = [name for name, arm in spec.space.arms.items() if arm.is_baseline]
    if not names:
        raise LoopsearchError(f"study {spec.name!r}: no baseline arm (strategy 'none' without backbone or train "
                              f"overrides) to compare with; add [arms.baseline] to its space")
    return names[0]


def curves(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Final val NLL per arm and budget: mean, standard error over seeds, seeds."""
    out = []
    for (arm, budget), group in sorted(df.group_by(["arm", "budget"]), key=lambda g: (g[0][0], g[0][1])):
        ci = stats.mean_interval(group["val_nll"].to_list())
        out.append({"arm": arm, "budget": budget, "val_nll": ci.mean, "se": ci.se, "seeds": group.height})
    return out


NO_INTERVAL = "no interval (1 seed)"
MC_ONLY = "validation noise only"


def paired(df: pl.DataFrame, baseline: str) -> list[dict[str, Any]]:
    """Per arm and budget: val NLL minus the baseline's with the same seed (negative: the arm
    wins), its mean over seeds with a 95% interval (``lo``, ``hi``; t on ``df`` = seeds - 1
    degrees of freedom) and the words ``verdict``: wins, loses or tie. With one seed, the paired
    Monte-Carlo interval of the validation masks when both trials stored their per-window values
    (``basis`` says "validation noise only"); else no interval."""
    base = {(r["budget"], r["seed_offset"]): r for r in df.filter(pl.col("arm") == baseline).iter_rows(named=True)}
    out = []
    for (arm, budget), group in sorted(df.filter(pl.col("arm") != baseline).group_by(["arm", "budget"]),
                                       key=lambda g: (g[0][0], g[0][1])):
        pairs = [(base[(budget, r["seed_offset"])], r) for r in group.iter_rows(named=True)
                 if (budget, r["seed_offset"]) in base]
        if not pairs:
            continue
        iv = stats.mean_interval([r["val_nll"] - b["val_nll"] for b, r in pairs])
        basis = f"{len(pairs)} seeds"
        if len(pairs) == 1:
            mc = stats.paired_results(*pairs[0])
            iv, basis = (iv, None) if mc is None else (stats.Interval(iv.mean, mc.se, mc.df), MC_ONLY)
        out.append({"arm": arm, "budget": budget, "delta": iv.mean, "se": iv.se, "lo": iv.lo, "hi": iv.hi,
                    "df": iv.df, "pairs": len(pairs), "basis": basis,
                    "verdict": stats.tie_words(iv, "wins", "loses") or NO_INTERVAL})
    return out


def _log_cross(b0: float, v0: float, b1: float, v1: float) -> float:
    """The budget between b0 and b1 (log-interpolated) where a curve going from v0 to v1 is 0."""
    frac = v0 / (v0 - v1)
    return math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0)))


def _bounds(rows: list[dict[str, Any]], i: int) -> tuple[float | None, float | None]:
    """The crossing interval around a change of sign between rows i and i + 1: where the lower
    bound curve last turns from > 0 to <= 0 at or below it, and where the upper bound curve first
    turns negative at or above it (None: outside the ladder, or a budget without an interval)."""
    if any(r.get("lo") is None for r in rows):
        return None, None
    low = high = None
    for j in range(i, -1, -1):  # lo[i + 1] <= delta[i + 1] < 0: walk down to the last lo > 0
        if rows[j]["lo"] > 0:
            low = _log_cross(rows[j]["budget"], rows[j]["lo"], rows[j + 1]["budget"], rows[j + 1]["lo"])
            break
    for k in range(i + 1, len(rows)):  # hi[i] >= delta[i] >= 0: walk up to the first hi < 0
        if rows[k]["hi"] < 0:
            high = _log_cross(rows[k - 1]["budget"], rows[k - 1]["hi"], rows[k]["budget"], rows[k]["hi"])
            break
    return low, high


def _excludes(r: dict[str, Any]) -> str:
    """Words for one budget's interval: 'loses at 95%', 'wins at 95%', 'tie' or 'no interval'."""
    if r.get("lo") is None:
        return "no interval"
    return "loses at 95%" if r["lo"] > 0 else "wins at 95%" if r["hi"] < 0 else "tie"


def crossover(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where one arm starts to beat the baseline, from its paired rows (one per budget, with
    ``delta`` and the 95% bounds ``lo``/``hi``, None without an interval).

    ``kind``: crosses (one change of sign from + to -, the interval before it above 0 and the
    one after it below 0), inconclusive (one such change without that support), mixed (more
    than one change, or one from - to +), loses (+ at every budget) or wins (- at every
    budget). ``budget``: the log-interpolated budget where the mean turns negative; ``low`` /
    ``high``: where the lower / upper bound curves cross zero (None: outside the ladder)."""
    rows = sorted(rows, key=lambda r: r["budget"])
    lo_b, hi_b = rows[0]["budget"], rows[-1]["budget"]
    signs = [r["delta"] >= 0 for r in rows]  # True: the arm loses (or ties exactly)
    changes = [i for i in range(len(rows) - 1) if signs[i] != signs[i + 1]]
    none = {"budget": None, "low": None, "high": None}
    if not changes and signs[0]:
        return {"kind": "loses", **none,
                "verdict": f"no crossover up to {hi_b:.3g} FLOPs ({_words_at(rows[-1], 'largest')})"}
    if not changes:
        return {"kind": "wins", **none,
                "verdict": f"wins at every budget (crossover below {lo_b:.3g} FLOPs; {_words_at(rows[0], 'smallest')})"}
    if len(changes) > 1 or not signs[changes[0]]:
        order = ", ".join("+" if s else "-" for s in signs)
        return {"kind": "mixed", **none, "verdict": f"mixed: the sign of the difference changes {len(changes)} "
                                                    f"time(s) along the ladder ({order})"}
    i = changes[0]
    before, after = rows[i], rows[i + 1]
    best = _log_cross(before["budget"], before["delta"], after["budget"], after["delta"])
    low, high = _bounds(rows, i)
    if before.get("lo") is not None and after.get("hi") is not None and before["lo"] > 0 and after["hi"] < 0:
        return {"kind": "crosses", "verdict": f"crosses at ~{best:.3g} FLOPs", "budget": best, "low": low,
                "high": high}
    return {"kind": "inconclusive", "budget": best, "low": low, "high": high,
            "verdict": (f"inconclusive crossing near ~{best:.3g} FLOPs ({before['budget']:.3g}: {_excludes(before)}; "
                        f"{after['budget']:.3g}: {_excludes(after)})")}


def _words_at(row: dict[str, Any], which: str) -> str:
    return f"{_excludes(row)} at the {which} budget"


def analyse(study: optuna.Study, spec) -> dict[str, Any]:
    """Curves, paired differences and the crossover of every arm of a sweep study."""
    df = frame(study)
    if df.is_empty():
        raise LoopsearchError(f"study {spec.name!r} has no finished arm trials yet; "
                              f"run `loopsearch study run {spec.name}`")
    base = baseline_arm(spec)
    pairs = paired(df, base)
    arms = sorted({r["arm"] for r in pairs})
    return {"baseline": base, "curves": curves(df), "paired": pairs,
            "crossover": {arm: crossover([r for r in pairs if r["arm"] == arm]) for arm in arms},
            "fit": scaling_fit.analyse(df.select("arm", "budget", "seed_offset", "val_nll").to_dicts(), base)}


def _interval(r: dict[str, Any]) -> str:
    return "-" if r["lo"] is None else f"[{r['lo']:+.4f}, {r['hi']:+.4f}]"


def _words(r: dict[str, Any]) -> str:
    """'loses', 'tie', 'wins' (with ', validation noise only' for a one-seed Monte-Carlo interval)."""
    return r["verdict"] + (f" ({MC_ONLY})" if r["basis"] == MC_ONLY else "")


def _crossing(c: dict[str, Any]) -> str:
    return "-" if c["budget"] is None else f"{_fmt(c['low'])} .. {_fmt(c['high'])}"


def rich_tables(result: dict[str, Any]):
    """The paired differences (one row per arm and budget) and the crossovers, as rich tables."""
    diff = Table(title=f"val NLL minus {result['baseline']!r} at the same budget and seed (nats/token; < 0: the arm "
                       f"wins; 95% interval: t over seeds, or one seed's validation noise only)")
    for col in ("arm", "budget (FLOPs)", "seeds", "Δ val NLL", "95% interval", "± s.e.", "in words"):
        diff.add_column(col, justify="left" if col in ("arm", "in words") else "right")
    for r in result["paired"]:
        diff.add_row(r["arm"], f"{r['budget']:.3g}", str(r["pairs"]), f"{r['delta']:+.4f}", _interval(r),
                     "-" if r["se"] is None else f"{r['se']:.4f}", _words(r))
    cross = Table(title="crossover budget: where looping starts to win")
    for col in ("arm", "verdict", "crossing interval (FLOPs, 95%)"):
        cross.add_column(col)
    for arm, c in result["crossover"].items():
        cross.add_row(arm, c["verdict"], _crossing(c))
    return diff, cross, fit_table(result)


def fit_table(result: dict[str, Any]) -> Table:
    """The power-law fits L(C) = E + A (C/C0)^-alpha per arm, the crossover they predict and the
    held-out check (loopsearch/results/scaling_fit.py)."""
    table = Table(title="iso-FLOP fit L(C) = E + A (C/C0)^-alpha: predicted crossover (95% bootstrap over seeds)")
    for col in ("arm", "E (baseline / arm)", "alpha (baseline / arm)", "prediction", "held-out check"):
        table.add_column(col)
    for arm, f in result.get("fit", {}).items():
        if "skipped" in f:
            table.add_row(arm, "-", "-", f"no fit: {f['skipped']}", "-")
            continue
        base, mine = f["fit"][f["baseline"]], f["fit"][arm]
        check = scaling_fit.hold_out_words(f["check"]) if "check" in f else "needs >= 4 budgets"
        table.add_row(arm, f"{base['E']:.3f} / {mine['E']:.3f}", f"{base['alpha']:.3f} / {mine['alpha']:.3f}",
                      f["words"], check)
    return table


def _fmt(value: float | None) -> str:
    return "outside the ladder" if value is None else f"{value:.3g}"


def section(d, out):
    """The report's iso-FLOP section: final val NLL vs training budget per arm (mean +- one
    standard error over seeds) and the paired differences with 95% intervals and the crossover."""
    sec = Section("sweep", "Budget sweep (iso-FLOP curves)")
    df = frame(d.study)
    if df.is_empty() or df["budget"].n_unique() < 2:
        sec.note = "No data: fewer than two budgets have finished arms."
        return sec
    result = analyse(d.study, d.spec)
    fig = figure(7.5, 4.5)
    ax = fig.subplots()
    for arm in sorted({c["arm"] for c in result["curves"]}, key=lambda a: a != result["baseline"]):
        pts = [c for c in result["curves"] if c["arm"] == arm]
        ax.errorbar([c["budget"] for c in pts], [c["val_nll"] for c in pts], yerr=[c["se"] or 0.0 for c in pts],
                    marker="o", markersize=4, capsize=3, label=arm,
                    color="black" if arm == result["baseline"] else None)
    lo_b, hi_b = min(c["budget"] for c in result["curves"]), max(c["budget"] for c in result["curves"])
    for arm, f in result["fit"].items():  # dashed: the power-law fits, extended to a predicted crossover
        if "skipped" in f:
            continue
        top = hi_b if f["crossover"] is None else max(hi_b, min(f["crossover"] * 1.5, hi_b * 100))
        grid = np.geomspace(lo_b, top, 100)
        for name, color in ((f["baseline"], "black"), (arm, None)):
            law = scaling_fit.PowerLaw(**{k.lower() if k != "C0" else "c0": v for k, v in f["fit"][name].items()})
            ax.plot(grid, law(grid), linestyle="--", linewidth=0.8, color=color or "tab:blue", alpha=0.7)
        if f["crossover"] is not None:
            ax.axvline(f["crossover"], linestyle=":", color="grey", linewidth=0.8)
    ax.set_xscale("log")
    flop_axis(ax.xaxis, "training compute per arm")
    ax.set_ylabel(NLL_LABEL)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    seeds = df.group_by(["arm", "budget"]).len()["len"].max()
    fig.suptitle(f"{d.name}: final val NLL vs training budget ({seeds} seed(s) per point, ± 1 s.e.)", fontsize=9)
    sec.image = save(fig, out, "iso_flop.png")
    sec.caption = ("Every arm trained to completion at each budget; differences are paired with the baseline of the "
                   "same seed and budget on identical validation masks. Intervals are 95%: Student's t over seeds "
                   "(n - 1 degrees of freedom), or with one seed the validation-mask noise only; a difference whose "
                   "interval contains 0 is a tie. Crossover: only where the mean difference changes sign once, from "
                   "+ to -, with the intervals on both sides excluding 0 (log-interpolated; its interval where the "
                   "interval bounds cross zero); otherwise inconclusive, mixed, loses or wins. Dashed: the fits "
                   "L(C) = E + A (C/C0)^-alpha of each arm's means (dotted: a predicted crossover); the fit table "
                   "gives the prediction with a 95% bootstrap interval over seeds and, with >= 4 budgets, a check "
                   "at the largest budget held out of the fit.")
    sec.headers = ["arm", "budget (FLOPs)", "seeds", "Δ val NLL vs " + result["baseline"], "95% interval",
                   "in words", "crossover"]
    sec.rows = []
    for arm, c in result["crossover"].items():
        interval = "" if c["budget"] is None else f" (95%: {_crossing(c)})"
        for r in [r for r in result["paired"] if r["arm"] == arm]:
            sec.rows.append([arm, f"{r['budget']:.3g}", str(r["pairs"]), f"{r['delta']:+.4f}", _interval(r),
                             _words(r), c["verdict"] + interval])
    for arm, f in result["fit"].items():
        if "skipped" not in f:
            check = f" {scaling_fit.hold_out_words(f['check'])}." if "check" in f else ""
            sec.caption += f" Fit, {arm}: {f['words']}.{check}"
    return sec
