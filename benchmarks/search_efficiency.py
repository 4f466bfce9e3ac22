"""Search efficiency on the placement table, noise included: replay Optuna samplers and pruners, no training.

The placement table (benchmarks/placement_table.py) holds every configuration ("cell": a block,
a loop count, a training strategy) trained once per seed. A replayed trial looks its cell up and
draws **one seed's run** of it at random, as a real search would train it once with whatever noise
that run has: it observes that run's val NLL, reports that run's learning curve to the pruner and
is charged that run's training FLOPs (a pruned trial: the FLOPs of its last report). A repeated
suggestion of a cell draws again and is charged again, as a real study would train it again.

**Target.** A cell is a target when its mean over seeds is within one paired standard error of the
best cell's mean (``--target se``; the paired SE of the difference over seeds, which share data
order, initialisation and validation masks), or when it is among the ``k`` best cell means
(``--target top3``). The target is a property of the cells' means, which the search never sees.

**Stopping rule (an oracle).** A replay stops as soon as the search's *incumbent* (the completed
trial with the lowest observed val NLL so far: what the search would report) is a target cell. A
real search cannot apply this rule (it does not know the target); it measures how soon a search
*could* have been stopped with a good answer in hand. A replay that has not stopped when its
compute reaches ``--cap-grids`` full grids counts as not reached, and its cost is the cap.

Methods: the Optuna samplers and pruners that ``loopsearch study`` builds (made by
``loopsearch.search.study.make_sampler`` / ``make_pruner``: TPE with 4 startup trials and the
constant liar, pruners at the first report with reduction factor 3), TPE multivariate (grouped,
for the conditional space), and the **shuffled grid**: every cell once in a random order (then
again in a new order), under the same stopping rule: what a search must beat to have learned
anything from the values it saw. The "full grid" row trains every cell once (one seed each): what
it costs to have seen everything once.

The space (conditional, define-by-run, as loopsearch's own ``suggest``): ``n_loops`` (1 = the
non-looped baseline, no block), then for n_loops > 1 ``block_length`` and ``loop_start``, then,
where the table has rows of both, ``train_loops`` (constant: n_loops in training; uniform: S ~
U{1..n_loops}). Two searches: ``all`` (the whole table) and ``looped`` (n_loops >= 2 only, as the
``early_middle`` space).

Statistics over ``--replays`` replays per method: the share that reached the target (Wilson 95%
interval), the median cost in grids (bootstrap 95% interval), and the mean cost against random
search's (capped costs; difference with a bootstrap 95% interval, methods resampled
independently). A method **beats random** only when that interval lies below zero; otherwise the
report calls it a tie.

Run::

    python benchmarks/search_efficiency.py                          # 50 replays, writes benchmarks/search_efficiency.md
    python benchmarks/search_efficiency.py --replays 5 --methods random tpe --output -
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import random
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import polars as pl
from optuna.trial import TrialState

from loopsearch.search.study import make_pruner, make_sampler
from loopsearch.spec import BlockSpace, IntRange, SearchSpace, StudySpec, TrainConfig

HERE = Path(__file__).resolve().parent
DEFAULT_TABLE = HERE / "placement_table.parquet"
DEFAULT_OUTPUT = HERE / "search_efficiency.md"
METADATA_KEY = "loopsearch.placement_table"

# method label -> (sampler, pruner); "tpe multivariate" and the shuffled grid are built here
METHODS = {
    "shuffled grid": ("grid", "none"),
    "random": ("random", "none"),
    "tpe": ("tpe", "none"),
    "tpe multivariate": ("tpe_mv", "none"),
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
Key = tuple[int, int, int, str]  # (n_loops, loop_start, loop_end, train_loops); the baseline (1, 0, 0, "constant")


@dataclass
class Run1:
    """One seed's run of a cell: final val NLL, training FLOPs, learning curve [(FLOPs, val NLL)]."""

    seed: int
    val_nll: float
    train_flops: float
    curve: list[tuple[float, float]]


@dataclass
class Cell:
    runs: list[Run1]  # one per seed

    @property
    def mean(self) -> float:
        return statistics.fmean(r.val_nll for r in self.runs)

    @property
    def se(self) -> float:
        """Standard error of the cell mean over seeds (nan with one seed)."""
        if len(self.runs) < 2:
            return math.nan
        return statistics.stdev(r.val_nll for r in self.runs) / math.sqrt(len(self.runs))

    @property
    def train_flops(self) -> float:
        return statistics.fmean(r.train_flops for r in self.runs)

    def by_seed(self) -> dict[int, float]:
        return {r.seed: r.val_nll for r in self.runs}


@dataclass
class Table:
    """The placement table restricted to one search space: cells with their per-seed runs."""

    cells: dict[Key, Cell]
    n_layer: int
    max_block: int
    loop_counts: list[int]  # the n_loops values searched (1 = baseline)
    uniform_counts: list[int]  # n_loops values that also have rows trained with S ~ U{1..n_loops}
    budget: float
    eval_points: int
    settings: dict = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for c in self.cells.values() for r in c.runs})

    def best_key(self) -> Key:
        return min(self.cells, key=lambda k: self.cells[k].mean)

    @property
    def grid_flops(self) -> float:
        """Training FLOPs of every cell once (mean over its seeds): the full grid."""
        return sum(c.train_flops for c in self.cells.values())

    def paired_se(self, a: Key, b: Key) -> float:
        """SE of mean(a) - mean(b) from the per-seed differences (0 for a cell with itself)."""
        if a == b:
            return 0.0
        sa, sb = self.cells[a].by_seed(), self.cells[b].by_seed()
        d = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb))]
        return statistics.stdev(d) / math.sqrt(len(d)) if len(d) >= 2 else math.nan

    def targets(self, target: str) -> set[Key]:
        """The target cells: ``se`` (within one paired SE of the best mean) or ``topK``."""
        ranked = sorted(self.cells, key=lambda k: self.cells[k].mean)
        if target.startswith("top"):
            return set(ranked[: int(target[3:])])
        if target != "se":
            raise ValueError(f"unknown target {target!r}: use se or topK (e.g. top3)")
        best = ranked[0]
        return {k for k in ranked if self.cells[k].mean - self.cells[best].mean <= self.paired_se(k, best)}

    def space_keys(self) -> set[Key]:
        """Every cell the search space can propose (``suggest_placement``'s space)."""
        keys = set()
        for n in self.loop_counts:
            if n == 1:
                keys.add(key_of(1, 0, 0))
                continue
            for length in range(1, self.max_block + 1):
                for start in range(self.n_layer - length + 1):
                    keys.add(key_of(n, start, start + length))
                    if n in self.uniform_counts:
                        keys.add(key_of(n, start, start + length, "uniform"))
        return keys

    def missing(self) -> list[Key]:
        """Cells the space can propose that the table has no complete row set for (a table still
        being trained): a replay would propose them and find nothing to draw."""
        return sorted(self.space_keys() - set(self.cells))

    def signal_to_noise(self) -> tuple[float, float, float]:
        """(spread of cell means, their mean SE, spread / mean SE): the spread is the standard
        deviation of the cell means; the SE of a cell mean is its seeds' sd / sqrt(seeds)."""
        means = [c.mean for c in self.cells.values()]
        ses = [c.se for c in self.cells.values()]
        spread, noise = statistics.stdev(means), statistics.fmean(ses)
        return spread, noise, spread / noise


def key_of(n_loops: int, loop_start: int, loop_end: int, train_loops: str = "constant") -> Key:
    return (1, 0, 0, "constant") if n_loops == 1 else (n_loops, loop_start, loop_end, train_loops)


def label(key: Key) -> str:
    n, start, end, train_loops = key
    return "baseline" if n == 1 else f"[{start},{end})x{n}" + (" U" if train_loops == "uniform" else "")


def read_settings(path: Path) -> dict:
    """The settings placement_table.py stored in the parquet's key-value metadata ({} if none)."""
    meta = pl.read_parquet_metadata(path)
    return json.loads(meta.get(METADATA_KEY, "{}"))


def table_from_frame(frame: pl.DataFrame, looped_only: bool = False, settings: dict | None = None) -> Table:
    """A Table of the frame's rows (columns as placement_table.py writes them, one row per cell and
    seed); ``looped_only`` drops the baseline. Only seeds every cell has are kept (a partial table
    is compared on equal terms)."""
    if looped_only:
        frame = frame.filter(pl.col("n_loops") > 1)
    if "train_loops" not in frame.columns:
        frame = frame.with_columns(pl.lit("constant").alias("train_loops"))
    if "seed" not in frame.columns:
        frame = frame.with_columns(pl.lit(0).alias("seed"))
    keys = {key_of(r["n_loops"], r["loop_start"], r["loop_end"], r["train_loops"]) for r in frame.iter_rows(named=True)}
    seeds_of: dict[Key, set[int]] = {k: set() for k in keys}
    for r in frame.iter_rows(named=True):
        seeds_of[key_of(r["n_loops"], r["loop_start"], r["loop_end"], r["train_loops"])].add(r["seed"])
    common = set.intersection(*seeds_of.values())
    if not common:
        raise ValueError("no seed is complete: every cell needs a run of at least one common seed")
    cells: dict[Key, Cell] = {k: Cell([]) for k in keys}
    for r in frame.iter_rows(named=True):
        if r["seed"] in common:
            key = key_of(r["n_loops"], r["loop_start"], r["loop_end"], r["train_loops"])
            cells[key].runs.append(Run1(r["seed"], r["val_nll"], r["train_flops"],
                                        [(point[0] * 1e9, point[1]) for point in r["curve"]]))
    curve_lengths = {len(run.curve) for c in cells.values() for run in c.runs}
    if len(curve_lengths) != 1:
        raise ValueError(f"curves of different lengths {sorted(curve_lengths)}: every row needs the same eval points")
    first = frame.row(0, named=True)
    n_layer = int(first["n_layer"]) if "n_layer" in frame.columns else int(frame["loop_end"].max())
    budget = float(first["budget"]) if "budget" in frame.columns else max(c.train_flops for c in cells.values())
    uniform = sorted({k[0] for k in cells if k[3] == "uniform"})
    return Table(cells, n_layer, int(frame["block_length"].max()), sorted({k[0] for k in cells}), uniform,
                 budget, curve_lengths.pop(), settings or {})


def load_table(path: Path, looped_only: bool = False) -> Table:
    return table_from_frame(pl.read_parquet(path), looped_only, read_settings(path))


def check_complete(table: Table, path: Path) -> None:
    """Refuse a table with holes in its space, in one line that names them and the fix."""
    missing = table.missing()
    if missing:
        shown = ", ".join(label(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SystemExit(f"{path}: {len(missing)} of {len(table.space_keys())} cells of the space have no rows "
                         f"({shown}); finish the table first (placement_table.py resumes from its --output)")


# ---- one replayed study ---------------------------------------------------------------------------
@dataclass
class Replay:
    """One method, one replay: compute (training FLOPs) spent when the stopping rule fired (None:
    not within the cap), trials run by then (pruned ones included), pruned, distinct cells."""

    reached_flops: float | None
    trials: int
    pruned: int
    distinct: int
    history: list[tuple[Key, float | None]] = field(default_factory=list)  # (cell, observed value; None: pruned)


def study_spec(table: Table, sampler: str, pruner: str, seed: int) -> StudySpec:
    """A loopsearch StudySpec for the sampler and pruner factories (the space is descriptive:
    the replay suggests through ``suggest_placement``)."""
    space = SearchSpace(name="placement_table", strategies=["none", "fixed"],
                        block=BlockSpace(layers=(0, table.n_layer), length=(1, table.max_block)),
                        strategy={"fixed": {"n_loops": IntRange(low=2, high=max(2, max(table.loop_counts)))}})
    return StudySpec(name="replay", space=space, budget=table.budget, sampler=sampler, pruner=pruner, seed=seed,
                     n_trials=len(table.cells), train=TrainConfig(eval_points=table.eval_points))


def make_optuna_sampler(table: Table, sampler: str, seed: int) -> optuna.samplers.BaseSampler:
    if sampler == "tpe_mv":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, constant_liar=True, multivariate=True,
                                          group=True)
    return make_sampler(study_spec(table, sampler, "none", seed))


def suggest_placement(trial: optuna.Trial, table: Table) -> Key:
    """n_loops, then (looped only) block_length, loop_start and, where both exist, train_loops."""
    n_loops = trial.suggest_int("n_loops", min(table.loop_counts), max(table.loop_counts))
    if n_loops == 1:
        return key_of(1, 0, 0)
    length = trial.suggest_int("block_length", 1, table.max_block)
    start = trial.suggest_int("loop_start", 0, table.n_layer - length)
    train_loops = "constant"
    if n_loops in table.uniform_counts:
        train_loops = trial.suggest_categorical("train_loops", ["constant", "uniform"])
    return key_of(n_loops, start, start + length, train_loops)


def report_steps(table: Table) -> list[int]:
    """The Optuna step (GFLOPs) of each curve point: the nominal checkpoints budget * i / eval_points."""
    return [int(table.budget * (i + 1) / table.eval_points // 1e9) for i in range(table.eval_points)]


def replay_trial(trial: optuna.Trial | None, run: Run1, steps: list[int], prune: bool) -> tuple[float, bool]:
    """Report the run's curve to the trial (if pruning); return (FLOPs charged, pruned?)."""
    if not prune or trial is None:
        return run.train_flops, False
    for step, (spent, nll) in zip(steps, run.curve):
        trial.report(nll, step)
        if trial.should_prune():
            return spent, True
    return run.train_flops, False


def replay(table: Table, sampler: str, pruner: str, seed: int, targets: set[Key], cap_grids: float = 2.0) -> Replay:
    """One search (ask/tell, in memory): every trial draws one seed's run of its cell; stop when
    the incumbent (lowest observed value) is a target cell, or when the compute reaches the cap."""
    rng = random.Random(f"draws-{seed}")  # the seed draws: the same for every method of one replay
    order_rng = random.Random(f"grid-{seed}")
    cap, steps = cap_grids * table.grid_flops, report_steps(table)
    study = None
    if sampler != "grid":
        spec = study_spec(table, "tpe" if sampler == "tpe_mv" else sampler, pruner, seed)  # the pruner's spec
        study = optuna.create_study(sampler=make_optuna_sampler(table, sampler, seed), pruner=make_pruner(spec),
                                    direction="minimize", study_name=f"replay-{seed}")
        # named: Hyperband picks a trial's bracket from crc32(study name + trial number), and an
        # unnamed study gets a random name, which made its rows change from run to run
    queue: list[Key] = []
    history: list[tuple[Key, float | None]] = []
    spent, best, incumbent, pruned, trials, seen = 0.0, math.inf, None, 0, 0, set()
    while spent < cap:
        if study is None:
            if not queue:
                queue = order_rng.sample(sorted(table.cells), len(table.cells))
            trial, key = None, queue.pop()
        else:
            trial = study.ask()
            key = suggest_placement(trial, table)
        run = rng.choice(table.cells[key].runs)
        seen.add(key)
        trials += 1
        cost, was_pruned = replay_trial(trial, run, steps, pruner != "none")
        spent += cost
        history.append((key, None if was_pruned else run.val_nll))
        if was_pruned:
            pruned += 1
            study.tell(trial, state=TrialState.PRUNED)
            continue
        if study is not None:
            study.tell(trial, run.val_nll)
        if run.val_nll < best:
            best, incumbent = run.val_nll, key
        if incumbent in targets:
            return Replay(spent if spent <= cap else None, trials, pruned, len(seen), history)
    return Replay(None, trials, pruned, len(seen), history)


def unavailable(sampler: str) -> str | None:
    """Why a sampler cannot run here (a missing optional dependency of Optuna's), or None."""
    missing = [m for m in SAMPLER_NEEDS.get(sampler, ()) if importlib.util.find_spec(m) is None]
    return f"needs {', '.join(missing)}, not installed" if missing else None


# ---- statistics -----------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: list[float], stat, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` over resamples of ``values``."""
    rng = random.Random(seed)
    out = sorted(stat(rng.choices(values, k=len(values))) for _ in range(draws))
    return out[int(0.025 * draws)], out[int(0.975 * draws) - 1]


def bootstrap_diff(a: list[float], b: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of mean(a) - mean(b), a and b resampled independently."""
    rng = random.Random(seed)
    out = sorted(statistics.fmean(rng.choices(a, k=len(a))) - statistics.fmean(rng.choices(b, k=len(b)))
                 for _ in range(draws))
    return out[int(0.025 * draws)], out[int(0.975 * draws) - 1]


@dataclass
class Summary:
    method: str
    replays: list[Replay]
    cap: float  # FLOPs

    def costs(self, grid: float) -> list[float]:
        """Cost per replay in grids; a replay that did not reach counts at the cap."""
        return [(r.reached_flops if r.reached_flops is not None else self.cap) / grid for r in self.replays]

    @property
    def reached(self) -> int:
        return sum(r.reached_flops is not None for r in self.replays)


def summarise(table: Table, methods: list[str], replays: int, targets: set[Key], cap_grids: float,
              progress: bool = False) -> tuple[list[Summary], dict]:
    """Replay every method ``replays`` times; return the summaries and the skipped methods."""
    out, skipped = [], {}
    for method in methods:
        sampler, pruner = METHODS[method]
        reason = unavailable(sampler)
        if reason:
            skipped[method] = reason
            continue
        runs = [replay(table, sampler, pruner, seed, targets, cap_grids) for seed in range(replays)]
        out.append(Summary(method, runs, cap_grids * table.grid_flops))
        if progress:
            print(f"  {method}: {out[-1].reached}/{replays} reached", flush=True)
    return out, skipped


def markdown_table(table: Table, summaries: list[Summary]) -> str:
    """One row per method: reached (Wilson 95%), median cost in grids (bootstrap 95%), mean cost
    against random (bootstrap 95% of the difference) and the verdict, trials and distinct cells."""
    grid = table.grid_flops
    random_costs = next((s.costs(grid) for s in summaries if s.method == "random"), None)
    grid_costs = next((s.costs(grid) for s in summaries if s.method == "shuffled grid"), None)
    lines = ["| method | reached (95% CI) | median cost, grids (95% CI) | mean cost, grids | vs random: mean "
             "difference, grids (95% CI) | verdict | vs shuffled grid, grids (95% CI) | median trials (pruned) "
             "| median distinct cells |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(summaries):
        costs = s.costs(grid)
        n = len(costs)
        lo, hi = wilson(s.reached, n)
        mlo, mhi = bootstrap(costs, statistics.median, seed=i)
        if random_costs is None or s.method == "random":
            versus, verdict = "-", "reference" if s.method == "random" else "-"
        else:
            dlo, dhi = bootstrap_diff(costs, random_costs, seed=i)
            diff = statistics.fmean(costs) - statistics.fmean(random_costs)
            versus = f"{diff:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
            verdict = "beats random" if dhi < 0 else "worse than random" if dlo > 0 else "tie with random"
        versus_grid = "-"
        if grid_costs is not None and s.method != "shuffled grid":
            glo, ghi = bootstrap_diff(costs, grid_costs, seed=100 + i)
            versus_grid = f"{statistics.fmean(costs) - statistics.fmean(grid_costs):+.3f} [{glo:+.3f}, {ghi:+.3f}]"
        trials = statistics.median(r.trials for r in s.replays)
        pruned = statistics.median(r.pruned for r in s.replays)
        distinct = statistics.median(r.distinct for r in s.replays)
        lines.append(f"| {s.method} | {s.reached}/{n} ({lo:.0%}-{hi:.0%}) | {statistics.median(costs):.3f} "
                     f"[{mlo:.3f}, {mhi:.3f}] | {statistics.fmean(costs):.3f} | {versus} | {verdict} | {versus_grid} "
                     f"| {trials:g} ({pruned:g}) | {distinct:g} |")
    return "\n".join(lines)


def describe(name: str, table: Table, targets: set[Key], target: str) -> str:
    """The search's header: space size, noise, the target cells, the grid's compute."""
    ranked = sorted(table.cells, key=lambda k: table.cells[k].mean)
    top = ", ".join(f"{label(k)} {table.cells[k].mean:.3f} +- {table.cells[k].se:.3f}" for k in ranked[:5])
    spread, noise, snr = table.signal_to_noise()
    rule = ("within one paired SE of the best cell's mean" if target == "se" else f"the {target[3:]} best cell means")
    return (f"### Search `{name}`: {len(table.cells)} cells, n_loops {table.loop_counts}, "
            f"{len(table.seeds)} seeds ({', '.join(map(str, table.seeds))})\n\n"
            f"Signal-to-noise: spread of cell means (sd) {spread:.3f} nats / mean SE of a cell mean {noise:.3f} = "
            f"**{snr:.1f}**. Best five (mean +- SE over seeds): {top}. Target ({rule}): "
            f"{len(targets)} cell(s): {', '.join(label(k) for k in ranked if k in targets)}. "
            f"Full grid: {table.grid_flops:.3g} training FLOPs.\n")


def report(path: Path, searches: dict[str, Table], results: dict[str, tuple[list[Summary], dict, set]],
           replays: int, target: str, cap_grids: float) -> str:
    """The whole markdown report: provenance, then one table per search, then the skipped methods."""
    settings = next(iter(searches.values())).settings
    head = [f"## Search efficiency on {path.name}",
            "",
            f"Replayed {dt.date.today().isoformat()} with optuna {optuna.__version__}: {replays} replays per method, "
            f"target `{target}`, cap {cap_grids:g} grids. Table settings: {json.dumps(settings)}.",
            "Every trial draws one seed's run of its cell (value, curve and FLOPs). Stopping rule (an oracle): a "
            "replay stops when its incumbent (lowest observed value) is a target cell; cost is the training FLOPs "
            "spent by then (pruned trials: their last report; repeats charged again) in full grids (every cell "
            "once); a replay not stopped at the cap costs the cap. 'vs random' is the mean cost minus random "
            "search's with a bootstrap 95% interval: 'beats random' only when the interval is below zero; 'vs "
            "shuffled grid' the same against walking the grid in a random order.",
            ""]
    body = []
    for name, table in searches.items():
        summaries, skipped, targets = results[name]
        body += [describe(name, table, targets, target), markdown_table(table, summaries), ""]
    skipped = next(iter(results.values()))[1]
    if skipped:
        body.append("Skipped (not installed here): " + "; ".join(f"{m}: {why}" for m, why in skipped.items()) + ".")
    return "\n".join(head + body) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="parquet written by placement_table.py")
    p.add_argument("--replays", type=int, default=50, help="replays per method (seeds 0 .. N-1)")
    p.add_argument("--target", default="se", help="se: within one paired SE of the best cell; topK: the K best")
    p.add_argument("--cap-grids", type=float, default=2.0, help="stop a replay after this many full grids")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--searches", nargs="+", default=["all", "looped"], choices=["all", "looped"])
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file written ('-': none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    searches = {name: load_table(args.table, looped_only=name == "looped") for name in args.searches}
    for table in searches.values():
        check_complete(table, args.table)
    results = {}
    for name, table in searches.items():
        targets = table.targets(args.target)
        print(f"search {name}: {len(table.cells)} cells, {len(targets)} target(s)", flush=True)
        summaries, skipped = summarise(table, args.methods, args.replays, targets, args.cap_grids, progress=True)
        results[name] = (summaries, skipped, targets)
    text = report(args.table, searches, results, args.replays, args.target, args.cap_grids)
    print(text)
    if str(args.output) != "-":
        args.output.write_text(text)
    return text


if __name__ == "__main__":
    main()
