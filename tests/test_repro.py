"""The paper's experiment as one command: arms with roles, the claims table, the shipped recipe."""

import json

import pytest

from loopsearch import repro, report
from loopsearch import study as studies
from loopsearch.errors import LoopsearchError, SpecError
from loopsearch.space import load_recipe, load_space
from loopsearch.spec import SearchSpace

from conftest import SHARED_DATA

# LoopMDM's four arms, scaled to the 4-layer test model
TINY_ARMS = """name = "tiny_repro"
[arms.baseline]
role = "baseline"
[arms.early]
role = "early_looped"
strategy = "fixed"
params = { n_loops = 2, train_loops = "uniform" }
block = [1, 2]
[arms.late]
role = "late_looped"
strategy = "fixed"
params = { n_loops = 2, train_loops = "uniform" }
block = [3, 4]
[arms.deeper]
role = "deeper"
backbone = { n_layer = 5 }
"""


@pytest.fixture
def eval_data(tmp_path):
    """A stand-in for shared/data: WikiText-2 and LAMBADA files in their layout (tiny texts)."""
    root = tmp_path / "data"
    (root / "wikitext-2").mkdir(parents=True)
    (root / "lambada").mkdir()
    (root / "wikitext-2" / "wiki.test.raw").write_text(
        " = Valkyria = \n\n The game began development in 2010 , carrying over a large portion of the work . \n" * 40)
    (root / "lambada" / "lambada_test.jsonl").write_text(
        "\n".join(json.dumps({"text": f"the king spoke to his daughter and the queen listened to the king {i}"})
                  for i in range(60)))
    return root


@pytest.fixture
def tiny_repro_recipe(tiny_recipe, tmp_path):
    space = tmp_path / "tiny_repro.toml"
    space.write_text(TINY_ARMS)
    recipe = tmp_path / "repro.toml"
    recipe.write_text(tiny_recipe.read_text().replace('space = "early_middle"', f'space = "{space}"')
                      .replace("eval_points = 2", "eval_points = 4"))
    return recipe


@pytest.mark.usefixtures("one_thread")
def test_repro_trains_the_arms_evaluates_them_and_reports_the_claims(tiny_repro_recipe, eval_data, tmp_path):
    said = []
    rep = repro.run("rp", str(tiny_repro_recipe), data=eval_data, output=tmp_path / "out", fmt="md",
                    progress=False, say=said.append)
    st, spec = studies.load("rp")
    trials = repro.role_trials(st, spec)
    assert set(trials) == set(repro.ROLES)
    assert trials["baseline"].user_attrs[studies.BASELINE_ATTR]
    # every arm trained at the same budget; the deeper arm is the 5-layer plain model
    assert {t.user_attrs["budget"] for t in trials.values()} == {spec.budget}
    assert trials["deeper"].user_attrs["n_layer"] == 5
    claims = next(s for s in rep.sections if s.key == "claims")
    assert len(claims.rows) == 5, claims.rows
    assert all(row[2] in ("agrees", "disagrees") or row[2].startswith("inconclusive") for row in claims.rows)
    page = rep.page.read_text()
    assert "LoopMDM's claims vs this study" in page and "3.3x fewer training FLOPs" in page
    zs = repro.zeroshot_rows(st, trials)
    assert sorted((r["role"], r["data"]) for r in zs) == sorted(
        (role, corpus) for role in repro.ROLES for corpus in ("WikiText-2", "LAMBADA"))
    assert all(r["bits_per_byte"] > 0 for r in zs)
    scaling = repro.scaling_rows(st, trials["early_looped"])
    assert [r["n_loops"] for r in scaling] == [1, 2, 3, 4]
    assert repro.attention_change(st, trials["early_looped"])["loops"] == 2
    # run again: nothing is trained or evaluated twice
    said.clear()
    repro.run("rp", str(tiny_repro_recipe), data=eval_data, output=tmp_path / "out", fmt="md", progress=False,
              say=said.append)
    assert len(studies.load("rp")[0].get_trials()) == 4
    assert not [m for m in said if m.startswith(("loop scaling", "zero-shot", "attention", "trial "))], said


def test_small_differences_are_inconclusive_not_verdicts():
    assert repro._compare(0.05) == "agrees" and repro._compare(-0.05) == "disagrees"
    assert repro._compare(0.0001).startswith("inconclusive")


def test_flop_ratio_reads_the_learning_curve():
    curve = [(1e9, 6.0), (2e9, 5.0), (3e9, 4.0), (4e9, 3.5)]
    assert repro.flops_to_reach(curve, 4.5) == (2.5e9, False)  # linear between the 2e9 and 3e9 points
    assert repro.flops_to_reach(curve, 7.0) == (1e9, True)  # already there at the first validation
    assert repro.flops_to_reach(curve, 3.0) == (None, False)  # never reached


def test_shipped_recipe_has_the_four_arms_at_matched_per_step_compute():
    recipe = load_recipe("loopmdm_repro")
    space = load_space(recipe.space)
    assert {arm.role for arm in space.arms.values()} == set(repro.ROLES)
    assert recipe.corpus.name == "ptb"
    spec = studies.make_spec(recipe, "check")
    assert spec.n_trials == 4
    # the deeper arm costs what the early-middle arm costs at its trained loop count, per forward pass
    from loopsearch.space import suggest_arm

    class Fixed:  # an Optuna trial that returns the enqueued value
        def __init__(self, arm):
            self.arm = arm

        def suggest_categorical(self, name, choices):
            return self.arm

    costs = {}
    for name in ("early_middle", "deeper"):
        config = studies.trial_config(spec, 0, suggest_arm(Fixed(name), spec.space))
        costs[name] = studies.meta_model(config).inference_flops_per_token(config.train.seq_len)
    assert costs["deeper"] == pytest.approx(costs["early_middle"], rel=0.02)


def test_arms_spaces_are_checked_before_training(tiny_recipe, tmp_path):
    with pytest.raises(ValueError, match="fixes every trial"):
        SearchSpace.model_validate({"name": "x", "strategies": ["fixed"], "arms": {"a": {}}})
    with pytest.raises(ValueError, match="apply to \\[arms\\] spaces"):
        SearchSpace.model_validate({"name": "x", "strategies": ["none"], "seeds": 3})
    with pytest.raises(ValueError, match="give block"):
        SearchSpace.model_validate({"name": "x", "arms": {"a": {"strategy": "fixed"}}})
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[arms.a]\n[arms.far]\nstrategy = "fixed"\nblock = [3, 9]\n')
    with pytest.raises(SpecError, match=r"\[arms.far\].*outside the model's 4 layers"):
        studies.spec_from_options("b", str(bad), str(tiny_recipe), None, None, None, None, None)


def test_a_failed_arm_is_queued_again(tiny_recipe, tmp_path):
    space = tmp_path / "arms.toml"
    space.write_text(TINY_ARMS)
    studies.create(studies.spec_from_options("g", str(space), str(tiny_recipe), None, None, None, None, None))
    st = studies.load("g")[0]
    waiting = st.get_trials()
    assert [t.system_attrs["fixed_params"]["arm"] for t in waiting] == ["baseline", "early", "late", "deeper"]
    assert [bool(t.user_attrs.get(studies.BASELINE_ATTR)) for t in waiting] == [True, False, False, False]
    trial = st.ask()  # a worker takes the baseline and dies
    st.tell(trial, state=studies.TrialState.FAIL)
    studies.ensure_baseline(st)
    queued = [t for t in st.get_trials() if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["fixed_params"]["arm"] for t in queued) == ["baseline", "deeper", "early", "late"]


def test_ptb_corpus_names_the_missing_files(tmp_path):
    from loopsearch.registry import get_registry

    cls = get_registry().get("corpus", "ptb")
    with pytest.raises(LoopsearchError, match="PTB not found: .*ptb.train.txt"):
        cls(cls.Params(dir=str(tmp_path))).load_splits()


@pytest.mark.skipif(not (SHARED_DATA / "ptb").is_dir(), reason="../shared/data/ptb is not on this machine")
def test_ptb_corpus_reads_the_shared_copy(monkeypatch):
    from loopsearch.registry import get_registry

    monkeypatch.setenv("LOOPSEARCH_DATA", str(SHARED_DATA))
    cls = get_registry().get("corpus", "ptb")
    splits = cls(cls.Params()).load_splits()
    assert len(splits["train"]) > 4_000_000 and "<unk>" in splits["valid"]


def test_report_of_a_search_study_has_no_claims_section(trained, tmp_path):
    rep = report.write("scale", tmp_path / "r")
    assert "claims" not in {s.key for s in rep.sections} and "sweep" not in {s.key for s in rep.sections}
