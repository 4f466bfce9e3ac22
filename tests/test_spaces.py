"""Every builtin search space validates against the tiny model and produces a trainable trial."""

from pathlib import Path

import optuna
import pytest

from loopsearch.search import study as studies
from loopsearch.search import workers
from loopsearch.errors import SpecError
from loopsearch.search.space import load_space, suggest
from loopsearch.spec import SearchSpace, validate


@pytest.mark.parametrize("space", ["early_middle", "anywhere", "depth", "strategies", "placement"])
def test_builtin_space_runs_a_trial(space, tiny_recipe):
    studies.create(studies.spec_from_options(space, space, str(tiny_recipe), None, None, None, "random", None))
    workers.run(space, n_trials=2, progress=False)
    trials = studies.load(space)[0].get_trials()
    searched = trials[1]
    assert searched.state.name in ("COMPLETE", "PRUNED"), searched.system_attrs
    if searched.state.name == "PRUNED":
        assert "min_steps" in searched.user_attrs["rejected"]
    elif space == "depth":
        assert searched.user_attrs["strategy"] == "none" and 2 <= searched.user_attrs["n_layer"] <= 12
    else:
        a = searched.user_attrs
        assert 0 <= a["loop_start"] < a["loop_end"] <= 4 and a["train_flops"] <= 3e9


def test_early_middle_stays_in_the_first_60_percent():
    space = load_space("early_middle")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        trial = study.ask()
        c = suggest(trial, space, {"n_layer": 10})
        study.tell(trial, 0.0)
        assert 0 <= c.loop_start < c.loop_end <= 6 and 1 <= c.loop_end - c.loop_start <= 3
        assert 2 <= c.strategy_params["n_loops"] <= 12


def test_space_needs_a_block_for_looping_strategies():
    with pytest.raises(SpecError, match=r"add a \[block\]"):
        validate(SearchSpace, {"name": "x", "strategies": ["fixed"]}, "x.toml")
    with pytest.raises(SpecError, match="exactly one of region"):
        validate(SearchSpace, {"name": "x", "strategies": ["fixed"], "block": {"region": [0, 1], "layers": [0, 2]}},
                 "x.toml")


def test_bad_strategy_parameter_names_allowed(tiny_recipe, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "p"\nstrategies = ["fixed"]\n[block]\nregion = [0, 1]\n[strategy.fixed]\nloops = 3\n')
    allowed = "allowed: mean_loops, n_loops, reinject, sigma, train_loops"
    with pytest.raises(SpecError, match=f"unknown parameter 'loops'; {allowed}"):
        studies.spec_from_options("p", str(path), str(tiny_recipe), None, None, None, None, None)
    path.write_text('name = "p"\nstrategies = ["fixed"]\n[block]\nregion = [0, 1]\n[strategy.fixed]\n'
                    'n_loops = { low = 0, high = 3 }\n')
    with pytest.raises(SpecError, match="n_loops"):
        studies.spec_from_options("p", str(path), str(tiny_recipe), None, None, None, None, None)


def test_jointly_invalid_parameters_prune_one_trial_not_the_study(tiny_recipe, tmp_path):
    """d_model 48 and n_heads 16 are each valid but together give odd head sizes."""
    path = tmp_path / "joint.toml"
    path.write_text('name = "joint"\nstrategies = ["none"]\n[backbone]\nd_model = [48]\nn_heads = [16]\n')
    studies.create(studies.spec_from_options("joint", str(path), str(tiny_recipe), None, None, None, None, None))
    workers.run("joint", n_trials=2, progress=False)
    trials = studies.load("joint")[0].get_trials()
    assert trials[0].state.name == "COMPLETE"
    assert trials[1].state.name == "PRUNED" and "invalid configuration" in trials[1].user_attrs["rejected"]


STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in STUDIES.glob("*.toml")))
def test_every_shipped_recipe_resolves_to_a_study(recipe):
    """Each studies/*.toml validates and names a space that exists."""
    spec = studies.spec_from_options(recipe, None, recipe, None, None, None, None, None)
    assert spec.budget > 0 and spec.n_trials >= 1
    assert load_space(spec.space.name).name == spec.space.name
