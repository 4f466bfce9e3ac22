"""The search-efficiency replay (benchmarks/search_efficiency.py): no training, a few seconds.

Checks the accounting on a synthetic placement table (full trials cost their train_flops, pruned
ones the FLOPs of their last report, the grid row costs exactly the grid) and on the shipped table.
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


def synthetic_frame(n_layer: int = 6, max_block: int = 3, loops=(2, 3), budget: float = 8e11,
                    eval_points: int = 4) -> pl.DataFrame:
    """A placement table with the shipped columns: the best row is the 2-layer block at layer 1
    looped 3 times; looped rows spend more FLOPs per step, so stop further below the budget."""
    rows = []
    configs = [(1, 0, 0)] + [(n, s, s + length) for n in loops for length in range(1, max_block + 1)
                             for s in range(n_layer - length + 1)]
    for n, start, end in configs:
        final = 3.0 + 0.05 * abs(start - 1) + 0.04 * abs(end - start - 2) + 0.03 * (3 - n)
        spent = budget * (0.999 if n == 1 else 0.99 - 0.002 * (end - start))
        curve = [[spent * (i + 1) / eval_points / 1e9, final + 0.4 * (eval_points - 1 - i)]
                 for i in range(eval_points)]
        rows.append(dict(loop_start=start, loop_end=end, block_length=end - start, n_loops=n,
                         strategy="none" if n == 1 else "fixed", val_nll=final, train_flops=spent, steps=100,
                         curve=curve, n_layer=n_layer, budget=budget))
    return pl.DataFrame(rows)


def test_space_covers_every_row_and_grid_costs_the_grid(se):
    frame = synthetic_frame()
    table = se.table_from_frame(frame)
    assert len(table.entries) == frame.height == 31
    assert table.best_key() == (3, 1, 3)
    assert se.grid_run(table).reached_flops == pytest.approx(frame["train_flops"].sum())
    looped = se.table_from_frame(frame, looped_only=True)
    assert len(looped.entries) == 30 and (1, 0, 0) not in looped.entries


def test_pruned_trial_costs_its_last_report(se):
    import optuna

    table = se.table_from_frame(synthetic_frame())
    entry = table.entries[(2, 4, 5)]
    steps = se.report_steps(table)
    assert steps == [200, 400, 600, 800]
    # prunes from step 400 (the second report) on: the curve falls, so it is above `upper` there
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=entry.val_nll, n_warmup_steps=400))
    trial = study.ask()
    cost, pruned = se.replay_trial(trial, entry, steps, prune=True)
    assert pruned and cost == entry.curve[1][0] < entry.train_flops  # stopped at the second report
    assert se.replay_trial(study.ask(), entry, steps, prune=False) == (entry.train_flops, False)


def test_replay_accounting_on_synthetic_table(se):
    table = se.table_from_frame(synthetic_frame())
    summaries, skipped = se.summarise(table, ["random", "tpe", "tpe + median", "tpe + successive_halving"],
                                      seeds=[0, 1], tolerance=0.01)
    grid = table.grid_flops
    assert summaries[0].method == se.GRID and all(r.reached_flops == grid for r in summaries[0].runs)
    assert {s.method for s in summaries} == {se.GRID, "random", "tpe", "tpe + median", "tpe + successive_halving"}
    for s in summaries:
        for run in s.runs:
            assert run.reached_flops is None or 0 < run.reached_flops <= grid
            assert run.trials >= run.distinct >= 1 and run.pruned <= run.trials
    pruned = [r.pruned for s in summaries if s.method == "tpe + median" for r in s.runs]
    assert sum(pruned) > 0  # the median pruner stops trials whose curve is above the median
    text = se.markdown_table(table, summaries)
    assert text.count("\n") == 1 + len(summaries) and "| full grid | 2/2 (100%) |" in text


def test_unreachable_target_is_reported_not_reached(se):
    table = se.table_from_frame(synthetic_frame())
    run = se.replay(table, "random", "none", seed=0, tolerance=-0.5)  # below every row: never reached
    assert run.reached_flops is None and run.trials >= len(table.entries)
    summary = se.Summary("random", [run])
    assert math.isinf(summary.median) and summary.success == 0
    assert "not reached" in se.markdown_table(table, [se.Summary(se.GRID, [se.grid_run(table)]), summary])


def test_shipped_table_replays(se, tmp_path):
    path = BENCH / "placement_table.parquet"
    if not path.exists():
        pytest.skip("benchmarks/placement_table.parquet not generated")
    out = tmp_path / "se.md"
    text = se.main(["--seeds", "2", "--methods", "random", "tpe", "tpe + median", "--output", str(out)])
    assert out.read_text() == text
    for search in ("all", "looped"):
        table = se.load_table(path, looped_only=search == "looped")
        grid = table.grid_flops
        assert f"{grid:.3g}" in text
        assert len(table.entries) == (31 if search == "all" else 30)
    # every reported compute is within the grid's (<= 1.00 grids) or marked not reached
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            median_grids = cells[4]
            assert median_grids == "not reached" or float(median_grids) <= 1.0
