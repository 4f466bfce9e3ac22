"""Results people look at: `loopsearch report` (HTML/Markdown page with PNG plots), `loopsearch
compare`, and storage that optuna-dashboard can read (every attribute plain JSON)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import optuna
import pytest

from conftest import ROOT, run_cli
from loopsearch.eval import loop_scaling as evaluate
from loopsearch.results import report
from loopsearch.search.space import BASELINE_ATTR

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # this 2-core machine is shared
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


def add_scaling_rows(study: optuna.Study, trial: int = 1, loops=(1, 2, 4)) -> None:
    directory = evaluate.trial_checkpoint(study, trial)
    evaluate.store(study, trial, directory, evaluate.loop_scaling(directory, list(loops), "cpu"))


# ---- report ------------------------------------------------------------------------------------------
def test_report_html_and_md(trained, tmp_path):
    add_scaling_rows(trained)
    r = run_cli("report", "scale", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "report-scale"
    page = (out / "report.html").read_text()
    expected = ["learning_curves.png", "placement.png", "loop_scaling.png"]
    for name in expected:
        check_png(out / name)
        assert f'src="{name}"' in page, name
    referenced = re.findall(r'src="([^"]+)"', page)
    assert sorted(referenced) == sorted(expected) and all((out / p).is_file() for p in referenced)
    # self-contained apart from the PNGs: no scripts, stylesheets or remote resources
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert "overflow-x:auto" in page  # the 20-column leaderboard scrolls instead of running off the page
    # the single-objective tiny study has no Pareto front and too few trials for importances: said so
    assert "Not applicable: the study has one objective" in page and "importances need at least 2" in page
    assert not (out / "pareto_front.png").exists() and not (out / "importances.png").exists()
    assert "nats/token" in page and "0 (baseline)" in page and "[1,3)" in page
    assert "wrote" in r.stdout and "3 plots" in r.stdout

    r = run_cli("report", "scale", "--format", "md", "--output", "md-report", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "md-report" / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(images) == sorted(expected)
    for name in images:
        check_png(tmp_path / "md-report" / name)
    assert "| scale | 0 (baseline) | complete |" in md  # the leaderboard's own Markdown table
    assert "> Not applicable" in md


def test_report_without_finished_trials_skips_every_plot(tiny_recipe, tmp_path):
    from loopsearch.search import study as studies

    studies.create(studies.spec_from_options("fresh", "early_middle", str(tiny_recipe), None, None, None, None, 2))
    result = report.write("fresh")
    assert result.images == [] and not list(result.page.parent.glob("*.png"))
    page = result.page.read_text()
    assert page.count('class="note"') == 5 and "No data" in page and "waiting" in page


def test_report_unknown_study_is_one_line_error():
    import os

    optuna.create_study(storage=os.environ["LOOPSEARCH_STORAGE"], study_name="something_else")  # a storage to look in
    for args in (["report", "nope"], ["compare", "nope", "other"]):
        r = run_cli(*args, env=ONE_THREAD)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "unknown study 'nope'" in r.stderr
        assert "Traceback" not in r.stderr
    r = run_cli("report", "nope", "--format", "pdf")
    assert r.returncode == 2 and "pdf" in r.stderr


def _multi_objective_study(tmp_path: Path, tiny_recipe: Path) -> optuna.Study:
    """A two-objective study (val NLL, zero-shot bits/byte) filled with made-up complete trials."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from loopsearch.search import study as studies

    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    recipe = tmp_path / "multi.toml"
    recipe.write_text(tiny_recipe.read_text()
                      + f'\n[objective]\nmetrics = ["val_nll", "zeroshot_bpb"]\nzeroshot = "{text}"\n')
    study = studies.create(studies.spec_from_options("multi", "early_middle", str(recipe), None, None, None, None, 9))
    dists = {"strategy": CategoricalDistribution(["fixed"]), "loop_start": IntDistribution(0, 1),
             "block_length": IntDistribution(1, 2), "fixed.n_loops": IntDistribution(2, 12)}
    study.add_trial(optuna.trial.create_trial(
        values=[4.50, 2.00], user_attrs={BASELINE_ATTR: True, "strategy": "none", "loop_start": 0, "loop_end": 0,
                                         "n_loops": 1, "val_nll": 4.50, "history": [[1.5e9, 4.7], [3e9, 4.5]]}))
    for i, (start, length, loops) in enumerate([(0, 1, 2), (0, 2, 4), (1, 1, 2), (1, 2, 4), (0, 1, 4), (1, 2, 2),
                                                (0, 2, 2), (1, 1, 4)]):
        nll = 4.40 + 0.03 * start + 0.02 * length - 0.01 * loops + 0.001 * i
        params = {"strategy": "fixed", "loop_start": start, "block_length": length, "fixed.n_loops": loops}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=[nll, 2.2 - 0.4 * (nll - 4.3) + 0.01 * (i % 3)],
            user_attrs={"strategy": "fixed", "loop_start": start, "loop_end": start + length, "n_loops": loops,
                        "val_nll": nll, "history": [[1.5e9, nll + 0.2], [3e9, nll]]}))
    return study


def test_report_pareto_front_importances_and_placement_panels(tiny_recipe, tmp_path):
    _multi_objective_study(tmp_path, tiny_recipe)
    result = report.write("multi", tmp_path / "out")
    names = sorted(p.name for p in result.images)
    assert names == ["importances.png", "learning_curves.png", "pareto_front.png", "placement.png"]
    for path in result.images:
        check_png(path)
    page = result.page.read_text()
    assert 'src="pareto_front.png"' in page and "not dominated" in page
    assert "PED-ANOVA" in page and "No data: no trial has been evaluated at several loop counts" in page
    cells = report.placements(report.load("multi"))
    assert sorted(set(cells["n_loops"])) == [2, 4] and len(cells) == 8  # one panel per loop count


# ---- compare ----------------------------------------------------------------------------------------
def test_compare_warns_on_differing_budgets(trained, tiny_recipe):
    from loopsearch.search import study as studies

    for name, budget in (("double", "6e9"), ("same", None)):
        studies.create(studies.spec_from_options(name, "early_middle", str(tiny_recipe), budget, None, None, None, 2))
    r = run_cli("compare", "scale", "double", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "scale" in r.stdout and "double" in r.stdout and "3 GFLOP" in r.stdout and "6 GFLOP" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and "budgets differ: scale 3 GFLOP, double 6 GFLOP" in warnings[0]
    assert not any("corpora" in w or "backbones" in w or "vocab" in w for w in warnings)

    r = run_cli("compare", "scale", "same", "--json", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    out = json.loads(r.stdout)
    assert out["warnings"] == [] and [s["study"] for s in out["studies"]] == ["scale", "same"]
    scale = out["studies"][0]
    best = min(t.user_attrs["val_nll"] for t in trained.get_trials())
    assert scale["best_val_nll"] == pytest.approx(best)
    assert scale["best_delta_nll"] == pytest.approx(best - scale["baseline_val_nll"])
    assert out["studies"][1]["best_trial"] is None  # nothing finished yet: shown empty, not an error

    rows, warnings = report.comparison(["scale", "double"])
    assert len(warnings) == 2 and warnings[0].startswith("budgets differ")
    wide = tiny_recipe.with_name("wide.toml")
    wide.write_text(tiny_recipe.read_text().replace("vocab_size = 300", "vocab_size = 400")
                    .replace("n_layer = 4, d_model = 32", "n_layer = 4, d_model = 48"))
    studies.create(studies.spec_from_options("wide", "early_middle", str(wide), None, None, None, None, 2))
    rows, warnings = report.comparison(["scale", "wide"])
    assert [w.split(":")[0] for w in warnings[:-1]] == ["backbones differ", "vocab sizes differ"]
    assert "d_model=32" in warnings[0] and "d_model=48" in warnings[0] and "scale 300, wide 400" in warnings[1]

    r = run_cli("leaderboard", "--study", "scale", "--study", "double", env=ONE_THREAD)  # side by side
    assert r.returncode == 0, r.stderr
    assert "scale" in r.stdout and "double" in r.stdout and "study" in r.stdout


def test_compare_needs_two_studies(trained):
    r = run_cli("compare", "scale", env=ONE_THREAD)
    assert r.returncode == 2 and "at least two studies" in r.stderr and "Traceback" not in r.stderr


# ---- plain JSON storage (what optuna-dashboard reads) ---------------------------------------------------
PICKLE_PREFIXES = ("gAJ", "gAN", "gAS", "gAV", "80027d", "800363", "8004", "8005")  # base64 / hex pickle headers


def _assert_plain(value, where: str) -> None:
    text = json.dumps(value, allow_nan=False)  # raises on bytes, objects, NaN or inf
    assert json.loads(text) == value, where

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            assert not (len(v) > 16 and v.startswith(PICKLE_PREFIXES)), f"{where}: looks like a pickle: {v[:40]}"

    walk(value)


def test_every_attribute_is_plain_json(trained, tmp_path):
    """Study and trial attributes (spec, results, eval and metric rows, Optuna's own system
    attributes) round-trip through json: optuna-dashboard and other tools can read them."""
    from loopsearch.eval import metrics
    from loopsearch.eval.generation import load_trial

    add_scaling_rows(trained, loops=(1, 2))
    text = tmp_path / "held_out.txt"
    text.write_text((ROOT / "plugins" / "data" / "tinyshakespeare.txt").read_text()[-6000:])
    loaded = load_trial(evaluate.trial_checkpoint(trained, 1), "cpu")
    metrics.store(trained, 1, metrics.zeroshot_metric(loaded, text, sequences=2))

    study = optuna.load_study(study_name="scale", storage=trained._storage)
    user = study.user_attrs
    assert {"loopsearch.spec", f"{evaluate.EVAL_ATTR}1", f"{metrics.METRIC_ATTR}1"} <= set(user)
    for key, value in user.items():
        _assert_plain(value, f"study user attr {key}")
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        _assert_plain(value, f"study system attr {key}")
    for t in study.get_trials():
        assert {"config", "history", "val_nll", "train_stats"} <= set(t.user_attrs)
        for key, value in t.user_attrs.items():
            _assert_plain(value, f"trial {t.number} user attr {key}")
        for key, value in t.system_attrs.items():
            _assert_plain(value, f"trial {t.number} system attr {key}")

    # and in the SQLite file itself, as optuna-dashboard reads it: every stored attribute is JSON text
    db = sqlite3.connect(tmp_path / "test.db")
    tables = [r[0] for r in db.execute("select name from sqlite_master where type='table' and name like '%attributes'")]
    assert {"study_user_attributes", "study_system_attributes", "trial_user_attributes",
            "trial_system_attributes"} <= set(tables)
    n = 0
    for table in tables:
        for key, raw in db.execute(f"select key, value_json from {table}"):
            assert isinstance(raw, str), f"{table}.{key} holds {type(raw).__name__}"
            _assert_plain(json.loads(raw), f"{table}.{key}")
            n += 1
    db.close()
    assert n >= 20
