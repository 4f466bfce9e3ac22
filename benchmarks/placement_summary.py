"""What the placement table says: signal-to-noise, and which cells beat the paper's hand placement.

Reads the table benchmarks/placement_table.py writes (one row per cell and seed) and prints, in
Markdown:

- the signal-to-noise of the looped cells: the spread of their means over seeds (standard
  deviation) divided by the mean standard error of a cell mean (its seeds' sd / sqrt(seeds));
- whether the looped cells differ from each other beyond noise, paired by seed: the F test of the
  two-way table cells x seeds (``loopsearch.stats.blocked_anova``: the seed effect every cell
  shares is removed, as in a paired difference), its p value and the paired signal-to-noise
  sqrt(F) (about 1 when the cells do not differ), and how well one seed's ranking of the cells
  repeats in another's (Spearman correlation per pair of seeds);
- whether the placement matters once the cost is fixed: the same F test within each group of cells
  that add the same layer applications per training step (and so get the same optimizer steps);
- every cell against LoopMDM's hand placement (layers [1,3), S ~ U{1..3} in training, 3 loops at
  inference: ``[1,3)x3 U``) and against the no-loop baseline: the paired difference over seeds
  (same data order, initialisation and validation masks per seed) with a t interval on n - 1
  degrees of freedom. "better" or "worse" only when the interval excludes 0, otherwise "tie".
  With K cells compared, a few intervals exclude 0 by chance (5% each): the Bonferroni column
  widens each interval to 1 - 0.05 / K, and only a cell that beats the paper there is a finding.

A table still being trained (cell by cell) is compared on equal terms: cells without every seed the
table holds are left out (the first line says how many); if fewer than 2 cells have every seed, all
cells are kept on the seeds they all have.

    python benchmarks/placement_summary.py [--table benchmarks/placement_table.parquet] [--top 12] \
        [--only-cells-of OTHER.parquet]
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import polars as pl

from scipy import stats as st

from loopsearch.stats import blocked_anova, mean_interval, t_quantile

HERE = Path(__file__).resolve().parent
PAPER = (1, 3, 3, "uniform")
BASELINE = (0, 0, 1, "constant")


def label(key) -> str:
    start, end, n, train_loops = key
    if n == 1:
        return "baseline"
    return f"[{start},{end})x{n}" + (" U" if train_loops == "uniform" else "")


def load(path: Path) -> tuple[dict, list[int], int]:
    """{cell key: {seed: val NLL}}, the seeds used and how many cells were left out. A table still
    being trained (cell by cell) has a last cell with fewer seeds: cells lacking one of the seeds
    the table holds are left out, unless that leaves fewer than 2; then every cell is kept on the
    seeds all of them have."""
    frame = pl.read_parquet(path)
    cells: dict = {}
    for r in frame.iter_rows(named=True):
        key = (r["loop_start"], r["loop_end"], r["n_loops"], r.get("train_loops", "constant"))
        if r["n_loops"] == 1:
            key = BASELINE
        cells.setdefault(key, {})[r["seed"]] = r["val_nll"]
    every = set().union(*(set(v) for v in cells.values()))
    complete = {k: v for k, v in cells.items() if set(v) == every}
    if len(complete) >= 2:
        return complete, sorted(every), len(cells) - len(complete)
    common = sorted(set.intersection(*(set(v) for v in cells.values())))
    return {k: {s: v[s] for s in common} for k, v in cells.items()}, common, 0


def paired(cells: dict, a, b, seeds: list[int], level: float = 0.95):
    """mean(a - b) over seeds with its t interval at ``level``: (mean, lo, hi)."""
    d = [cells[a][s] - cells[b][s] for s in seeds]
    ci = mean_interval(d)
    if ci.se is None:
        return ci.mean, math.nan, math.nan
    half = t_quantile(1 - (1 - level) / 2, len(d) - 1) * ci.se
    return ci.mean, ci.mean - half, ci.mean + half


def words(lo: float, hi: float) -> str:
    if math.isnan(lo):
        return "-"
    return "better" if hi < 0 else "worse" if lo > 0 else "tie"


def differ_line(cells: dict, keys: list, seeds: list[int]) -> str:
    """Do these cells differ from each other beyond noise, paired by seed? (F test, rank agreement)"""
    if len(keys) < 2:
        return "Fewer than 2 looped cells: nothing to compare."
    a = blocked_anova([[cells[k][s] for s in seeds] for k in keys])
    rhos = []
    for i, s1 in enumerate(seeds):
        for s2 in seeds[i + 1:]:
            rhos.append(float(st.spearmanr([cells[k][s1] for k in keys], [cells[k][s2] for k in keys]).statistic))
    verdict = "differ beyond noise" if a.differ() else "do not differ beyond noise (a tie)"
    return (f"Paired by seed (F test of cells x seeds, the seed effect removed): the {len(keys)} looped cells "
            f"**{verdict}**: F({a.df_arms}, {a.df_residual}) = {a.f:.2f}, p = {a.p:.2g}; spread of cell means "
            f"{a.spread:.3f} / residual SE of a cell mean {a.residual_se:.3f} = paired signal-to-noise "
            f"**{a.snr:.1f}**. One seed's ranking of the cells against another's: Spearman "
            f"{', '.join(f'{r:.2f}' for r in rhos)}.")


def extra_layers(key) -> float:
    """Extra layer applications per training step over the baseline: block length x (mean loops - 1);
    S ~ U{1..n} in training has mean (n + 1) / 2 loops. Cells of one cost get the same optimizer steps."""
    start, end, n, train_loops = key
    if n == 1:
        return 0.0
    return (end - start) * (((n + 1) / 2 if train_loops == "uniform" else n) - 1)


def cost_lines(cells: dict, seeds: list[int]) -> list[str]:
    """Does the placement matter once the cost is fixed? Per group of looped cells of equal training
    cost (the same extra layers per step, so the same steps): the paired F test within the group."""
    groups: dict[float, list] = {}
    for key in cells:
        if key != BASELINE:
            groups.setdefault(extra_layers(key), []).append(key)
    out = ["", "| extra layers per step (same steps) | cells, best first (mean val NLL) | within the group: F test, "
               "paired by seed | verdict |", "|---|---|---|---|"]
    for cost, keys in sorted(groups.items()):
        keys.sort(key=lambda k: statistics.fmean(cells[k].values()))
        listed = ", ".join(f"{label(k)} {statistics.fmean(cells[k].values()):.3f}" for k in keys)
        if len(keys) < 2 or len(seeds) < 2:
            out.append(f"| {cost:g} | {listed} | - | - |")
            continue
        a = blocked_anova([[cells[k][s] for s in seeds] for k in keys])
        verdict = "differ" if a.differ() else "tie"
        out.append(f"| {cost:g} | {listed} | F({a.df_arms}, {a.df_residual}) = {a.f:.2f}, p = {a.p:.2g} | {verdict} |")
    return out


def summary(path: Path, top: int, only_cells_of: Path | None = None) -> str:
    cells, seeds, left_out = load(path)
    if not seeds:
        return f"Table {path.name}: no seed that every cell has yet; nothing to compare."
    if only_cells_of is not None:  # the same cells as another table (e.g. one at another budget still being trained)
        keep = set(load(only_cells_of)[0])
        cells = {k: v for k, v in cells.items() if k in keep}
    looped = [k for k in cells if k != BASELINE]
    means = {k: statistics.fmean(cells[k].values()) for k in cells}
    ses = {k: statistics.stdev(cells[k].values()) / math.sqrt(len(seeds)) for k in cells} if len(seeds) > 1 else {}
    partial = f" ({left_out} cell{'s' * (left_out != 1)} without every seed yet left out)" if left_out else ""
    if only_cells_of is not None:
        partial += f", only the cells {only_cells_of.name} has"
    out = [f"Table {path.name}: {len(cells)} cells x {len(seeds)} seeds ({', '.join(map(str, seeds))}){partial}."]
    if len(seeds) > 1 and len(looped) >= 2:
        spread = statistics.stdev(means[k] for k in looped)
        noise = statistics.fmean(ses[k] for k in looped)
        out.append(f"Signal-to-noise of the {len(looped)} looped cells: spread of cell means (sd) {spread:.3f} nats "
                   f"/ mean SE of a cell mean {noise:.3f} = **{spread / noise:.1f}**.")
        out.append(differ_line(cells, looped, seeds))
    k = len(cells) - 1  # comparisons with the paper's cell (every other cell), or with the baseline (every looped cell)
    strict = 1 - 0.05 / max(1, k)
    ranked = sorted(cells, key=means.get)
    shown = ranked[:top] + [c for c in (PAPER, BASELINE) if c in cells and c not in ranked[:top]]
    out += ["", "| cell | val NLL, mean ± SE | Δ vs [1,3)x3 U (paper), 95% CI | verdict | Bonferroni "
            f"({strict:.4f}) | Δ vs baseline, 95% CI | verdict |", "|---|---|---|---|---|---|---|"]
    beats, beats_strict = [], []
    for key in shown:
        se = f" ± {ses[key]:.3f}" if ses else ""
        row = f"| {label(key)} | {means[key]:.3f}{se} |"
        for other in (PAPER, BASELINE):
            if other not in cells or key == other:
                row += " - | - |" if other == BASELINE else " - | - | - |"
                continue
            m, lo, hi = paired(cells, key, other, seeds)
            interval = "" if math.isnan(lo) else f" [{lo:+.3f}, {hi:+.3f}]"
            row += f" {m:+.3f}{interval} | {words(lo, hi)} |"
            if other == PAPER:
                _, slo, shi = paired(cells, key, other, seeds, strict)
                row += f" {words(slo, shi)} |"
        out.append(row)
    if PAPER in cells and len(seeds) > 1:
        for key in looped + [BASELINE]:
            if key == PAPER:
                continue
            _, lo, hi = paired(cells, key, PAPER, seeds)
            _, slo, shi = paired(cells, key, PAPER, seeds, strict)
            beats += [key] if hi < 0 else []
            beats_strict += [key] if shi < 0 else []
        out += ["", f"Cells better than the paper's [1,3)x3 U beyond noise (95% paired t, {len(seeds)} seeds): "
                f"{len(beats)} of {k} ({', '.join(map(label, beats)) or 'none'}); after Bonferroni over "
                f"{k} comparisons: {len(beats_strict)} ({', '.join(map(label, beats_strict)) or 'none'}). "
                f"The paper's placement ranks {ranked.index(PAPER) + 1} of {len(cells)} by mean."]
    if BASELINE in cells and len(seeds) > 1:
        verdicts = {"better": [], "worse": [], "tie": []}
        strict_better = []
        for key in looped:
            _, lo, hi = paired(cells, key, BASELINE, seeds)
            verdicts[words(lo, hi)].append(key)
            _, slo, shi = paired(cells, key, BASELINE, seeds, strict)
            strict_better += [key] if shi < 0 else []
        out.append(f"Looped cells against the no-loop baseline (95% paired t): {len(verdicts['better'])} better "
                   f"({', '.join(map(label, verdicts['better'])) or 'none'}), {len(verdicts['worse'])} worse, "
                   f"{len(verdicts['tie'])} tie; better after Bonferroni: {len(strict_better)} "
                   f"({', '.join(map(label, strict_better)) or 'none'}).")
    out += cost_lines(cells, seeds)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=Path, default=HERE / "placement_table.parquet")
    ap.add_argument("--top", type=int, default=12, help="best cells shown (the paper's and the baseline always)")
    ap.add_argument("--only-cells-of", type=Path, default=None, metavar="TABLE",
                    help="summarise only the cells another table has (its complete ones): e.g. the 1-TFLOP "
                         "table on the cells a 4-TFLOP table has trained so far")
    args = ap.parse_args()
    print(summary(args.table, args.top, args.only_cells_of))


if __name__ == "__main__":
    main()
