"""The search-efficiency replay (benchmarks/search_efficiency.py): no training, a few seconds.

Checks on synthetic placement tables (several seeds per cell): the targets (one paired SE, top-k),
the signal-to-noise figure, the accounting (full trials cost their run's FLOPs, pruned ones the
FLOPs of their last report), the oracle stopping rule (a replay stops at the first trial after
which its incumbent is a target, and not before), that a lucky seed can mislead a search (noise
is part of the benchmark), and the report's intervals and verdicts.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import polars as pl
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("search_efficiency", BENCH / "search_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_efficiency"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


SEED_EFFECT = {0: 0.0, 1: 0.08, 2: -0.05}  # shared by every cell of a seed: paired differences cancel it


def synthetic_frame(n_layer: int = 6, max_block: int = 3, loops=(2, 3), uniform=(3,), seeds=(0, 1, 2),
                    budget: float = 8e11, eval_points: int = 4) -> pl.DataFrame:
    """A placement table with placement_table.py's columns, one row per cell and seed: the best cell
    is [1,3)x3 U; a seed shifts every cell alike plus a small cell-specific wobble."""
    rows = []
    configs = [(1, 0, 0, "constant")]
    for train_loops, counts in (("constant", loops), ("uniform", uniform)):
        configs += [(n, s, s + length, train_loops) for n in counts for length in range(1, max_block + 1)
                    for s in range(n_layer - length + 1)]
    for seed in seeds:
        for n, start, end, train_loops in configs:
            mean = (3.0 + 0.05 * abs(start - 1) + 0.04 * abs(end - start - 2) + 0.03 * (3 - n)
                    + (0.0 if train_loops == "uniform" else 0.02))
            wobble = 0.004 * (((start * 7 + end * 3 + n + seed * 3 + (train_loops == "uniform")) % 5) - 2)
            final = mean + SEED_EFFECT[seed] + wobble
            spent = budget * (0.999 if n == 1 else 0.99 - 0.002 * (end - start))
            curve = [[spent * (i + 1) / eval_points / 1e9, final + 0.4 * (eval_points - 1 - i)]
                     for i in range(eval_points)]
            rows.append(dict(loop_start=start, loop_end=end, block_length=end - start, n_loops=n,
                             strategy="none" if n == 1 else "fixed", train_loops=train_loops, val_nll=final,
                             train_flops=spent, steps=100, curve=curve, seed=seed, n_layer=n_layer, budget=budget))
    return pl.DataFrame(rows)


def test_cells_seeds_and_targets(se):
    frame = synthetic_frame()
    table = se.table_from_frame(frame)
    assert len(table.cells) == 1 + 2 * 15 + 15 == frame.height // 3 and table.seeds == [0, 1, 2]
    assert table.best_key() == (3, 1, 3, "uniform") and table.uniform_counts == [3]
    best = table.best_key()
    # the paired SE cancels the seed effect (0.13 nats across seeds): only the wobble is left
    assert table.paired_se(best, (3, 1, 3, "constant")) < 0.01 < table.cells[best].se
    assert table.paired_se(best, best) == 0.0
    top = table.targets("top3")
    assert len(top) == 3 and best in top
    within = table.targets("se")
    assert best in within
    for key in within:
        assert table.cells[key].mean - table.cells[best].mean <= table.paired_se(key, best)
    with pytest.raises(ValueError, match="unknown target"):
        table.targets("best")
    spread, noise, snr = table.signal_to_noise()
    assert snr == pytest.approx(spread / noise) and spread > 0.03 and noise > 0.03
    looped = se.table_from_frame(frame, looped_only=True)
    assert len(looped.cells) == 45 and (1, 0, 0, "constant") not in looped.cells


def test_incomplete_seed_is_left_out(se):
    frame = synthetic_frame()
    partial = frame.filter(~((pl.col("seed") == 2) & (pl.col("loop_start") == 4)))  # seed 2 unfinished
    table = se.table_from_frame(partial)
    assert table.seeds == [0, 1] and all(len(c.runs) == 2 for c in table.cells.values())


def test_a_table_with_holes_is_refused_by_name(se, tmp_path):
    frame = synthetic_frame()
    assert se.table_from_frame(frame).missing() == []
    holed = frame.filter(~((pl.col("loop_start") == 4) & (pl.col("loop_end") == 6) & (pl.col("n_loops") == 2)))
    table = se.table_from_frame(holed)
    assert table.missing() == [(2, 4, 6, "constant")]
    path = tmp_path / "holed.parquet"
    holed.write_parquet(path)
    with pytest.raises(SystemExit, match=r"1 of 46 cells of the space have no rows \(\[4,6\)x2\); finish the table"):
        se.main(["--table", str(path), "--replays", "1", "--methods", "random", "--output", "-"])


def test_a_replay_is_reproducible_with_hyperband(se):
    table = se.table_from_frame(synthetic_frame())
    targets = {table.best_key()}
    first = se.replay(table, "tpe", "hyperband", 3, targets, 1.0)
    second = se.replay(table, "tpe", "hyperband", 3, targets, 1.0)
    assert first.history == second.history and first.pruned == second.pruned


def test_pruned_trial_costs_its_last_report(se):
    import optuna

    table = se.table_from_frame(synthetic_frame())
    run = table.cells[(2, 4, 5, "constant")].runs[0]
    steps = se.report_steps(table)
    assert steps == [200, 400, 600, 800]
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=run.val_nll, n_warmup_steps=400))
    cost, pruned = se.replay_trial(study.ask(), run, steps, prune=True)
    assert pruned and cost == run.curve[1][0] < run.train_flops  # stopped at the second report
    assert se.replay_trial(study.ask(), run, steps, prune=False) == (run.train_flops, False)


def incumbents(history):
    """The incumbent (cell of the lowest observed value) after every trial of a replay's history."""
    best, cell, out = math.inf, None, []
    for key, value in history:
        if value is not None and value < best:
            best, cell = value, key
        out.append(cell)
    return out


@pytest.mark.parametrize("method", ["shuffled grid", "random", "tpe", "tpe multivariate", "tpe + median"])
def test_replay_stops_when_the_incumbent_is_a_target_and_not_before(se, method):
    table = se.table_from_frame(synthetic_frame())
    targets = table.targets("se")
    sampler, pruner = se.METHODS[method]
    for seed in range(4):
        replay = se.replay(table, sampler, pruner, seed, targets, cap_grids=2.0)
        assert len(replay.history) == replay.trials >= replay.distinct >= 1
        # every observed value is one seed's run of that cell
        for key, value in replay.history:
            assert value is None or value in [r.val_nll for r in table.cells[key].runs]
        path = incumbents(replay.history)
        if replay.reached_flops is not None:
            assert path[-1] in targets and not any(cell in targets for cell in path[:-1])
            assert 0 < replay.reached_flops <= 2.0 * table.grid_flops
        else:
            assert not any(cell in targets for cell in path)
        assert replay.pruned == sum(value is None for _, value in replay.history)


def test_a_lucky_seed_can_mislead_the_search(se):
    """Cell B has one lucky run (2.90) below every run of the best cell A (3.00): a search that
    draws it first keeps B as its incumbent, never reaches the top-1 target and pays the cap."""
    def row(start, seed, value):
        return dict(loop_start=start, loop_end=start + 1, block_length=1, n_loops=2, strategy="fixed",
                    train_loops="constant", val_nll=value, train_flops=1e12, steps=10, seed=seed,
                    curve=[[1000.0, value]], n_layer=3, budget=1e12)
    frame = pl.DataFrame([row(0, 0, 3.0), row(0, 1, 3.0), row(1, 0, 2.9), row(1, 1, 3.5),
                          row(2, 0, 3.4), row(2, 1, 3.4)])
    table = se.table_from_frame(frame)
    targets = table.targets("top1")
    assert targets == {(2, 0, 1, "constant")}
    replays = [se.replay(table, "grid", "none", seed, targets, cap_grids=2.0) for seed in range(30)]
    misled = [r for r in replays if r.reached_flops is None]
    assert 0 < len(misled) < len(replays)
    for r in misled:
        assert (2, 1, 2, "constant", ) in [k for k, v in r.history if v == 2.9]
        assert sum(1e12 for _ in r.history) >= 2.0 * table.grid_flops
    # with one seed per cell the grid always reaches within one grid: nothing can mislead it
    clean = se.table_from_frame(frame.filter(pl.col("seed") == 1))
    for seed in range(5):
        assert se.replay(clean, "grid", "none", seed, clean.targets("top1")).reached_flops <= clean.grid_flops


def test_summary_intervals_and_verdicts(se):
    lo, hi = se.wilson(10, 20)
    assert lo < 0.5 < hi and se.wilson(0, 20)[0] == 0.0 and se.wilson(20, 20)[1] == pytest.approx(1.0)
    a, b = se.bootstrap_diff([1.0] * 20, [2.0] * 20)
    assert a == b == -1.0
    table = se.table_from_frame(synthetic_frame())
    targets = table.targets("top3")
    summaries, skipped = se.summarise(table, ["random", "shuffled grid", "tpe"], 6, targets, cap_grids=2.0)
    text = se.markdown_table(table, summaries)
    assert text.count("\n") == 1 + len(summaries)
    assert "| random |" in text and "reference" in text
    for line in text.splitlines()[2:]:
        if not line.startswith("| random"):
            assert any(v in line for v in ("beats random", "tie with random", "worse than random"))
    for s in summaries:
        assert all(0 < c <= 2.0 for c in s.costs(table.grid_flops))
    report = se.report(Path("t.parquet"), {"all": table}, {"all": (summaries, skipped, targets)}, 6, "top3", 2.0)
    assert "Signal-to-noise" in report and "oracle" in report


def test_shipped_table_replays(se, tmp_path):
    path = BENCH / "placement_table.parquet"
    if not path.exists():
        pytest.skip("benchmarks/placement_table.parquet not generated")
    out = tmp_path / "se.md"
    text = se.main(["--replays", "2", "--methods", "shuffled grid", "random", "tpe + median", "--output", str(out)])
    assert out.read_text() == text
    for search in ("all", "looped"):
        table = se.load_table(path, looped_only=search == "looped")
        assert f"{table.grid_flops:.3g}" in text and len(table.seeds) >= 1


def test_placement_summary_pairs_seeds_against_the_paper(tmp_path):
    """benchmarks/placement_summary.py: paired t intervals against [1,3)x3 U and the baseline, the
    signal-to-noise line and the Bonferroni count, on the synthetic table (the paper's cell is its best)."""
    spec = importlib.util.spec_from_file_location("placement_summary", BENCH / "placement_summary.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    path = tmp_path / "t.parquet"
    synthetic_frame().write_parquet(path)
    cells, seeds, left_out = ps.load(path)
    assert seeds == [0, 1, 2] and left_out == 0 and ps.PAPER in cells and ps.BASELINE in cells
    m, lo, hi = ps.paired(cells, (1, 3, 3, "constant"), ps.PAPER, seeds)
    d = [cells[(1, 3, 3, "constant")][s] - cells[ps.PAPER][s] for s in seeds]
    assert m == pytest.approx(sum(d) / 3) and lo < m < hi
    text = ps.summary(path, top=5)
    assert "Signal-to-noise of the 45 looped cells" in text
    assert "Cells better than the paper's [1,3)x3 U beyond noise (95% paired t, 3 seeds): 0 of 45" in text
    assert "The paper's placement ranks 1 of 46" in text
    assert "| baseline |" in text and "| worse |" in text
    # within a cost group (same extra layers, same steps) the synthetic cells still differ by placement
    assert ps.extra_layers((1, 3, 3, "uniform")) == 2 == ps.extra_layers((0, 2, 2, "constant"))
    assert ps.extra_layers((0, 3, 3, "constant")) == 6 and ps.extra_layers(ps.BASELINE) == 0
    row = next(line for line in text.splitlines() if line.startswith("| 2 | [1,3)x3 U 3.0"))
    assert row.endswith("| differ |")


def test_placement_summary_on_a_table_still_being_trained(tmp_path):
    """benchmarks/placement_summary.py: the paired F test finds the synthetic cells' real
    differences (the shared seed effect removed), and a last cell with fewer seeds is left out."""
    spec = importlib.util.spec_from_file_location("placement_summary", BENCH / "placement_summary.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    frame = synthetic_frame()
    # training goes cell by cell: the last cell has only seed 0 so far
    partial = frame.filter(~((pl.col("loop_start") == 3) & (pl.col("loop_end") == 6) & (pl.col("n_loops") == 3)
                             & (pl.col("train_loops") == "uniform") & (pl.col("seed") > 0)))
    path = tmp_path / "t.parquet"
    partial.write_parquet(path)
    cells, seeds, left_out = ps.load(path)
    assert seeds == [0, 1, 2] and left_out == 1 and len(cells) == 45
    text = ps.summary(path, top=3)
    assert "(1 cell without every seed yet left out)" in text
    assert "the 44 looped cells **differ beyond noise**: F(43, 86) =" in text
    # the paper's cell is the synthetic best: nothing beats it, and it ranks first
    assert "Cells better than the paper's [1,3)x3 U beyond noise (95% paired t, 3 seeds): 0 of 44" in text
    assert "The paper's placement ranks 1 of 45 by mean." in text
    # the full table on the partial one's complete cells: the same 45 cells, every seed
    full = tmp_path / "full.parquet"
    frame.write_parquet(full)
    same = ps.summary(full, top=3, only_cells_of=path)
    assert "45 cells x 3 seeds (0, 1, 2), only the cells t.parquet has." in same and "the 44 looped cells" in same
