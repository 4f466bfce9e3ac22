"""What people look at: a study's report (one HTML or Markdown page with PNG plots) and a
side-by-side comparison of studies.

``write(STUDY)`` reads everything from Optuna storage and writes, to ``report-STUDY/``:

- ``learning_curves.png``: val NLL (nats/token) vs training FLOPs of every trial (the ``history``
  user attribute, else the intermediate values Optuna stores keyed by GFLOPs);
- ``placement.png``: loop_start x block length -> best val NLL, one panel per loop count, coloured
  around the no-loop baseline of the same budget;
- ``loop_scaling.png``: val NLL vs inference FLOPs per token and vs loop count (``loopsearch eval`` rows);
- ``pareto_front.png``: the first two objectives of a multi-objective study;
- ``importances.png``: PED-ANOVA parameter importances over the complete non-baseline trials;
- the leaderboard table, and ``report.html`` or ``report.md`` referencing the PNGs by relative path.

A section without data says so on the page instead of drawing an empty plot. Plots are drawn on
matplotlib's Agg canvas (headless; the caller's pyplot backend is left alone). The sections,
plot helpers and HTML/Markdown rendering are in loopsearch/results/page.py.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import polars as pl
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from ..errors import LoopsearchError
from ..search import study as studies
from ..search.space import BASELINE_ATTR
from ..units import format_flops
from . import claims, sweep
from . import leaderboard as lb
from .page import (FORMATS, NLL_LABEL, OBJECTIVE_LABELS, Report, Section, figure, flop_axis, render_html, render_md,
                   save)

PLOTS = ("learning_curves.png", "placement.png", "loop_scaling.png", "pareto_front.png", "importances.png",
         "iso_flop.png")


@dataclass
class Data:
    """Everything the report draws, read once from storage."""

    name: str
    study: optuna.Study
    spec: Any
    trials: list[FrozenTrial]
    board: pl.DataFrame
    scaling: pl.DataFrame

    @property
    def baseline(self) -> dict | None:
        """The best finished baseline row of the leaderboard (val NLL, inference FLOPs/token)."""
        rows = self.board.filter(pl.col("baseline") & pl.col("val_nll").is_not_null()).to_dicts()
        return rows[0] if rows else None

    @property
    def baseline_nll(self) -> float | None:
        return None if self.baseline is None else self.baseline["val_nll"]


# ---- reading ---------------------------------------------------------------------------------------
def load(name: str, storage: str | None = None) -> Data:
    study, spec = studies.load(name, storage)  # unknown study: a one-line StudyNotFoundError
    board = lb.frame(storage, [name])
    scaling = lb.scaling_frame(storage, [name])
    return Data(name, study, spec, study.get_trials(deepcopy=False), board, scaling)


def label(a: dict) -> str:
    """A trial's placement from its user attributes: 'baseline' or 'fixed [1,3)x4'; in a study
    of arms, the arm's name (with its budget scale and seed when not x1 and 0)."""
    if a.get("arm"):
        scale, seed = float(a.get("budget_scale", 1.0)), int(a.get("seed_offset", 0))
        return a["arm"] + (f" x{scale:g} budget" if scale != 1.0 else "") + (f" seed+{seed}" if seed else "")
    if a.get(BASELINE_ATTR) or a.get("strategy") in (None, "none"):
        return "baseline (no loop)" if a.get(BASELINE_ATTR) else str(a.get("strategy") or "?")
    return f"{a['strategy']} [{a.get('loop_start')},{a.get('loop_end')})x{a.get('n_loops')}"


def curve(t: FrozenTrial) -> list[tuple[float, float]]:
    """(training FLOPs, val NLL in nats/token) points of a trial: the ``history`` user attribute
    (exact FLOPs), else Optuna's intermediate values (keyed by whole GFLOPs)."""
    history = t.user_attrs.get("history")
    if history:
        return [(float(h[0]), float(h[1])) for h in history]  # (FLOPs, val NLL[, its standard error])
    return [(float(step) * 1e9, float(v)) for step, v in sorted(t.intermediate_values.items())]


# ---- sections --------------------------------------------------------------------------------------------
def summary(d: Data) -> Section:
    spec = d.spec
    states: dict[str, int] = {}
    for t in d.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    done = d.board.filter(pl.col("val_nll").is_not_null())
    best = done.row(0, named=True) if len(done) else None
    base = d.baseline_nll
    rows = [
        ["search space", f"{spec.space.name}: {spec.space.description}".rstrip(": ")],
        ["training budget", f"{format_flops(spec.budget)} per trial ({spec.budget:.3g} FLOPs)"
         + ("" if spec.space.budget_scales == [1.0] else
            f", times {', '.join(f'{x:g}' for x in spec.space.budget_scales)} (a budget sweep)")],
        ["corpus", plugin_label(spec.corpus.name, spec.corpus.params)],
        ["backbone", plugin_label(spec.backbone.name, spec.backbone.params)],
        ["vocab size", str(spec.vocab_size)],
        ["objective", ", ".join(f"{m} ({d_})" for m, d_ in zip(spec.objective.metrics, spec.objective.directions))],
        ["seed / seeds per configuration / sampler / pruner",
         f"{spec.seed} / {spec.space.seeds} / {spec.optuna_sampler} / {spec.pruner}"],
        ["trials", ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"],
        ["baseline val NLL", "not finished" if base is None else f"{base:.4f} nats/token"],
        ["best trial", "none finished" if best is None else
         f"{best['trial']} {label_row(best)}: {lb.value_text(best)} nats/token"
         + ("" if best["delta_nll"] is None else
            f" ({lb.delta_text(best)} vs baseline: {best['vs_baseline']}"
            + (f", {best['delta_basis']}" if best.get("delta_basis") not in (None, "baseline") else "") + ")")],
    ]
    return Section("summary", "Study", headers=["", ""], rows=rows)


def label_row(row: dict) -> str:
    """The placement of a leaderboard row (same form as ``label``)."""
    return label({BASELINE_ATTR: row["baseline"], "strategy": row["strategy"], "loop_start": row["loop_start"],
                  "loop_end": row["loop_end"], "n_loops": row["n_loops"]})


def learning_curves(d: Data, out: Path) -> Section:
    sec = Section("curves", "Val NLL vs training FLOPs")
    curves = [(t, curve(t)) for t in d.trials]
    curves = [(t, c) for t, c in curves if c]
    if not curves:
        sec.note = "No data: no trial has reported a validation yet (run `loopsearch study run`)."
        return sec
    fig = figure()
    ax = fig.add_subplot()
    many = len(curves) > 12
    for t, c in curves:
        base = bool(t.user_attrs.get(BASELINE_ATTR))
        xs, ys = zip(*c)
        style = dict(color="black", linewidth=2.2, zorder=3) if base else dict(linewidth=1.2, alpha=0.85)
        done = t.state == TrialState.COMPLETE
        ax.plot(xs, ys, marker="o", markersize=3, linestyle="-" if done else "--",
                label=None if many and not base else f"{t.number}: {label(t.user_attrs)}"
                + ("" if done else f" ({t.state.name.lower()})"), **style)
    if d.baseline_nll is not None:
        ax.axhline(d.baseline_nll, color="black", linestyle=":", linewidth=1)
    ax.axvline(d.spec.budget, color="grey", linestyle="--", linewidth=0.8)
    ax.annotate("budget", (d.spec.budget, 0.02), xycoords=("data", "axes fraction"), ha="right", va="bottom",
                fontsize=8, color="grey", rotation=90)
    flop_axis(ax.xaxis, "training compute")
    ax.set_ylabel(NLL_LABEL)
    ax.set_title(f"{d.name}: validation NLL during training (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    sec.image = save(fig, out, "learning_curves.png")
    sec.caption = ("Every trial's validation NLL (nats/token, fixed-mask ELBO) at its FLOP checkpoints; the black "
                   "line is the no-loop baseline, the dotted line its final value; dashed lines are trials that did "
                   "not complete. "
                   + (f"All trials share the budget of {format_flops(d.spec.budget)}."
                      if d.spec.space.budget_scales == [1.0]
                      else f"Budgets: {format_flops(d.spec.budget)} times {d.spec.space.budget_scales}."))
    return sec


def placements(d: Data) -> pl.DataFrame:
    """Best val NLL per (n_loops, loop_start, block length) over complete looped trials."""
    looped = d.board.filter((pl.col("state") == "complete") & pl.col("val_nll").is_not_null() & ~pl.col("baseline")
                            & pl.col("loop_end").is_not_null() & (pl.col("loop_end") > pl.col("loop_start")))
    return (looped.with_columns(length=pl.col("loop_end") - pl.col("loop_start"))
                  .group_by("n_loops", "loop_start", "length").agg(pl.col("val_nll").min(), pl.len().alias("trials"))
                  .sort("n_loops", "loop_start", "length"))


def placement(d: Data, out: Path) -> Section:
    from matplotlib.colors import Normalize, TwoSlopeNorm

    sec = Section("placement", "Where to loop: placement heatmap")
    cells = placements(d)
    if cells.is_empty():
        sec.note = "No data: no complete trial loops a block (only the baseline, or nothing, has finished)."
        return sec
    base = d.baseline_nll
    loops = sorted(cells["n_loops"].unique().to_list())
    starts = list(range(int(cells["loop_start"].min()), int(cells["loop_start"].max()) + 1))
    lengths = list(range(int(cells["length"].min()), int(cells["length"].max()) + 1))
    values = cells["val_nll"].to_list() + ([base] if base is not None else [])
    lo, hi = min(values), max(values)
    pad = max(1e-6, 1e-3 * abs(hi))
    norm = (TwoSlopeNorm(vcenter=base, vmin=lo - pad, vmax=hi + pad) if base is not None
            else Normalize(vmin=lo - pad, vmax=hi + pad))
    cols = min(len(loops), 3)
    nrows = math.ceil(len(loops) / cols)
    panel_w, panel_h = max(2.8, 1.2 + 0.8 * len(lengths)), max(2.4, 1.2 + 0.5 * len(starts))
    fig = figure(1.6 + panel_w * cols, 0.9 + panel_h * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    image = None
    for ax, n in zip(axes, loops):
        grid = np.full((len(starts), len(lengths)), np.nan)
        for r in cells.filter(pl.col("n_loops") == n).iter_rows(named=True):
            grid[starts.index(r["loop_start"]), lengths.index(r["length"])] = r["val_nll"]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", norm=norm, origin="lower", aspect="auto")
        for i, j in zip(*np.nonzero(~np.isnan(grid))):
            text = f"{grid[i, j]:.3f}" + ("" if base is None else f"\n{grid[i, j] - base:+.3f}")
            shade = float(norm(grid[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shade < 0.2 or shade > 0.8 else "black")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(starts)), [str(s) for s in starts])
        ax.set_xlabel("block length (layers)")
        ax.set_ylabel("loop_start (layer index)")
        ax.set_title(f"n_loops = {n}", fontsize=9)
        ax.set_facecolor("#e4e4e4")
    for ax in axes[len(loops):]:
        ax.set_visible(False)
    bar = fig.colorbar(image, ax=list(axes[:len(loops)]), shrink=0.9)
    bar.set_label(f"best {NLL_LABEL}" + ("" if base is None else "\nblack line: no-loop baseline"), fontsize=8)
    if base is not None:
        bar.ax.axhline(base, color="black", linewidth=2)
    fig.suptitle(f"{d.name}: best val NLL per loop placement\n" +
                 ("no baseline yet" if base is None else f"baseline {base:.4f} nats/token = white, blue = better"),
                 fontsize=9)
    sec.image = save(fig, out, "placement.png")
    sec.caption = ("Each cell is the best val NLL (nats/token) of the complete trials that loop layers "
                   "[loop_start, loop_start + length) n_loops times (inference loop count), with its difference "
                   "from the baseline below it; grey cells were not tried. "
                   + ("The colour scale is centred on the no-loop baseline." if base is not None
                      else "The baseline has not finished, so there is no reference level."))
    return sec


def loop_scaling(d: Data, out: Path) -> Section:
    sec = Section("scaling", "Inference loop scaling")
    df = d.scaling
    if df.is_empty():
        sec.note = (f"No data: no trial has been evaluated at several loop counts "
                    f"(run `loopsearch eval {d.name} TRIAL --loops 1-8`).")
        return sec
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = figure(10, 4.2)
    left, right = fig.subplots(1, 2, sharey=True)
    colours = colormaps["tab10"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for k, trial in enumerate(df["trial"].unique(maintain_order=True).to_list()):
        rows = df.filter(pl.col("trial") == trial)
        exits = rows["exit"].unique(maintain_order=True).to_list()
        for m, ex in enumerate(sorted(exits, key=lambda e: e != "none")):
            part = rows.filter(pl.col("exit") == ex).sort("n_loops")
            first = part.row(0, named=True)
            attrs = {"strategy": first["strategy"], "loop_start": first["loop_start"],
                     "loop_end": first["loop_end"], "n_loops": first["trained_n_loops"]}
            name = f"{trial}: {label(attrs)}"
            name += "" if ex == "none" else f", exit {ex}"
            style = dict(color=colours(k % 10), marker=markers[m % len(markers)], markersize=4,
                         linestyle="-" if ex == "none" else "--")
            left.plot(part["inference_flops_per_token"], part["val_nll"], label=name, **style)
            right.plot(part["mean_loops"], part["val_nll"], **style)
            for r in part.iter_rows(named=True):
                left.annotate(f"{r['n_loops']}", (r["inference_flops_per_token"], r["val_nll"]), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
                if ex == "none" and r["n_loops"] == r["trained_n_loops"]:
                    for ax, x in ((left, r["inference_flops_per_token"]), (right, r["mean_loops"])):
                        ax.plot([x], [r["val_nll"]], marker="*", markersize=11, color=colours(k % 10), zorder=4)
    base = d.baseline
    if base is not None:
        for ax in (left, right):
            ax.axhline(base["val_nll"], color="black", linestyle=":", linewidth=1, label="no-loop baseline")
        if base["inference_flops_per_token"]:
            left.plot([base["inference_flops_per_token"]], [base["val_nll"]], marker="o", color="black")
            left.annotate("baseline", (base["inference_flops_per_token"], base["val_nll"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
    flop_axis(left.xaxis, "inference compute per token")
    left.set_ylabel(NLL_LABEL)
    right.set_xlabel("loops executed (block applications per forward pass)")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"{d.name}: val NLL vs inference compute (★ = the trained loop count; numbers = loop count)",
                 fontsize=9)
    sec.image = save(fig, out, "loop_scaling.png")
    sec.caption = ("Val NLL (nats/token) of evaluated trials at each inference loop count, against the inference "
                   "FLOPs per token that ran (left) and the loops executed (right); dashed: with an exit criterion, "
                   "the loop count as a cap, and the right axis the mean loops that ran.")
    sec.headers = ["trial", "block", "trained loops", "loops", "exit", "mean loops", "inference FLOPs/token",
                   NLL_LABEL]
    sec.rows = [[str(r["trial"]), f"[{r['loop_start']},{r['loop_end']})", str(r["trained_n_loops"]),
                 str(r["n_loops"]), r["exit"] or "none", f"{r['mean_loops']:.2f}",
                 f"{r['inference_flops_per_token']:.3g}", f"{r['val_nll']:.4f}"] for r in df.iter_rows(named=True)]
    return sec


def pareto(d: Data, out: Path) -> Section:
    sec = Section("pareto", "Pareto front")
    metrics = d.spec.objective.metrics
    if len(d.study.directions) < 2:
        sec.note = f"Not applicable: the study has one objective ({metrics[0]}); the leaderboard ranks it."
        return sec
    done = [t for t in d.trials if t.state == TrialState.COMPLETE and t.values
            and all(v is not None and math.isfinite(v) for v in t.values)]
    if not done:
        sec.note = "No data: no complete trial has objective values yet."
        return sec
    front = {t.number for t in d.study.best_trials}
    fig = figure(6.5, 4.8)
    ax = fig.add_subplot()
    rest = [t for t in done if t.number not in front]
    best = sorted((t for t in done if t.number in front), key=lambda t: t.values[0])
    if rest:
        ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], color="grey", s=18, label="dominated")
    directions = [x.name.lower() for x in d.study.directions]
    staircase = directions[:2] == ["minimize", "minimize"]  # the attainment boundary; else join the points
    ax.plot([t.values[0] for t in best], [t.values[1] for t in best], color="tab:red", marker="o", linestyle="-",
            drawstyle="steps-post" if staircase else "default", label="Pareto front")
    for t in done:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if t.user_attrs.get(BASELINE_ATTR):
            ax.scatter([t.values[0]], [t.values[1]], marker="s", facecolor="none", edgecolor="black", s=60,
                       label="no-loop baseline")
    ax.set_xlabel(f"{OBJECTIVE_LABELS.get(metrics[0], metrics[0])}, {directions[0]}")
    ax.set_ylabel(f"{OBJECTIVE_LABELS.get(metrics[1], metrics[1])}, {directions[1]}")
    ax.set_title(f"{d.name}: objectives of complete trials (numbers = trial)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    sec.image = save(fig, out, "pareto_front.png")
    sec.caption = (f"Pareto front of {metrics[0]} and {metrics[1]}: {len(best)} of {len(done)} complete trials are "
                   f"not dominated." + (f" Only the first two of {len(metrics)} objectives are drawn."
                                        if len(metrics) > 2 else ""))
    return sec


def importances(d: Data, out: Path) -> Section:
    sec = Section("importances", "Parameter importances")
    done = [t for t in d.trials if t.state == TrialState.COMPLETE and t.params and not t.user_attrs.get(BASELINE_ATTR)
            and t.values and all(v is not None and math.isfinite(v) for v in t.values)]
    if len(done) < 2:
        sec.note = (f"Skipped: importances need at least 2 complete non-baseline trials; the study has {len(done)} "
                    f"(run more with `loopsearch study run {d.name} --n-trials N`).")
        return sec
    metric = d.spec.objective.metrics[0]
    quantile = min(0.5, max(0.1, 5 / len(done)))
    try:
        values = _importances(done, d.study.directions, quantile)
    except Exception as exc:  # noqa: BLE001 - optuna's evaluators fail in many ways on tiny studies
        sec.note = (f"Skipped: optuna could not compute importances "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).")
        return sec
    if not values:
        sec.note = (f"Skipped: the {len(done)} complete non-baseline trials share no searched parameter with more "
                    f"than one value.")
        return sec
    names = sorted(values, key=values.get)
    fig = figure(6.5, 1.2 + 0.35 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(values[n], i, f" {values[n]:.2f}", va="center", fontsize=7)
    ax.set_xlabel(f"importance (fraction, sums to 1; PED-ANOVA, best {quantile:.0%} of {metric})")
    ax.set_ylabel("searched parameter")
    ax.set_xlim(0, max(1.0, max(values.values()) * 1.15))
    ax.set_title(f"{d.name}: parameter importances over {len(done)} complete trials", fontsize=9)
    sec.image = save(fig, out, "importances.png")
    sec.caption = (f"PED-ANOVA importances (optuna.importance, no extra dependencies): how much each searched "
                   f"parameter decides whether a trial lands in the best {quantile:.0%} of "
                   f"{OBJECTIVE_LABELS.get(metric, metric)}, as fractions summing to 1. The no-loop baseline has no "
                   f"parameters and is left out. With few trials these are rough.")
    return sec


def _importances(trials: list[FrozenTrial], directions, quantile: float) -> dict[str, float]:
    """PED-ANOVA importances for the first objective, on an in-memory copy of ``trials`` (the
    baseline, which has no parameters, would otherwise empty the common search space). fANOVA,
    Optuna's default, needs scikit-learn; PED-ANOVA needs nothing beyond Optuna and handles
    conditional (per-strategy) parameters."""
    tmp = optuna.create_study(directions=[x.name.lower() for x in directions])
    tmp.add_trials(trials)
    sign = -1.0 if directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0  # PED-ANOVA minimises
    with warnings.catch_warnings():  # its reminder that it minimises: the sign above took care of that
        warnings.simplefilter("ignore", UserWarning)
        return optuna.importance.get_param_importances(
            tmp, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile), target=lambda t: sign * t.values[0])


def leaderboard(d: Data) -> Section:
    sec = Section("leaderboard", "Leaderboard")
    if d.board.is_empty():
        sec.note = "No data: the study has no trials."
        return sec
    cols = [c for c in lb.DISPLAY if c != "study"]
    optional = ("gen_ppl", "sample_entropy", "task_accuracy", "zeroshot_bpb")
    cols = [c for c in cols if c not in optional or d.board[c].is_not_null().any()]
    sec.headers = cols
    sec.rows = [[lb._DERIVED[c](r) if c in lb._DERIVED else
                 lb._fmt(c, f"{r['trial']}{' (baseline)' if r['baseline'] else ''}" if c == "trial" else r[c])
                 for c in cols] for r in d.board.iter_rows(named=True)]
    sec.markdown = lb.markdown(d.board)
    sec.caption = ("One row per trial, best val NLL first. val NLL ± its standard error and Δ baseline (the paired "
                   "difference from the no-loop baseline, with its 95% interval) in nats/token; 'vs baseline' says "
                   "better, worse or tie (the interval contains 0) and what the interval covers: N seeds (training "
                   "and validation noise), masks (one seed each: validation noise only) or unpaired. "
                   "train_flops and inference_flops_per_token in FLOPs, wall_s in seconds.")
    return sec


def arm_sections(d: Data, out: Path) -> list[Section]:
    """A study of fixed arms: the paper's claims (arms with roles, loopsearch/results/claims.py) and
    the budget sweep (several budget scales, loopsearch/results/sweep.py)."""
    space = d.spec.space
    found = claims.sections(d, out) if claims.has_roles(d.spec) else []
    if space.arms and len(space.budget_scales) > 1:
        found.append(sweep.section(d, out))
    return found


def write(name: str, output: str | Path | None = None, fmt: str = "html", storage: str | None = None) -> Report:
    """Write the report of study ``name`` to ``output`` (default ``report-NAME/``): ``report.html``
    or ``report.md`` and the PNG plots it references."""
    if fmt not in FORMATS:
        raise LoopsearchError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    d = load(name, storage)
    out = Path(output) if output else Path(f"report-{name}")
    if out.exists() and not out.is_dir():
        raise LoopsearchError(f"--output {str(out)!r} is a file; give a directory (default report-{name}/)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOTS:  # a plot whose data is gone must not linger beside the new page
        (out / stale).unlink(missing_ok=True)
    sections = [summary(d)] + arm_sections(d, out) + [
        learning_curves(d, out), placement(d, out), loop_scaling(d, out), pareto(d, out), importances(d, out),
        leaderboard(d)]
    title = f"loopsearch report: {name}"
    page = out / ("report.html" if fmt == "html" else "report.md")
    page.write_text(render_html(title, sections) if fmt == "html" else render_md(title, sections))
    return Report(page, sections)


# ---- comparing studies -------------------------------------------------------------------------------------
def plugin_label(name: str, params: dict, keys: list[str] | None = None) -> str:
    """'transformer n_layer=4 d_model=32': the plugin and its parameters (``keys`` only, if
    given); file paths are shortened to their file names."""
    def short(v):
        return Path(v).name if isinstance(v, str) and "/" in v else v

    shown = {k: v for k, v in params.items() if keys is None or k in keys}
    return " ".join([name, *(f"{k}={short(v)}" for k, v in shown.items())])


def _differs(what: str, values: dict[str, Any], fmt=str) -> str | None:
    """'budgets differ: a 3 GFLOP, b 6 GFLOP' when the studies' values are not all equal."""
    if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) <= 1:
        return None
    return f"{what} differ: " + ", ".join(f"{n} {fmt(v)}" for n, v in values.items())


def _param_differences(refs: dict[str, Any]) -> list[str]:
    """Parameter names whose values differ between the studies' plugin references."""
    keys = sorted({k for r in refs.values() for k in r.params})
    return [k for k in keys if len({json.dumps(r.params.get(k), default=str) for r in refs.values()}) > 1]


def comparison(names: list[str], storage: str | None = None) -> tuple[list[dict], list[str]]:
    """Per study: budget, corpus, backbone, vocab, baseline val NLL, the best trial and its
    difference from its own baseline (nats/token); and warnings where the studies' budgets,
    corpora, backbones or vocab sizes differ (their val NLLs are then not directly comparable)."""
    if len(names) < 2:
        raise LoopsearchError(f"compare needs at least two studies, got {len(names)}; for one study use "
                              f"`loopsearch leaderboard --study {names[0] if names else 'NAME'}`")
    specs = {n: studies.load(n, storage)[1] for n in names}
    board = lb.frame(storage, list(names))
    backbone_keys = _param_differences({n: s.backbone for n, s in specs.items()})
    corpus_keys = _param_differences({n: s.corpus for n, s in specs.items()})
    rows = []
    for n, spec in specs.items():
        mine = board.filter(pl.col("study") == n)
        done = mine.filter(pl.col("val_nll").is_not_null())
        base = done.filter(pl.col("baseline"))
        best = done.row(0, named=True) if len(done) else None
        base_nll = base["val_nll"].min() if len(base) else None
        rows.append({
            "study": n, "space": spec.space.name, "budget": spec.budget,
            "corpus": plugin_label(spec.corpus.name, spec.corpus.params, corpus_keys),
            "backbone": plugin_label(spec.backbone.name, spec.backbone.params,
                                     ["n_layer", "d_model", *backbone_keys]),
            "vocab_size": spec.vocab_size, "trials": len(mine), "complete": int((mine["state"] == "complete").sum()),
            "baseline_val_nll": base_nll,
            "best_trial": None if best is None else best["trial"],
            "best": None if best is None else label_row(best),
            "best_val_nll": None if best is None else best["val_nll"],
            "best_delta_nll": None if best is None or base_nll is None else best["delta_nll"],
            "best_delta_lo": None if best is None else best["delta_lo"],
            "best_delta_hi": None if best is None else best["delta_hi"],
            "best_vs_baseline": None if best is None else best["vs_baseline"],
            "best_delta_basis": None if best is None else best["delta_basis"],
            "best_seeds": None if best is None else best["seeds"],
        })
    warnings = [w for w in (
        _differs("budgets", {n: s.budget for n, s in specs.items()}, format_flops),
        _differs("corpora", {n: s.corpus.model_dump() for n, s in specs.items()},
                 lambda c: plugin_label(c["name"], c["params"], corpus_keys)),
        _differs("backbones", {n: s.backbone.model_dump() for n, s in specs.items()},
                 lambda b: plugin_label(b["name"], b["params"], backbone_keys)),
        _differs("vocab sizes", {n: s.vocab_size for n, s in specs.items()}),
    ) if w]
    if warnings:
        warnings.append("so val NLL is not directly comparable across these studies; compare each best trial's "
                        "Δ base (vs its own baseline at its own budget)")
    return rows, warnings


def rich_comparison(rows: list[dict]):
    table = Table(title="loopsearch compare: val NLL in nats/token (lower is better); Δ base = best - own baseline "
                        "(paired, 95% interval; a tie when it contains 0)", title_justify="left")
    for c in ("study", "space", "budget", "corpus", "backbone", "vocab", "trials", "baseline NLL", "best trial",
              "best NLL", "Δ base [95% CI]", "vs base"):
        table.add_column(c, justify="left" if c in ("study", "space", "corpus", "backbone", "best trial") else "right",
                         overflow="fold")
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        best = "" if r["best_trial"] is None else f"{r['best_trial']}: {r['best']}"
        table.add_row(r["study"], r["space"], format_flops(r["budget"]), r["corpus"], r["backbone"],
                      str(r["vocab_size"]), f"{r['complete']}/{r['trials']}", num(r["baseline_val_nll"], ".4f"),
                      best, num(r["best_val_nll"], ".4f"),
                      lb.delta_text({"delta_nll": r["best_delta_nll"], "delta_lo": r.get("best_delta_lo"),
                                     "delta_hi": r.get("best_delta_hi")}),
                      (r.get("best_vs_baseline") or "") + (f" ({r['best_delta_basis']})" if r.get("best_delta_basis")
                                                            not in (None, "baseline") else ""))
    return table
