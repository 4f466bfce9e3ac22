"""Results as data: Optuna storage -> polars frame -> table, CSV, JSON, Markdown or Parquet.

One row per trial (a confirmation run of ``loopsearch study confirm`` is merged into the trial it
confirms: its seeds join the trial's). Every number says how sure it is:

* ``val_nll`` is the mean over the trial's seeds; ``val_nll_se`` its standard error (over seeds,
  t with seeds - 1 degrees of freedom, with 2+ seeds; else the validation's Monte-Carlo error),
  ``val_nll_lo``/``val_nll_hi`` the 95% interval.
* ``delta_nll`` is the trial's val NLL minus its study's no-loop baseline at the same budget
  (negative = better), computed paired: over the seeds both trained (the difference per seed,
  t interval), or with one common seed on identical validation windows and masks (the
  Monte-Carlo interval of the per-window differences: validation noise only, not seed noise),
  else unpaired. ``delta_basis`` says which; ``delta_lo``/``delta_hi`` bound the 95% interval;
  ``tie`` is true when it contains 0, and ``vs_baseline`` says so in words (better, worse, tie).
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import polars as pl
from rich import box
from rich.table import Table

from ..errors import LoopsearchError, StudyNotFoundError
from ..eval import loop_scaling, metrics
from ..search.record import SeedResult, TrialRecord
from ..search.space import BASELINE_ATTR
from ..search.storage import mask, open_storage, storage_url
from ..search.study import CONFIRM_OF_ATTR
from ..search.workers import SURPLUS_ATTR
from .page import md_escape
from ..stats import Interval, blocked_anova, mean_interval, paired_results, tie_words
from ..units import format_flops

FORMATS = ("table", "csv", "json", "markdown", "parquet")

SCHEMA = {
    "study": pl.String, "trial": pl.Int64, "state": pl.String, "baseline": pl.Boolean,
    "strategy": pl.String, "loop_start": pl.Int64, "loop_end": pl.Int64, "n_loops": pl.Int64, "placement": pl.String,
    "n_layer": pl.Int64, "params": pl.String, "train_flops": pl.Float64, "budget": pl.Float64,
    "inference_flops_per_token": pl.Float64, "seeds": pl.Int64,
    "val_nll": pl.Float64, "val_nll_se": pl.Float64, "val_nll_lo": pl.Float64, "val_nll_hi": pl.Float64,
    "perplexity": pl.Float64,
    "delta_nll": pl.Float64, "delta_se": pl.Float64, "delta_lo": pl.Float64, "delta_hi": pl.Float64,
    "delta_basis": pl.String, "tie": pl.Boolean, "vs_baseline": pl.String,
    "confirmed": pl.Boolean, "steps": pl.Int64, "n_params": pl.Int64, "wall_s": pl.Float64,
    # generation metrics (study objectives, or the latest `loopsearch evaluate` of the trial)
    "gen_ppl": pl.Float64, "sample_entropy": pl.Float64, "task_accuracy": pl.Float64, "zeroshot_bpb": pl.Float64,
    "task": pl.String, "zeroshot_data": pl.String,  # what task_accuracy and zeroshot_bpb were measured on
    "note": pl.String,
}


def _metric_values(a: dict, evaluated: list[dict]) -> dict:
    """gen-PPL, entropy, task accuracy and zero-shot bits/byte of a trial: its objective values if
    the study optimised them, else the latest ``loopsearch evaluate`` row of each metric."""
    out = {"gen_ppl": a.get("gen_ppl"), "sample_entropy": a.get("sample_entropy"),
           "task_accuracy": a.get("task_accuracy"), "zeroshot_bpb": a.get("zeroshot_bpb", a.get("zeroshot_nll")),
           "task": a.get("task"), "zeroshot_data": a.get("zeroshot_data")}
    for r in evaluated:  # in the order they were stored: later rows win
        if r.get("metric") == "genppl" and a.get("gen_ppl") is None:
            out.update(gen_ppl=r.get("gen_ppl"), sample_entropy=r.get("sample_entropy"))
        elif r.get("metric") == "task" and a.get("task_accuracy") is None:
            out.update(task_accuracy=r.get("accuracy"), task=r.get("task"))
        elif r.get("metric") == "zeroshot" and a.get("zeroshot_bpb", a.get("zeroshot_nll")) is None:
            out.update(zeroshot_bpb=r.get("bits_per_byte"), zeroshot_data=r.get("data"))
    for key in ("task", "zeroshot_data"):
        out[key] = None if out[key] is None else str(out[key])
    return out


def _measured_on(df: pl.DataFrame, column: str, shown: str) -> str:
    """'task acc: addition' for the caption: what a metric column was measured on (file names
    without their folders; several values are all named)."""
    if column not in df.columns or shown not in df.columns:
        return ""
    values = sorted({Path(v).name for v in df[column].drop_nulls().to_list()})
    return f"{shown}: {', '.join(values)}" if values else ""


def _note(t: optuna.trial.FrozenTrial, retried_as: dict[int, int]) -> str:
    """Why a trial stopped, or how it resumed: pruned (at which GFLOPs), rejected, failed (out of
    memory), its worker died (and which trial retried it), resumed from a checkpoint."""
    a = t.user_attrs
    note = a.get("rejected") or a.get("failed") or t.system_attrs.get("fail_reason")
    if not note and t.state == optuna.trial.TrialState.FAIL and t.number in retried_as:
        note = f"worker died (no heartbeat); retried as trial {retried_as[t.number]}"
    if not note and "resumed_from_flops" in a:
        note = (f"resumed trial {t.system_attrs.get('failed_trial', '?')} from its checkpoint at "
                f"{a['resumed_from_flops']:.3g} FLOPs ({a.get('flops_lost', 0):.3g} lost)")
    return str(note or "")


def _row(study: str, t: optuna.trial.FrozenTrial, evaluated: list[dict] | None = None,
         retried_as: dict[int, int] | None = None) -> dict:
    a = t.user_attrs
    r = TrialRecord.of(t)
    searched = {k.split(".", 1)[-1] if k.startswith(f"{r.strategy}.") else k: v for k, v in t.params.items()
                if k not in ("strategy", "loop_start", "block_length") and not k.endswith(".n_loops")}
    note = _note(t, retried_as or {})
    return {
        "study": study, "trial": t.number, "state": t.state.name.lower(), "baseline": bool(a.get(BASELINE_ATTR)),
        # a trial of the no-loop model: the study's baseline, or (arms) the baseline arm at any budget and seed
        "baseline_arm": bool(a.get(BASELINE_ATTR) or r.baseline_arm),
        "strategy": r.strategy, "loop_start": r.loop_start, "loop_end": r.loop_end,
        "n_loops": r.n_loops, "n_layer": r.n_layer,
        "placement": placement_label(r.strategy, r.strategy_params, r.loop_start, r.loop_end, r.n_loops, r.n_layer,
                                     bool(a.get(BASELINE_ATTR) or r.baseline_arm)),
        "params": " ".join(f"{k}={v}" for k, v in sorted(searched.items())),
        "train_flops": r.train_flops, "budget": r.budget,
        "inference_flops_per_token": r.inference_flops_per_token,
        "val_nll": r.val_nll, "val_nll_se": r.val_nll_se, "perplexity": r.perplexity,
        "delta_nll": None, "seeds": None, "confirmed": False,
        "steps": r.steps, "n_params": r.n_params, "wall_s": r.wall_s,
        **_metric_values(a, evaluated or []),
        "note": str(note).splitlines()[0][:120] if note else "",
    }


def placement_label(strategy: str | None, params: dict | None, loop_start: int | None, loop_end: int | None,
                    n_loops: int | None, n_layer: int | None, baseline: bool) -> str:
    """A short name for a trial's configuration: "baseline", "L1-2 x3 U" (layers 1-2 looped 3 times,
    S ~ U{1..3} in training; F: p(S) ~ 1/FLOPs(S); LN: log-normal-Poisson S; R: re-injection), "L1 ACT<=4"
    (halting), "L0-1 t:middle 1-4" (timestep), "L1-2 rec x4" (recurrent), "L1-2 gate<=3" (exit_gate),
    "L1-2 MoR x3" (router)."""
    if baseline:
        return "baseline"
    if strategy in (None, "none") or not loop_end:
        return f"plain {n_layer}L" if n_layer else "plain"
    p = params or {}
    block = f"L{loop_start}" if loop_end - (loop_start or 0) == 1 else f"L{loop_start}-{loop_end - 1}"
    if strategy == "fixed":
        draw = {"uniform": " U", "flop_proportional": " F", "lognormal_poisson": " LN"}.get(p.get("train_loops"), "")
        tag = f"x{n_loops}{draw}" + (" R" if p.get("reinject") else "")
    elif strategy == "halting":
        tag = f"ACT<={n_loops}"
    elif strategy == "timestep":
        tag = f"t:{p.get('schedule', '?')} {p.get('min_loops', 1)}-{n_loops}"
    elif strategy == "recurrent":
        tag = f"rec x{n_loops}"
    elif strategy == "exit_gate":
        tag = f"gate<={n_loops}"
    elif strategy == "router":
        tag = f"MoR x{n_loops}"
    else:
        tag = f"{strategy} x{n_loops}"
    return f"{block} {tag}"


def seed_values(t: optuna.trial.FrozenTrial) -> dict[int, dict]:
    """{seed offset: {val_nll, val_nll_se, val_windows, val_draws, eval_key}} of a complete trial:
    each seed it trained (older trials: their one seed)."""
    rec = TrialRecord.of(t)
    if t.state != optuna.trial.TrialState.COMPLETE or rec.val_nll is None:
        return {}
    rows = rec.seed_results or [SeedResult(seed_offset=rec.seed_offset or 0, val_nll=rec.val_nll,
                                           val_nll_se=rec.val_nll_se, attrs=t.user_attrs)]
    out = {}
    for r in rows:
        out[r.seed_offset] = {"val_nll": r.val_nll, "val_nll_se": r.val_nll_se,
                              "val_windows": r.attrs.get("val_windows"), "val_draws": r.attrs.get("val_draws"),
                              "eval_key": r.attrs.get("eval_key")}
    return out


def value_interval(seeds: dict[int, dict]):
    """The mean val NLL over seeds with its interval: over seeds (t, n - 1 df) with 2+ seeds,
    else the one validation's Monte-Carlo error (normal)."""
    if len(seeds) >= 2:
        return mean_interval([v["val_nll"] for v in seeds.values()])
    (v,) = seeds.values()
    return Interval(v["val_nll"], v.get("val_nll_se"), None)


def paired_delta(rows: dict[int, dict], base: dict[int, dict]):
    """(interval of rows - base, basis): paired over common seeds (2+), or on the same windows
    and masks (1 common seed, equal eval keys), else unpaired."""
    common = sorted(set(rows) & set(base))
    if len(common) >= 2:
        return mean_interval([rows[s]["val_nll"] - base[s]["val_nll"] for s in common]), f"{len(common)} seeds"
    if len(common) == 1:
        masks = paired_results(base[common[0]], rows[common[0]])  # None unless same windows and masks
        if masks is not None:
            return masks, "masks"
    mine, theirs = value_interval(rows), value_interval(base)
    if mine.se is None or theirs.se is None:
        return Interval(mine.mean - theirs.mean, None), "unpaired"
    return Interval(mine.mean - theirs.mean, (mine.se ** 2 + theirs.se ** 2) ** 0.5, None), "unpaired"


def frame(storage: str | None = None, studies: list[str] | None = None) -> pl.DataFrame:
    store = open_storage(storage)
    available = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    names = studies or available
    missing = [n for n in names if n not in available]
    if missing:
        raise StudyNotFoundError(missing[0], available, mask(storage_url(storage)))
    rows = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=store)
        evaluated = metrics.stored(study)
        # surplus trials (past the target) and reused duplicates (a configuration already listed) are not rows
        trials = [t for t in study.get_trials(deepcopy=False)
                  if not t.user_attrs.get(SURPLUS_ATTR) and t.user_attrs.get("duplicate_of") is None]
        retried_as = {t.system_attrs["retry_history"][-1]: t.number
                      for t in trials if t.system_attrs.get("retry_history")}
        originals, seeds, confirms = _merge_confirmations(trials)
        study_rows = [_row(name, t, evaluated.get(t.number), retried_as) for t in originals]
        _add_intervals(study_rows, originals, seeds, set(confirms))
        rows += study_rows
    df = pl.DataFrame(rows, schema=SCHEMA)
    return df.sort(["study", "val_nll", "trial"], nulls_last=True)


def _merge_confirmations(trials: list) -> tuple[list, dict[int, dict[int, dict]], dict[int, list]]:
    """(the trials that are not confirmations, {trial: {seed: values}} with each confirmation's
    seeds merged into the trial it confirms, {trial: its confirmation trials})."""
    confirms: dict[int, list] = {}
    for t in trials:
        if t.user_attrs.get(CONFIRM_OF_ATTR) is not None:
            confirms.setdefault(int(t.user_attrs[CONFIRM_OF_ATTR]), []).append(t)
    originals = [t for t in trials if t.user_attrs.get(CONFIRM_OF_ATTR) is None]
    seeds = {}
    for t in originals:
        values = seed_values(t)
        for c in confirms.get(t.number, []):
            values.update(seed_values(c))
        seeds[t.number] = values
    return originals, seeds, confirms


def spread_tests(storage: str | None = None, studies: list[str] | None = None) -> list[str]:
    """One line per study and budget whose looped trials share 2+ seeds: does at least one of them
    differ from the others beyond seed noise? The F test of trials x seeds with the seed effect
    removed (``stats.blocked_anova``). The baseline is left out (each trial's paired difference from
    it is in the table). After ``study confirm`` only the confirmed trials count, on their
    confirmation seeds: the seeds that picked them as the best would bias the test. Trials with
    other seeds than the most common set are left out, and said so. Arms grids (one seed per
    trial) get no line: ``repro`` and ``sweep`` report their own intervals."""
    store = open_storage(storage)
    names = studies or [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    lines = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=store)
        trials = [t for t in study.get_trials(deepcopy=False)
                  if not t.user_attrs.get(SURPLUS_ATTR) and t.user_attrs.get("duplicate_of") is None]
        originals, seeds, confirms = _merge_confirmations(trials)
        looped = [t for t in originals if not t.user_attrs.get(BASELINE_ATTR)]
        if confirms:
            values = {t.number: {s: v for c in confirms[t.number] for s, v in seed_values(c).items()}
                      for t in looped if t.number in confirms}
            which, basis = "confirmed trials", "their confirmation seeds"
        else:
            values = {t.number: seeds[t.number] for t in looped}
            which, basis = "looped trials", "seeds"
        by_budget: dict[float, dict[int, dict]] = {}
        for t in looped:
            if len(values.get(t.number, {})) >= 2:
                by_budget.setdefault(float(TrialRecord.of(t).budget or 0.0), {})[t.number] = values[t.number]
        for budget, group in sorted(by_budget.items()):
            sets = [frozenset(v) for v in group.values()]
            common = max(set(sets), key=lambda s: (sum(s <= other for other in sets), len(s), -min(s)))
            members = [n for n, v in group.items() if common <= set(v)]
            if len(members) < 2:
                continue
            order = sorted(common)
            a = blocked_anova([[group[n][s]["val_nll"] for s in order] for n in members])
            verdict = ("at least one differs from the others beyond seed noise" if a.differ()
                       else "none differs from the others beyond seed noise: a tie")
            at = f" at {format_flops(budget)}" if len(by_budget) > 1 else ""
            left = len(group) - len(members)
            rest = f"; {left} trial{'s' * (left != 1)} with other seeds left out" if left else ""
            paired = f"paired by {basis} {', '.join(map(str, order))}"
            lines.append(f"{name}{at}: of its {len(members)} {which} ({paired}), {verdict}: "
                         f"F({a.df_arms}, {a.df_residual}) = {a.f:.2f}, p = {a.p:.2g} (seed effect removed; "
                         f"spread of their means {a.spread:.4f} vs residual SE {a.residual_se:.4f}{rest})")
    return lines


def _add_intervals(rows: list[dict], trials: list, seeds: dict[int, dict], confirmed: set[int]) -> None:
    """Fill each row's val NLL interval and its paired difference from the baseline trained at
    the same budget (arms: the baseline arm's trials at that budget, by seed)."""
    base_by_budget: dict[float, dict[int, dict]] = {}
    for row, t in zip(rows, trials):
        if row["baseline_arm"] and seeds[t.number]:
            base_by_budget.setdefault(float(row["budget"] or 0.0), {}).update(seeds[t.number])
    for row, t in zip(rows, trials):
        values = seeds[t.number]
        if not values:
            continue
        ci = value_interval(values)
        row.update(seeds=len(values), val_nll=ci.mean, val_nll_se=ci.se, val_nll_lo=ci.lo, val_nll_hi=ci.hi,
                   confirmed=t.number in confirmed)
        base = base_by_budget.get(float(row["budget"] or 0.0))
        if base is None:
            continue
        if row["baseline_arm"]:
            row.update(delta_nll=0.0, delta_basis="baseline", vs_baseline="baseline")
            continue
        delta, basis = paired_delta(values, base)
        row.update(delta_nll=delta.mean, delta_se=delta.se, delta_lo=delta.lo, delta_hi=delta.hi,
                   delta_basis=basis, tie=delta.tie, vs_baseline=tie_words(delta) or "no interval")
    for row in rows:
        row.pop("baseline_arm", None)


SCALING_SCHEMA = {
    "study": pl.String, "trial": pl.Int64, "strategy": pl.String, "loop_start": pl.Int64, "loop_end": pl.Int64,
    "trained_n_loops": pl.Int64, "n_loops": pl.Int64, "exit": pl.String, "mean_loops": pl.Float64,
    "mean_token_loops": pl.Float64, "inference_flops_per_token": pl.Float64, "val_nll": pl.Float64,
    "perplexity": pl.Float64,
}


def scaling_frame(storage: str | None = None, studies: list[str] | None = None) -> pl.DataFrame:
    """One row per (trial, loop count, exit criterion) evaluated by `loopsearch eval`: ``n_loops``
    is the loop count (the cap, with an exit criterion), ``mean_loops`` what ran on average."""
    store = open_storage(storage)
    names = studies or [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    rows = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=store)
        attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
        for number, evals in sorted(loop_scaling.stored(study).items()):
            a = attrs.get(number, {})
            rows += [{"study": name, "trial": number, "strategy": a.get("strategy"), "loop_start": a.get("loop_start"),
                      "loop_end": a.get("loop_end"), "exit": "none", "mean_loops": float(r["n_loops"]),  # older rows
                      **{k: r[k] for k in SCALING_SCHEMA if k in r}} for r in evals]
    df = pl.DataFrame(rows, schema=SCALING_SCHEMA)
    return df.sort(["study", "trial", "n_loops", pl.col("exit") != "none", "exit"])


def pareto(df: pl.DataFrame, storage: str | None = None) -> pl.DataFrame:
    """Only the Pareto-optimal trials of each study (Optuna's ``best_trials``: no other complete
    trial is at least as good in every objective and better in one). For a single-objective
    study that is its best trial."""
    store = open_storage(storage)
    keep = []
    for name in df["study"].unique(maintain_order=True).to_list():
        study = optuna.load_study(study_name=name, storage=store)
        keep += [(name, t.number) for t in study.best_trials]
    wanted = pl.DataFrame(keep, schema={"study": pl.String, "trial": pl.Int64}, orient="row")
    return df.join(wanted, on=["study", "trial"], how="semi")


def top(df: pl.DataFrame, k: int | None) -> pl.DataFrame:
    """The k best trials of each study by val NLL (unfinished trials last)."""
    if k is None:
        return df
    return df.group_by("study", maintain_order=True).head(k)


def check_writable(output: str) -> None:
    """One line, before any work, when ``output`` cannot be written (missing or read-only folder)."""
    import os

    parent = Path(output).resolve().parent
    if not parent.is_dir():
        raise LoopsearchError(f"--output {output}: folder {parent} does not exist; create it or pick another path")
    if not os.access(parent, os.W_OK):
        raise LoopsearchError(f"--output {output}: folder {parent} is not writable; pick another path")


def write(df: pl.DataFrame, fmt: str, output: str | None = None) -> str | None:
    """Serialise ``df``; returns the text for text formats when no output file is given."""
    if fmt not in FORMATS:
        raise LoopsearchError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output:
        check_writable(output)
    if fmt == "parquet":
        if not output:
            raise LoopsearchError("parquet is binary: give --output FILE.parquet")
        df.write_parquet(output)
        return None
    text = {
        "csv": lambda: df.write_csv(),
        "json": lambda: json.dumps(df.to_dicts(), indent=2),
        "markdown": lambda: markdown(df),
        "table": lambda: markdown(df),
    }[fmt]()
    if output:
        Path(output).write_text(text)
        return None
    return text


def _fmt(col: str, v) -> str:
    if v is None:
        return ""
    if col in ("train_flops", "budget", "inference_flops_per_token"):
        return f"{v:.3g}"
    if col in ("val_nll", "delta_nll"):
        return f"{v:+.4f}" if col == "delta_nll" else f"{v:.4f}"
    if col in ("val_nll_se", "delta_se"):
        return f"{v:.4f}"
    if col in ("gen_ppl", "sample_entropy", "task_accuracy", "zeroshot_bpb"):
        return f"{v:.2f}" if col == "gen_ppl" else f"{v:.3f}"
    if col in ("perplexity", "wall_s"):
        return f"{v:.2f}" if col == "perplexity" else f"{v:.1f}"
    return str(v)


def value_text(row: dict) -> str:
    """'5.6926 ± 0.0103' (val NLL ± its standard error)."""
    if row.get("val_nll") is None:
        return ""
    se = row.get("val_nll_se")
    return f"{row['val_nll']:.4f}" + ("" if se is None else f" ± {se:.4f}")


def delta_text(row: dict, digits: int = 4) -> str:
    """'+0.0436 [+0.0401, +0.0471]' (the paired difference from the baseline, 95% interval)."""
    if row.get("delta_nll") is None:
        return ""
    if row.get("delta_lo") is None:
        return f"{row['delta_nll']:+.{digits}f}"
    return f"{row['delta_nll']:+.{digits}f} [{row['delta_lo']:+.{digits}f}, {row['delta_hi']:+.{digits}f}]"


DISPLAY = ["study", "trial", "state", "strategy", "loop_start", "loop_end", "n_loops", "n_layer", "params",
           "train_flops", "inference_flops_per_token", "seeds", "val NLL ± se", "perplexity", "Δ baseline [95% CI]",
           "vs baseline", "steps", "wall_s", "gen_ppl", "sample_entropy", "task_accuracy", "zeroshot_bpb", "note"]
_DERIVED = {"val NLL ± se": value_text, "Δ baseline [95% CI]": delta_text,
            "vs baseline": lambda r: (r.get("vs_baseline") or "") + (
                f" ({r['delta_basis']})" if r.get("delta_basis") not in (None, "baseline") else "")}


def markdown(df: pl.DataFrame) -> str:
    """The leaderboard as a Markdown table: val NLL with its standard error, the paired difference
    from the baseline with its 95% interval, and the verdict in words (tie when it contains 0)."""
    cols = DISPLAY if "baseline" in df.columns else list(df.columns)
    optional = ("gen_ppl", "sample_entropy", "task_accuracy", "zeroshot_bpb")
    cols = [c for c in cols if c not in optional or df[c].is_not_null().any()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows(named=True):
        label = {**row, "trial": f"{row['trial']}{' (baseline)' if row.get('baseline') else ''}"}
        cells = [_DERIVED[c](row) if c in _DERIVED else _fmt(c, label[c]) for c in cols]
        lines.append("| " + " | ".join(md_escape(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def rich_scaling_table(df: pl.DataFrame):
    table = Table(title="inference loop scaling: val NLL (nats/token) and inference FLOPs/token per loop count "
                        "(the cap, with an exit criterion; mean loops = what ran)",
                  title_justify="left")
    for c in ("study", "trial", "strategy", "block", "trained loops", "loops", "exit", "mean loops", "token loops",
              "inf FLOP/tok", "val NLL", "ppl≤"):
        table.add_column(c, justify="left" if c in ("study", "strategy", "block", "exit") else "right")
    for r in df.iter_rows(named=True):
        table.add_row(r["study"], str(r["trial"]), r["strategy"] or "", f"[{r['loop_start']},{r['loop_end']})",
                      str(r["trained_n_loops"]), str(r["n_loops"]), r["exit"] or "none", f"{r['mean_loops']:.2f}",
                      "" if r.get("mean_token_loops") is None else f"{r['mean_token_loops']:.2f}",
                      f"{r['inference_flops_per_token']:.3g}", f"{r['val_nll']:.4f}", f"{r['perplexity']:.2f}")
    return table


HEADERS = {"gen_ppl": "gen PPL", "sample_entropy": "entropy", "task_accuracy": "task acc",
           "zeroshot_bpb": "0-shot bits/B", "inference_flops_per_token": "inf FLOP/tok",
           "train_flops": "train FLOP", "n_loops": "loops", "n_layer": "layers", "delta_nll": "Δ base",
           "perplexity": "ppl≤", "val_nll": "val NLL", "Δ baseline [95% CI]": "Δ base [95% CI]",
           "vs baseline": "vs base", "placement": "config"}
# the compact view's columns, most important first: those that do not fit the terminal are dropped
COMPACT = ["trial", "placement", "val NLL ± se", "Δ baseline [95% CI]", "vs baseline", "steps", "gen_ppl",
           "task_accuracy", "zeroshot_bpb", "sample_entropy", "seeds", "train_flops", "inference_flops_per_token",
           "note"]
REQUIRED = ("trial", "placement", "val NLL ± se")


def _cells(df: pl.DataFrame, cols: list[str], compact: bool) -> list[list[str]]:
    """The table's cells; compact: the verdict without its basis (the caption explains it)."""
    rows = []
    for row in df.iter_rows(named=True):
        row = {**row, "block": f"[{row['loop_start']},{row['loop_end']})" if row["loop_end"] else "-"}
        cells = [(row.get("vs_baseline") or "") if compact and c == "vs baseline"
                 else delta_text(row, 3) if compact and c == "Δ baseline [95% CI]"
                 else _DERIVED[c](row) if c in _DERIVED else _fmt(c, row[c]) for c in cols]
        if row["baseline"]:
            cells[cols.index("trial")] += "★"
        rows.append(cells)
    return rows


def _width(header: str, cells: list[str]) -> int:
    """A column's width: its longest cell, or its header's longest word (headers may wrap)."""
    return max([len(c) for c in cells] + [max(len(w) for w in header.split())])


def rich_table(df: pl.DataFrame, title: str | None = None, width: int | None = None, wide: bool = False):
    """The leaderboard for a terminal. Compact (default): the trial, a short configuration label
    ("baseline", "L1-2 x3 U"), val NLL ± its standard error, the paired difference from the
    baseline with its 95% interval, the verdict, the steps trained, then any evaluate metrics and
    the rest as the terminal's ``width`` allows; no cell is ever cut, and the columns left out are
    named in the caption (``--wide`` shows them). Wide: every column."""
    present = lambda c: c not in ("gen_ppl", "sample_entropy", "task_accuracy", "zeroshot_bpb", "note") or (  # noqa: E731
        df[c].is_not_null().any() and (c != "note" or (df["note"] != "").any()))
    if wide:
        cols = ["trial", "state", "strategy", "block", "n_loops", "n_layer", "params", "steps", "train_flops",
                "inference_flops_per_token", "seeds", "val NLL ± se", "Δ baseline [95% CI]", "vs baseline"]
        cols += [c for c in ("gen_ppl", "sample_entropy", "task_accuracy", "zeroshot_bpb", "note") if present(c)]
        dropped: list[str] = []
    else:
        wanted = [c for c in COMPACT if present(c)]
        cells = _cells(df, wanted, compact=True)
        widths = {c: _width(HEADERS.get(c, c), [r[i] for r in cells]) for i, c in enumerate(wanted)}
        budget = (width or 200) - 1
        cols, used = [], 0
        for c in wanted:
            need = widths[c] + 2  # one space of padding each side
            if c in REQUIRED or used + need <= budget:
                cols.append(c)
                used += need
        dropped = [HEADERS.get(c, c) for c in wanted if c not in cols]
    if df["study"].n_unique() > 1:
        cols.insert(0, "study")
    caption = "val NLL in nats/token (lower is better), ★ = no-loop baseline; Δ: paired difference from it with " \
              "its 95% interval, a tie when the interval contains 0"
    if not wide:
        caption += "; config: layers looped, xN loops, U = S~U{1..N} in training (F: p(S)~1/FLOPs, LN: log-normal)"
    measured = [m for m in (_measured_on(df, "task", "task_accuracy") if "task_accuracy" in cols else "",
                            _measured_on(df, "zeroshot_data", "zeroshot_bpb") if "zeroshot_bpb" in cols else "") if m]
    if measured:
        caption += "; " + "; ".join(m.replace("task_accuracy", HEADERS["task_accuracy"])
                                    .replace("zeroshot_bpb", HEADERS["zeroshot_bpb"]) for m in measured)
    if dropped:
        caption += f". Not shown at this width: {', '.join(dropped)} (--wide shows every column)"
    table = Table(title=title or "loopsearch leaderboard", caption=caption, title_justify="left",
                  caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for c in cols:
        left = c in ("study", "state", "strategy", "params", "note", "block", "placement", "vs baseline")
        table.add_column(HEADERS.get(c, c), justify="left" if left else "right",  # never cut: fold or fit
                         overflow="fold", no_wrap=not wide and c not in ("params", "note"))
    for row, cells in zip(df.iter_rows(named=True), _cells(df, cols, compact=not wide)):
        table.add_row(*cells, style="dim" if row["state"] != "complete" else None)
    return table
