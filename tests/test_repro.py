"""The paper's experiment as one command: arms with roles, the claims table, the shipped recipe."""

import json

import optuna
import pytest
from optuna.trial import TrialState

from loopsearch import stats
from loopsearch.errors import LoopsearchError, SpecError
from loopsearch.eval import loop_scaling as evaluate
from loopsearch.experiments import repro
from loopsearch.results import claims, report
from loopsearch.search import study as studies
from loopsearch.search.space import load_recipe, load_space
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
    by_seed = claims.role_trials(st, spec)
    assert set(by_seed) == set(claims.ROLES) and all(len(ts) == 1 for ts in by_seed.values())
    trials = claims.one_per_role(by_seed)
    assert trials["baseline"].user_attrs[studies.BASELINE_ATTR]
    # every arm trained at the same budget; the deeper arm is the 5-layer plain model
    assert {t.user_attrs["budget"] for t in trials.values()} == {spec.budget}
    assert trials["deeper"].user_attrs["n_layer"] == 5
    table = next(s for s in rep.sections if s.key == "claims")
    assert len(table.rows) == 5, table.rows
    assert all(row[2] in ("agrees", "disagrees") or row[2].startswith("inconclusive") for row in table.rows)
    assert all("1 seed" in row[1] for row in table.rows), table.rows
    page = rep.page.read_text()
    assert "LoopMDM's claims vs this study" in page and "3.3x fewer training FLOPs" in page
    zs = claims.zeroshot_rows(st, trials)
    assert sorted((r["role"], r["data"]) for r in zs) == sorted(
        (role, corpus) for role in claims.ROLES for corpus in ("WikiText-2", "LAMBADA"))
    assert all(r["bits_per_byte"] > 0 for r in zs)
    scaling = claims.scaling_rows(st, trials["early_looped"])
    assert [r["n_loops"] for r in scaling] == [1, 2, 3, 4]
    assert claims.attention_change(st, trials["early_looped"])["loops"] == 2
    # run again: nothing is trained or evaluated twice
    said.clear()
    repro.run("rp", str(tiny_repro_recipe), data=eval_data, output=tmp_path / "out", fmt="md", progress=False,
              say=said.append)
    assert len(studies.load("rp")[0].get_trials()) == 4
    assert not [m for m in said if m.startswith(("loop scaling", "zero-shot", "attention", "trial "))], said


class Stored:
    """A study stand-in for the claims: stored evaluations and attention rows, and its trials."""

    def __init__(self, trials=(), **user_attrs):
        self.user_attrs, self.trials = user_attrs, list(trials)

    def get_trials(self, deepcopy=False):
        return self.trials


ARM_OF = {"baseline": "baseline", "early_looped": "early", "late_looped": "late", "deeper": "deeper"}


def trial(number, role, val_nll, seed=0, history=None, windows=None, key="k", **attrs):
    """A complete arm trial as the study stores it (FLOPs 1e12, final validation at the end)."""
    a = {"arm": ARM_OF[role], "val_nll": val_nll, "seed_offset": seed, "budget": 1e12, "train_flops": 1e12,
         "steps": 100, "inference_flops_per_token": 1e6, "loop_start": 1, "loop_end": 2, "n_loops": 2,
         "history": history or [[5e11, val_nll + 0.3], [1e12, val_nll]], **attrs}
    if windows is not None:
        a.update(val_windows=windows, val_draws=2, eval_key=key)
    t = optuna.trial.create_trial(state=TrialState.COMPLETE, value=val_nll, user_attrs=a)
    t.number = number
    return t


def arms(values, roles=("baseline", "early_looped"), histories=None):
    """{role: [trials]} from {role: [val NLL per seed]}."""
    histories = histories or {}
    out, n = {}, 0
    for role in roles:
        out[role] = []
        for seed, v in enumerate(values[role]):
            out[role].append(trial(n, role, v, seed, (histories.get(role) or [None] * 9)[seed]))
            n += 1
    return out


def claim(rows, start):
    return next(r for r in rows if r["claim"].startswith(start))


def test_a_curve_ending_just_below_the_baseline_does_not_agree():
    # the early arm ends 0.001 below the baseline (mean of 3 paired seeds) with a paired s.e. of 0.0025
    base, early = [4.000, 4.010, 3.990], [4.004, 4.006, 3.987]
    trials = arms({"baseline": base, "early_looped": early})
    rows = {r["role"]: r for r in claims.flop_rows(trials)}
    e = rows["early_looped"]
    assert e["delta"] == pytest.approx(-0.001) and e["effect"].interval.df == 2
    assert e["noise"] == pytest.approx(e["effect"].interval.half_width) and e["noise"] > 0.001
    assert e["target"] == pytest.approx(4.0 - e["noise"]) and e["flop_ratio"] is None
    c = claim(claims.claims(Stored(), trials), "looping early-middle")
    assert c["verdict"].startswith("inconclusive"), c
    assert "3 seeds" in c["measured"] and "[" in c["measured"]
    # one seed whose curve ends 0.001 below, with only the validation noise: still not agreement
    one = {"baseline": [trial(0, "baseline", 4.0, windows=[4.0, 4.02, 3.99, 3.99])],
           "early_looped": [trial(1, "early_looped", 3.999, windows=[3.995, 4.02, 3.99, 3.991])]}
    c = claim(claims.claims(Stored(), one), "looping early-middle")
    assert c["verdict"].startswith("inconclusive") and "validation noise only" in c["measured"], c
    # one seed without per-window values: no noise to set the target by, never 'agrees'
    bare = arms({"baseline": [4.0], "early_looped": [3.9]})
    c = claim(claims.claims(Stored(), bare), "looping early-middle")
    assert c["verdict"] == "inconclusive (no interval)" and "1 seed, no interval" in c["measured"], c


def test_flop_ratio_agrees_beyond_the_noise_and_disagrees_above_zero():
    base = [4.00, 4.02, 3.98]
    history = [[2.5e11, 4.6], [5e11, 3.9], [1e12, 3.8]]  # well below the baseline at half the FLOPs
    good = arms({"baseline": base, "early_looped": [3.80, 3.81, 3.79]}, histories={"early_looped": [history] * 3})
    c = claim(claims.claims(Stored(), good), "looping early-middle")
    assert c["verdict"] == "agrees" and "x fewer" in c["measured"], c
    bad = arms({"baseline": base, "early_looped": [4.20, 4.23, 4.19]})
    c = claim(claims.claims(Stored(), bad), "looping early-middle")
    assert c["verdict"] == "disagrees" and "never reached" in c["measured"], c


def test_paired_claims_use_seeds_or_the_validation_noise_of_one_seed():
    roles = ("baseline", "early_looped", "late_looped", "deeper")
    trials = arms({"baseline": [4.0, 4.1], "early_looped": [4.1, 4.2], "late_looped": [4.0, 4.101],
                   "deeper": [4.3, 4.41]}, roles)
    rows = claims.claims(Stored(), trials)
    deeper = claim(rows, "the looped model beats")
    # deeper - early over 2 seeds: 0.2 and 0.21; t with 1 degree of freedom
    iv = claims.paired_effect(trials["early_looped"], trials["deeper"]).interval
    assert iv.mean == pytest.approx(0.205) and iv.df == 1
    assert iv.half_width == pytest.approx(12.706 * iv.se, rel=1e-4)
    assert deeper["verdict"] == "agrees" and "2 seeds" in deeper["measured"] and iv.text() in deeper["measured"]
    late = claim(rows, "early-middle layers are the place")
    assert late["verdict"] == "disagrees" and "2 seeds" in late["measured"], late  # late - early: -0.1, -0.099
    # one seed: the paired masks' noise when both trials were scored on the same windows and masks
    w_early, w_late = [4.0, 4.2, 4.1, 4.1], [3.9, 4.1, 4.0, 4.0]  # late better by 0.1 on every draw
    one = {"baseline": [trial(0, "baseline", 4.0)], "early_looped": [trial(1, "early_looped", 4.1, windows=w_early)],
           "late_looped": [trial(2, "late_looped", 4.0, windows=w_late)]}
    e = claims.paired_effect(one["early_looped"], one["late_looped"])
    assert e.basis == "1 seed, validation noise only" and e.interval.mean == pytest.approx(-0.1)
    other = {**one, "late_looped": [trial(2, "late_looped", 4.0, windows=w_late, key="other masks")]}
    e = claims.paired_effect(other["early_looped"], other["late_looped"])
    assert e.basis == "1 seed, no interval" and e.verdict == "inconclusive (no interval)"


def test_loop_scaling_needs_per_window_values():
    early = trial(1, "early_looped", 4.1, val_draws=2)
    trials = {"baseline": [trial(0, "baseline", 4.0)], "early_looped": [early]}
    rows = [{"n_loops": 1, "exit": "none", "val_nll": 4.2, "val_windows": [4.2, 4.25, 4.15, 4.2]},
            {"n_loops": 2, "exit": "none", "val_nll": 4.1, "val_windows": [4.1, 4.12, 4.08, 4.1]}]
    study = Stored(**{f"{evaluate.EVAL_ATTR}1": {"loop_scaling": rows}})
    c = claim(claims.claims(study, trials), "more loops")
    effect = stats.paired_window_interval(rows[1]["val_windows"], rows[0]["val_windows"], 2)  # 1 loop minus 2
    assert c["verdict"] == "agrees" and effect.text() in c["measured"] and "validation noise only" in c["measured"]
    bare = Stored(**{f"{evaluate.EVAL_ATTR}1": {"loop_scaling": [
        {k: v for k, v in r.items() if k != "val_windows"} for r in rows]}})
    assert claim(claims.claims(bare, trials), "more loops")["verdict"] == "inconclusive (no interval)"


def test_attention_claim_is_an_interval_over_seeds():
    def shares(first, last):  # layer 1 is the looped block (loop_start 1, loop_end 2)
        return [{"t": t, "layer": 1, "loop": k, "mask_to_mask": v, "self": 0.1, "mask_to_unmasked": 0.9 - v,
                 "masked_key_fraction": 0.5} for t in claims.RATES for k, v in ((1, first), (2, last))]

    trials = arms({"baseline": [4.0, 4.0], "early_looped": [4.1, 4.1]})
    early = trials["early_looped"]
    study = Stored(**{f"{claims.ATTENTION_ATTR}{early[0].number}": shares(0.50, 0.60),
                      f"{claims.ATTENTION_ATTR}{early[1].number}": shares(0.52, 0.61)})
    c = claim(claims.claims(study, trials), "looping raises the attention")
    assert c["verdict"] == "agrees" and "2 seeds" in c["measured"] and "over training seeds" in c["measured"], c
    assert "self 0.100 -> 0.100" in c["measured"]
    change = claims.attention_change(study, early[0])
    assert [change[k] for k in ("first", "last", "self_first", "uniform")] == pytest.approx([0.5, 0.6, 0.1, 0.5])
    one = Stored(**{f"{claims.ATTENTION_ATTR}{early[0].number}": shares(0.50, 0.60)})
    c = claim(claims.claims(one, trials), "looping raises the attention")
    assert c["verdict"] == "inconclusive (no interval)" and "1 seed" in c["measured"], c


def test_seeds_replace_the_spaces_and_every_seed_plays_its_role(tiny_repro_recipe):
    spec = repro.make_spec("s3", str(tiny_repro_recipe), seeds=3)
    assert spec.space.seeds == 3 and spec.n_trials == 12
    assert repro.make_spec("s1", str(tiny_repro_recipe)).space.seeds == 1
    with pytest.raises(LoopsearchError, match="--seeds must be >= 1"):
        repro.make_spec("s0", str(tiny_repro_recipe), seeds=0)
    ts = [trial(n, role, 4.0 + n / 100, seed) for n, (seed, role) in
          enumerate((s, r) for s in (2, 0, 1) for r in ("baseline", "early_looped"))]
    trials = claims.role_trials(Stored(ts), spec)
    assert [claims._seed(t) for t in trials["baseline"]] == [0, 1, 2]
    assert claims.one_per_role(trials)["early_looped"].user_attrs["seed_offset"] == 0


def test_flop_ratio_reads_the_learning_curve():
    curve = [(1e9, 6.0), (2e9, 5.0), (3e9, 4.0), (4e9, 3.5)]
    assert claims.flops_to_reach(curve, 4.5) == (2.5e9, False)  # linear between the 2e9 and 3e9 points
    assert claims.flops_to_reach(curve, 7.0) == (1e9, True)  # already there at the first validation
    assert claims.flops_to_reach(curve, 3.0) == (None, False)  # never reached


def test_shipped_recipe_has_the_four_arms_at_matched_per_step_compute():
    recipe = load_recipe("loopmdm_repro")
    space = load_space(recipe.space)
    assert {arm.role for arm in space.arms.values()} == set(claims.ROLES)
    assert recipe.corpus.name == "ptb"
    spec = studies.make_spec(recipe, "check")
    assert spec.n_trials == 4
    # the deeper arm costs what the early-middle arm costs at its trained loop count, per forward pass
    from loopsearch.search.space import suggest_arm

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
    with pytest.raises(ValueError, match="applies to \\[arms\\] spaces"):  # seeds now apply to searches too
        SearchSpace.model_validate({"name": "x", "strategies": ["none"], "budget_scales": [1.0, 2.0]})
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
