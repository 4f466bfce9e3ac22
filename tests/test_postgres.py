"""The real PostgreSQL backend (127.0.0.1:5432, database `test`): a study runs there end to end.

Optuna's RDB schema stores an intermediate value's step as a 32-bit INTEGER on PostgreSQL;
loopsearch keys steps in GFLOPs, so budgets far beyond 2**31 FLOPs report fine.
"""

import uuid

import optuna
import pytest

from loopsearch.results import leaderboard
from loopsearch.search import study as studies
from loopsearch.search import workers




def test_study_on_postgresql(pg, tiny_recipe):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    spec = studies.spec_from_options(name, "early_middle", str(tiny_recipe), "5e9", None, None, None, 2)
    studies.create(spec, pg)
    try:
        assert workers.run(name, pg, progress=False) == 2
        st = optuna.load_study(study_name=name, storage=pg)
        complete = [t for t in st.get_trials() if t.state.name == "COMPLETE"]
        assert len(complete) == 2
        for t in complete:
            assert t.intermediate_values and max(t.intermediate_values) == int(spec.budget // 1e9)  # nominal GFLOPs
        df = leaderboard.frame(pg, [name])
        assert df["val_nll"].null_count() == 0 and df["baseline"].sum() == 1
    finally:
        optuna.delete_study(study_name=name, storage=pg)


def test_gflop_steps_fit_postgres_integer(pg):
    """Raw FLOPs as the step overflow PostgreSQL's INTEGER; the GFLOP key does not."""
    name = f"pg-step-{uuid.uuid4().hex[:8]}"
    st = optuna.create_study(study_name=name, storage=pg)
    try:
        trial = st.ask()
        budget_flops = 3e14
        trial.report(1.0, int(budget_flops // 1e9))  # what the trainer reports
        with pytest.raises(Exception):
            trial.report(1.0, int(budget_flops))  # what a raw-FLOP key would do
    finally:
        optuna.delete_study(study_name=name, storage=pg)
