"""Search efficiency on the placement table: replay Optuna samplers and pruners, no training.

Every trial looks its placement up in the table that benchmarks/placement_table.py wrote
(benchmarks/placement_table.parquet by default) instead of training it, and is charged what
training it cost: its ``train_flops``, or, when a pruner stops it, the training FLOPs of the last
learning-curve point it reported. For every method and seed the replay records the compute
(training FLOPs, summed over trials) spent until the best completed trial is within ``--tolerance``
(1%) of the best val NLL in the searched space, and stops there, or once the compute reaches that
of the full grid (then the seed counts as "not reached").

The space (conditional, define-by-run, as loopsearch's own ``suggest``): ``n_loops`` (int, from
the table's loop counts; 1 = the non-looped baseline, which has no block), then, for n_loops > 1,
``block_length`` (int, 1 to the longest block) and ``loop_start`` (int, 0 to n_layer - length).
Two searches are replayed:

- ``all``: the whole table (n_loops 1 included); the target is the table's best row;
- ``looped``: where to loop (n_loops >= 2 only, as the ``early_middle`` space); the target is the
  best looped row and the grid is the looped rows.

Methods: the Optuna samplers and pruners that ``loopsearch study`` builds, made by the same
functions (``loopsearch.search.study.make_sampler`` / ``make_pruner``: TPE with 4 startup trials and the
constant liar, pruners at the first report with reduction factor 3). Samplers whose dependencies
are not installed (QMC and GP need scipy, CMA-ES needs cmaes) are listed as skipped with the
reason. A repeated suggestion of an already-tried placement is looked up and charged again, as a
real study would train it again. As loopsearch's objective does, every curve point is reported,
the last one included (so a trial can be pruned after its full training: it then costs its full
FLOPs and its value does not count). Intermediate values are keyed by the nominal FLOP checkpoint
(budget * i / eval_points, in GFLOPs), so every placement reports at the same steps; the FLOPs
charged are the ones actually spent.

The "full grid" row trains every placement of the space once: that is what it costs to know the
best, whatever the order.

Run::

    python benchmarks/search_efficiency.py                       # 20 seeds, writes benchmarks/search_efficiency.md
    python benchmarks/search_efficiency.py --seeds 5 --methods random tpe --output /tmp/se.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import polars as pl
from optuna.trial import TrialState

from loopsearch.spec import BlockSpace, IntRange, SearchSpace, StudySpec, TrainConfig
from loopsearch.search.study import make_pruner, make_sampler

HERE = Path(__file__).resolve().parent
DEFAULT_TABLE = HERE / "placement_table.parquet"
DEFAULT_OUTPUT = HERE / "search_efficiency.md"
METADATA_KEY = "loopsearch.placement_table"

# method label -> (loopsearch sampler name, loopsearch pruner name)
METHODS = {
    "random": ("random", "none"),
    "tpe": ("tpe", "none"),
    "tpe + median": ("tpe", "median"),
    "tpe + successive_halving": ("tpe", "successive_halving"),
    "tpe + hyperband": ("tpe", "hyperband"),
    "qmc": ("qmc", "none"),
    "gp": ("gp", "none"),
    "cmaes": ("cmaes", "none"),
}
GRID = "full grid"
SAMPLER_NEEDS = {"qmc": ("scipy",), "gp": ("scipy", "torch"), "cmaes": ("cmaes",)}  # optional imports of Optuna's

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ---- the table -----------------------------------------------------------------------------------
Key = tuple[int, int, int]  # (n_loops, loop_start, loop_end); the baseline is (1, 0, 0)


@dataclass
class Entry:
    """One trained placement: final val NLL (nats/token), training FLOPs, and its learning curve
    as (training FLOPs spent, val NLL) points, the last being the final value."""

    val_nll: float
    train_flops: float
    curve: list[tuple[float, float]]


@dataclass
class Table:
    """The placement table restricted to one search space."""

    entries: dict[Key, Entry]
    n_layer: int
    max_block: int
    loop_counts: list[int]  # the n_loops values searched (1 = baseline)
    budget: float  # training FLOPs per configuration
    eval_points: int
    settings: dict = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(e.val_nll for e in self.entries.values())

    @property
    def grid_flops(self) -> float:
        """Training FLOPs of every placement once (the full grid)."""
        return sum(e.train_flops for e in self.entries.values())

    def best_key(self) -> Key:
        return min(self.entries, key=lambda k: self.entries[k].val_nll)


def key_of(n_loops: int, loop_start: int, loop_end: int) -> Key:
    return (1, 0, 0) if n_loops == 1 else (n_loops, loop_start, loop_end)


def label(key: Key) -> str:
    n, start, end = key
    return "baseline" if n == 1 else f"[{start},{end})x{n}"


def read_settings(path: Path) -> dict:
    """The settings placement_table.py stored in the parquet's key-value metadata ({} if none)."""
    meta = pl.read_parquet_metadata(path)
    return json.loads(meta.get(METADATA_KEY, "{}"))


def table_from_frame(frame: pl.DataFrame, looped_only: bool = False, settings: dict | None = None) -> Table:
    """A Table of the frame's rows (columns as placement_table.py writes them); ``looped_only``
    drops the baseline (n_loops 1)."""
    if looped_only:
        frame = frame.filter(pl.col("n_loops") > 1)
    entries = {key_of(r["n_loops"], r["loop_start"], r["loop_end"]):
               Entry(r["val_nll"], r["train_flops"], [(g * 1e9, nll) for g, nll in r["curve"]])
               for r in frame.iter_rows(named=True)}
    first = frame.row(0, named=True)
    n_layer = int(first["n_layer"]) if "n_layer" in frame.columns else int(frame["loop_end"].max())
    curve_lengths = {len(e.curve) for e in entries.values()}
    if len(curve_lengths) != 1:
        raise ValueError(f"curves of different lengths {sorted(curve_lengths)}: every row needs the same eval points")
    budget = float(first["budget"]) if "budget" in frame.columns else max(e.train_flops for e in entries.values())
    return Table(entries, n_layer, int(frame["block_length"].max()), sorted(set(frame["n_loops"].to_list())),
                 budget, curve_lengths.pop(), settings or {})


def load_table(path: Path, looped_only: bool = False) -> Table:
    return table_from_frame(pl.read_parquet(path), looped_only, read_settings(path))


# ---- one replayed study ---------------------------------------------------------------------------
@dataclass
class Run:
    """One method, one seed: compute (training FLOPs) spent until within tolerance of the best
    (None: not within the grid's compute), trials run by then (pruned ones included), of which
    pruned, and how many distinct placements they were."""

    reached_flops: float | None
    trials: int
    pruned: int
    distinct: int


def study_spec(table: Table, sampler: str, pruner: str, seed: int) -> StudySpec:
    """A loopsearch StudySpec for the sampler and pruner factories (the space is descriptive:
    the replay suggests through ``suggest_placement``)."""
    space = SearchSpace(name="placement_table", strategies=["none", "fixed"],
                        block=BlockSpace(layers=(0, table.n_layer), length=(1, table.max_block)),
                        strategy={"fixed": {"n_loops": IntRange(low=2, high=max(2, max(table.loop_counts)))}})
    return StudySpec(name="replay", space=space, budget=table.budget, sampler=sampler, pruner=pruner, seed=seed,
                     n_trials=len(table.entries), train=TrainConfig(eval_points=table.eval_points))


def suggest_placement(trial: optuna.Trial, table: Table) -> Key:
    """n_loops, then (looped only) block_length and loop_start: the table key of the suggestion."""
    n_loops = trial.suggest_int("n_loops", min(table.loop_counts), max(table.loop_counts))
    if n_loops == 1:
        return key_of(1, 0, 0)
    length = trial.suggest_int("block_length", 1, table.max_block)
    start = trial.suggest_int("loop_start", 0, table.n_layer - length)
    return key_of(n_loops, start, start + length)


def report_steps(table: Table) -> list[int]:
    """The Optuna step (GFLOPs) of each curve point: the nominal checkpoints budget * i / eval_points."""
    return [int(table.budget * (i + 1) / table.eval_points // 1e9) for i in range(table.eval_points)]


def replay_trial(trial: optuna.Trial, entry: Entry, steps: list[int], prune: bool) -> tuple[float, bool]:
    """Report the entry's curve to the trial (if pruning); return (FLOPs charged, pruned?)."""
    if not prune:
        return entry.train_flops, False
    for step, (spent, nll) in zip(steps, entry.curve):
        trial.report(nll, step)
        if trial.should_prune():
            return spent, True
    return entry.train_flops, False


def replay(table: Table, sampler: str, pruner: str, seed: int, tolerance: float) -> Run:
    """One study (ask/tell, in memory) until the best completed value is within ``tolerance``
    (relative) of the table's best, or until the compute spent reaches the full grid's."""
    spec = study_spec(table, sampler, pruner, seed)
    study = optuna.create_study(sampler=make_sampler(spec), pruner=make_pruner(spec), direction="minimize")
    target, cap, steps = table.best * (1 + tolerance), table.grid_flops, report_steps(table)
    spent, best, pruned, seen = 0.0, math.inf, 0, set()
    while spent < cap:
        trial = study.ask()
        key = suggest_placement(trial, table)
        entry = table.entries[key]
        seen.add(key)
        cost, was_pruned = replay_trial(trial, entry, steps, pruner != "none")
        spent += cost
        if was_pruned:
            pruned += 1
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, entry.val_nll)
        best = min(best, entry.val_nll)
        if best <= target:
            return Run(spent if spent <= cap else None, len(study.trials), pruned, len(seen))
    return Run(None, len(study.trials), pruned, len(seen))


def grid_run(table: Table) -> Run:
    """Every placement once: the compute to know the best."""
    n = len(table.entries)
    return Run(table.grid_flops, n, 0, n)


def unavailable(sampler: str) -> str | None:
    """Why a sampler cannot run here (a missing optional dependency of Optuna's), or None."""
    missing = [m for m in SAMPLER_NEEDS.get(sampler, ()) if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)}, not installed" if missing else None


# ---- summary --------------------------------------------------------------------------------------
@dataclass
class Summary:
    method: str
    runs: list[Run]

    @property
    def costs(self) -> list[float]:
        """Compute to reach per seed, FLOPs; inf where not reached within the grid's compute."""
        return [r.reached_flops if r.reached_flops is not None else math.inf for r in self.runs]

    @property
    def success(self) -> float:
        return sum(math.isfinite(c) for c in self.costs) / len(self.runs)

    @property
    def median(self) -> float:
        """Median compute to reach, FLOPs (inf when half the seeds or more did not reach)."""
        return statistics.median(self.costs)


def summarise(table: Table, methods: list[str], seeds: list[int], tolerance: float) -> tuple[list[Summary], dict]:
    """Replay every method over every seed; return the summaries (grid first) and skipped methods."""
    out, skipped = [Summary(GRID, [grid_run(table) for _ in seeds])], {}
    for method in methods:
        sampler, pruner = METHODS[method]
        reason = unavailable(sampler)
        if reason:
            skipped[method] = reason
            continue
        out.append(Summary(method, [replay(table, sampler, pruner, seed, tolerance) for seed in seeds]))
    return out, skipped


def fmt_flops(x: float) -> str:
    return "not reached" if not math.isfinite(x) else f"{x:.3g}"


def fmt_grid(x: float, grid: float) -> str:
    return "not reached" if not math.isfinite(x) else f"{x / grid:.2f}"


def markdown_table(table: Table, summaries: list[Summary]) -> str:
    """One row per method: success rate, median and min-max compute to reach (FLOPs and
    full-grid equivalents), against random search and the grid, and trials spent."""
    grid = table.grid_flops
    random_median = next((s.median for s in summaries if s.method == "random"), math.nan)
    lines = ["| method | reached within grid compute | median compute, FLOPs | min-max, FLOPs | median, grids "
             "| min-max, grids | vs random (median) | median trials (pruned) | median distinct placements |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        costs = s.costs
        lo, hi = min(costs), max(costs)
        vs_random = (f"{s.median / random_median:.2f}x" if math.isfinite(s.median) and math.isfinite(random_median)
                     else "-")
        trials = statistics.median(r.trials for r in s.runs)
        pruned = statistics.median(r.pruned for r in s.runs)
        distinct = statistics.median(r.distinct for r in s.runs)
        lines.append(f"| {s.method} | {sum(math.isfinite(c) for c in costs)}/{len(costs)} ({s.success:.0%}) "
                     f"| {fmt_flops(s.median)} | {fmt_flops(lo)} - {fmt_flops(hi)} | {fmt_grid(s.median, grid)} "
                     f"| {fmt_grid(lo, grid)} - {fmt_grid(hi, grid)} | {vs_random} | {trials:g} ({pruned:g}) "
                     f"| {distinct:g} |")
    return "\n".join(lines)


def describe(name: str, table: Table, tolerance: float) -> str:
    """The search's header: space size, target, grid compute, best rows."""
    ranked = sorted(table.entries, key=lambda k: table.entries[k].val_nll)
    top = ", ".join(f"{label(k)} {table.entries[k].val_nll:.4f}" for k in ranked[:3])
    return (f"### Search `{name}`: {len(table.entries)} placements, n_loops {table.loop_counts}\n\n"
            f"Target: val NLL <= {table.best * (1 + tolerance):.4f} (best {table.best:.4f}, {label(ranked[0])}, "
            f"+{tolerance:.0%}); {sum(table.entries[k].val_nll <= table.best * (1 + tolerance) for k in ranked)} "
            f"placement(s) qualify. Best three: {top}. Full grid: {table.grid_flops:.3g} training FLOPs.\n")


def report(path: Path, searches: dict[str, Table], results: dict[str, tuple[list[Summary], dict]],
           seeds: list[int], tolerance: float) -> str:
    """The whole markdown report: provenance, then one table per search, then the skipped methods."""
    settings = next(iter(searches.values())).settings
    head = [f"## Search efficiency on {path.name}",
            "",
            f"Replayed {dt.date.today().isoformat()} with optuna {optuna.__version__}, seeds {seeds[0]}-{seeds[-1]} "
            f"({len(seeds)}), tolerance {tolerance:.0%}. Table settings: {json.dumps(settings)}.",
            "Compute is training FLOPs summed over the trials run until the best completed trial is within "
            "tolerance of the best (pruned trials cost the FLOPs of their last report; repeats are charged again); "
            "'grids' divides it by the full grid's compute; a seed that has not reached the target when its compute "
            "reaches the grid's counts as not reached, and a median with half the seeds or more not reached is "
            "'not reached'.",
            ""]
    body = []
    for name, table in searches.items():
        summaries, skipped = results[name]
        body += [describe(name, table, tolerance), markdown_table(table, summaries), ""]
    skipped = next(iter(results.values()))[1]
    if skipped:
        body.append("Skipped (not installed here): " + "; ".join(f"{m}: {why}" for m, why in skipped.items()) + ".")
    return "\n".join(head + body) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="parquet written by placement_table.py")
    p.add_argument("--seeds", type=int, default=20, help="seeds per method (0 .. N-1)")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative distance to the best val NLL")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--searches", nargs="+", default=["all", "looped"], choices=["all", "looped"])
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file written ('-': none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    seeds = list(range(args.seeds))
    searches = {name: load_table(args.table, looped_only=name == "looped") for name in args.searches}
    results = {name: summarise(table, args.methods, seeds, args.tolerance) for name, table in searches.items()}
    text = report(args.table, searches, results, seeds, args.tolerance)
    print(text)
    if str(args.output) != "-":
        args.output.write_text(text)
    return text


if __name__ == "__main__":
    main()
