"""Budget sweeps (iso-FLOP curves): the same arms at a ladder of training-FLOP budgets.

A sweep is a study whose search space lists fixed ``[arms.NAME]`` and ``budget_scales`` (and
``seeds``): every arm trains at every budget and seed (loopsearch/space.py: ``suggest_arm``).
At a small budget a looped model can lose to the plain one (it gets fewer optimizer steps for
the same FLOPs) and win at a larger one; this module finds that crossover budget.

Differences are paired: each arm is compared with the baseline arm trained with the same seed
(same data order) at the same budget, and every model is validated on identical masked
windows (``validation_nll`` uses a fixed seed), so the noise of the masks cancels. With several
seeds the mean difference carries a standard error; the crossover's interval is where the
mean +- one standard error crosses zero. The crossover is interpolated in log budget.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna
import polars as pl
from optuna.trial import TrialState

from .errors import LoopsearchError


def parse_scales(text: str) -> list[float]:
    """'1,2,4,8' or 'x1,x2,x4,x8' -> [1.0, 2.0, 4.0, 8.0] (multiples of the recipe's budget)."""
    out = []
    for part in filter(None, (p.strip().lstrip("xX") for p in text.split(","))):
        try:
            out.append(float(part))
        except ValueError:
            raise LoopsearchError(f"--scales {text!r}: {part!r} is not a number; give e.g. 1,2,4,8") from None
    if not out or any(x <= 0 for x in out):
        raise LoopsearchError(f"--scales {text!r}: give positive multiples of the budget, e.g. 1,2,4,8")
    return sorted(set(out))


def make_spec(name: str, recipe: str, space: str | None = None, arms: list[str] | None = None,
              scales: list[float] | None = None, seeds: int = 1, budget: str | None = None,
              corpus: dict | None = None, train_tokens: int | None = None):
    """The spec of a sweep study: the recipe's (or ``space``'s) arms, restricted to ``arms``, at
    every budget scale and seed; ``train_tokens`` limits every arm's training data (the
    data-limited regime)."""
    from . import study as studies
    from .space import load_recipe, load_space
    from .spec import StudyRecipe, validate

    base = load_recipe(recipe)
    resolved = load_space(space or base.space)
    if not resolved.arms:
        raise LoopsearchError(f"search space {resolved.name!r} has no [arms.NAME] tables; a sweep runs fixed arms "
                              f"(e.g. --space loopmdm_repro)")
    chosen = arms or list(resolved.arms)
    unknown = [a for a in chosen if a not in resolved.arms]
    if unknown:
        raise LoopsearchError(f"unknown arm(s) {unknown}; the space {resolved.name!r} has {list(resolved.arms)}")
    data = resolved.model_dump()
    data.update(arms={a: data["arms"][a] for a in chosen}, budget_scales=scales or [1.0], seeds=seeds)
    recipe_data = base.model_dump()
    for key, value in (("budget", budget), ("corpus", corpus)):
        if value is not None:
            recipe_data[key] = value
    if train_tokens is not None:
        recipe_data["train"]["train_tokens"] = train_tokens
    merged = validate(StudyRecipe, recipe_data, "sweep options")
    return studies.make_spec(merged, name, validate(type(resolved), data, f"sweep of space {resolved.name!r}"))


def frame(study: optuna.Study) -> pl.DataFrame:
    """One row per complete arm trial: arm, budget (training FLOPs), seed_offset, val_nll."""
    rows = [{"trial": t.number, "arm": t.user_attrs["arm"], "budget": float(t.user_attrs["budget"]),
             "budget_scale": float(t.user_attrs.get("budget_scale", 1.0)),
             "seed_offset": int(t.user_attrs.get("seed_offset", 0)), "val_nll": float(t.user_attrs["val_nll"]),
             "train_flops": float(t.user_attrs.get("train_flops", 0.0)), "steps": int(t.user_attrs.get("steps", 0))}
            for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE and "arm" in t.user_attrs and "val_nll" in t.user_attrs]
    schema = {"trial": pl.Int64, "arm": pl.Utf8, "budget": pl.Float64, "budget_scale": pl.Float64,
              "seed_offset": pl.Int64, "val_nll": pl.Float64, "train_flops": pl.Float64, "steps": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


def baseline_arm(spec) -> str:
    """The arm every other is compared with: the space's no-loop, unmodified model."""
    names = [name for name, arm in spec.space.arms.items() if arm.is_baseline]
    if not names:
        raise LoopsearchError(f"study {spec.name!r}: no baseline arm (strategy 'none' without backbone or train "
                              f"overrides) to compare with; add [arms.baseline] to its space")
    return names[0]


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None from a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def curves(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Final val NLL per arm and budget: mean, standard error over seeds, seeds."""
    out = []
    for (arm, budget), group in sorted(df.group_by(["arm", "budget"]), key=lambda g: (g[0][0], g[0][1])):
        mean, se = mean_se(group["val_nll"].to_list())
        out.append({"arm": arm, "budget": budget, "val_nll": mean, "se": se, "seeds": group.height})
    return out


def paired(df: pl.DataFrame, baseline: str) -> list[dict[str, Any]]:
    """Per arm and budget: val NLL minus the baseline's with the same seed (negative: the arm wins)."""
    base = {(r["budget"], r["seed_offset"]): r["val_nll"] for r in df.filter(pl.col("arm") == baseline).iter_rows(named=True)}
    out = []
    for (arm, budget), group in sorted(df.filter(pl.col("arm") != baseline).group_by(["arm", "budget"]),
                                       key=lambda g: (g[0][0], g[0][1])):
        diffs = [r["val_nll"] - base[(budget, r["seed_offset"])] for r in group.iter_rows(named=True)
                 if (budget, r["seed_offset"]) in base]
        if not diffs:
            continue
        mean, se = mean_se(diffs)
        out.append({"arm": arm, "budget": budget, "delta": mean, "se": se, "pairs": len(diffs),
                    "significant": se is not None and abs(mean) > 2 * se})
    return out


def _cross(points: list[tuple[float, float]]) -> float | None:
    """The first budget (log-interpolated) where the difference goes from >= 0 to < 0."""
    for (b0, d0), (b1, d1) in zip(points, points[1:]):
        if d0 >= 0 > d1:
            frac = d0 / (d0 - d1)
            return math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0)))
    return None


def crossover(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where one arm starts to beat the baseline, from its paired rows (one per budget).

    ``verdict`` is one of: wins at every budget, loses at every budget, crosses (with
    ``budget`` and the interval ``low``/``high`` from mean -/+ one standard error; None where
    that curve does not cross inside the ladder), or mixed (no clean change of sign)."""
    rows = sorted(rows, key=lambda r: r["budget"])
    pts = [(r["budget"], r["delta"]) for r in rows]
    lo_b, hi_b = pts[0][0], pts[-1][0]
    if all(d < 0 for _, d in pts):
        return {"verdict": f"wins at every budget (crossover below {lo_b:.3g} FLOPs)", "budget": None,
                "low": None, "high": None}
    if all(d >= 0 for _, d in pts):
        return {"verdict": f"no crossover up to {hi_b:.3g} FLOPs", "budget": None, "low": None, "high": None}
    best = _cross(pts)
    if best is None:
        return {"verdict": "mixed (wins below a budget where it loses)", "budget": None, "low": None, "high": None}
    se = [r["se"] or 0.0 for r in rows]
    # the optimistic curve (delta - se) crosses first, the pessimistic one (delta + se) last
    low = _cross([(b, d - s) for (b, d), s in zip(pts, se)]) if any(se) else best
    high = _cross([(b, d + s) for (b, d), s in zip(pts, se)]) if any(se) else best
    return {"verdict": f"crosses at ~{best:.3g} FLOPs", "budget": best, "low": low, "high": high}


def analyse(study: optuna.Study, spec) -> dict[str, Any]:
    """Curves, paired differences and the crossover of every arm of a sweep study."""
    df = frame(study)
    if df.is_empty():
        raise LoopsearchError(f"study {spec.name!r} has no finished arm trials yet; run `loopsearch study run {spec.name}`")
    base = baseline_arm(spec)
    pairs = paired(df, base)
    arms = sorted({r["arm"] for r in pairs})
    return {"baseline": base, "curves": curves(df), "paired": pairs,
            "crossover": {arm: crossover([r for r in pairs if r["arm"] == arm]) for arm in arms}}


def rich_tables(result: dict[str, Any]):
    """The paired differences (one row per arm and budget) and the crossovers, as rich tables."""
    from rich.table import Table

    diff = Table(title=f"val NLL minus {result['baseline']!r} at the same budget and seed (nats/token; < 0: the arm wins)")
    for col in ("arm", "budget (FLOPs)", "Δ val NLL", "± s.e.", "pairs", "> 2 s.e."):
        diff.add_column(col, justify="left" if col == "arm" else "right")
    for r in result["paired"]:
        diff.add_row(r["arm"], f"{r['budget']:.3g}", f"{r['delta']:+.4f}", "-" if r["se"] is None else f"{r['se']:.4f}",
                     str(r["pairs"]), "yes" if r["significant"] else "no")
    cross = Table(title="crossover budget: where looping starts to win")
    for col in ("arm", "verdict", "interval (FLOPs, ± 1 s.e.)"):
        cross.add_column(col)
    for arm, c in result["crossover"].items():
        interval = "-" if c["budget"] is None else f"{_fmt(c['low'])} .. {_fmt(c['high'])}"
        cross.add_row(arm, c["verdict"], interval)
    return diff, cross


def _fmt(value: float | None) -> str:
    return "outside the ladder" if value is None else f"{value:.3g}"


def section(d, out):
    """The report's iso-FLOP section: final val NLL vs training budget per arm (mean +- one
    standard error over seeds) and the paired-difference and crossover table."""
    from .report import NLL_LABEL, Section, _figure, _flop_axis, _save

    sec = Section("sweep", "Budget sweep (iso-FLOP curves)")
    df = frame(d.study)
    if df.is_empty() or df["budget"].n_unique() < 2:
        sec.note = "No data: fewer than two budgets have finished arms."
        return sec
    result = analyse(d.study, d.spec)
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    for arm in sorted({c["arm"] for c in result["curves"]}, key=lambda a: a != result["baseline"]):
        pts = [c for c in result["curves"] if c["arm"] == arm]
        ax.errorbar([c["budget"] for c in pts], [c["val_nll"] for c in pts], yerr=[c["se"] or 0.0 for c in pts],
                    marker="o", markersize=4, capsize=3, label=arm,
                    color="black" if arm == result["baseline"] else None)
    ax.set_xscale("log")
    _flop_axis(ax.xaxis, "training compute per arm")
    ax.set_ylabel(NLL_LABEL)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    seeds = df.group_by(["arm", "budget"]).len()["len"].max()
    fig.suptitle(f"{d.name}: final val NLL vs training budget ({seeds} seed(s) per point, ± 1 s.e.)", fontsize=9)
    sec.image = _save(fig, out, "iso_flop.png")
    sec.caption = ("Every arm trained to completion at each budget; differences are paired with the baseline of the "
                   "same seed and budget on identical validation masks. Crossover: where the arm's mean difference "
                   "turns negative (log-interpolated), its interval where mean ± 1 s.e. does.")
    sec.headers = ["arm", "budget (FLOPs)", "Δ val NLL vs " + result["baseline"], "± s.e.", "pairs", "crossover"]
    sec.rows = []
    for arm, c in result["crossover"].items():
        interval = "" if c["budget"] is None else f" ({_fmt(c['low'])} .. {_fmt(c['high'])})"
        for r in [r for r in result["paired"] if r["arm"] == arm]:
            sec.rows.append([arm, f"{r['budget']:.3g}", f"{r['delta']:+.4f}",
                             "-" if r["se"] is None else f"{r['se']:.4f}", str(r["pairs"]), c["verdict"] + interval])
    return sec
