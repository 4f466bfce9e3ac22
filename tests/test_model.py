"""Looping semantics: n_loops = 1 is the plain model, loops share weights, draws stay in range."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_model


@settings(max_examples=15, deadline=None)
@given(start=st.integers(0, 3), length=st.integers(1, 4), reinject=st.booleans(), seed=st.integers(0, 100))
def test_one_loop_equals_plain_model(start, length, reinject, seed):
    end = min(4, start + length)
    plain = tiny_model(seed=seed)
    looped = tiny_model(seed=seed, loop=(start, end, {"n_loops": 1, "reinject": reinject}))
    looped.load_state_dict(plain.state_dict())
    x = torch.randint(0, 51, (2, 16))
    a = plain(x).logits
    out = looped(x)
    assert out.applications == 1.0
    assert torch.equal(a, out.logits)


def test_loops_share_weights_and_change_output():
    looped = tiny_model(loop=(1, 3, {"n_loops": 3}))
    plain = tiny_model()
    assert sum(p.numel() for p in looped.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randint(0, 51, (2, 16))
    one = looped(x, n_loops=1)
    three = looped(x)
    assert three.applications == 3.0 and not torch.allclose(one.logits, three.logits)


def test_looped_block_runs_exactly_n_times():
    model = tiny_model(loop=(1, 2, {"n_loops": 4}))
    calls = []
    model.backbone.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    model.backbone.blocks[0].register_forward_hook(lambda *a: calls.append(0))
    model(torch.randint(0, 51, (1, 16)))
    assert calls.count(1) == 4 and calls.count(0) == 1


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_uniform_training_loops_within_bounds(n, seed):
    model = tiny_model(loop=(0, 1, {"n_loops": n, "train_loops": "uniform"}))
    g = torch.Generator().manual_seed(seed)
    draws = [model.strategy.train_loops(g) for _ in range(50)]
    assert all(1 <= d <= n for d in draws)
    assert model.strategy.max_train_loops() == n
    assert model.strategy.expected_train_loops() == (n + 1) / 2
    assert model.strategy.eval_loops() == n


def test_uniform_draws_cover_range():
    model = tiny_model(loop=(0, 1, {"n_loops": 4, "train_loops": "uniform"}))
    g = torch.Generator().manual_seed(0)
    assert {model.strategy.train_loops(g) for _ in range(200)} == {1, 2, 3, 4}


# ---- the block belongs to the model, the loop count has one name ----------------------------
def test_the_model_owns_the_block_and_strategies_only_how_to_loop():
    from loopsearch.looping import LoopedMDM
    from loopsearch.registry import get_registry

    reg = get_registry()
    bb = tiny_model().backbone
    fixed = reg.build("loop_strategy", "fixed", {"n_loops": 2}, bb.d_model)
    assert not hasattr(fixed, "loop_start") and not hasattr(fixed, "loop_end")
    model = LoopedMDM(bb, fixed, 1, 3)
    assert (model.loop_start, model.loop_end) == (1, 3)
    import pytest

    from loopsearch.errors import SpecError
    with pytest.raises(SpecError, match=r"loop block \[0, 0\) is outside"):
        LoopedMDM(bb, fixed)  # a looping strategy needs a block
    with pytest.raises(SpecError, match="does not loop"):
        LoopedMDM(bb, reg.build("loop_strategy", "none", {}, bb.d_model), 1, 3)


def test_every_builtin_looping_strategy_calls_its_loop_count_n_loops():
    from loopsearch.registry import get_registry

    for name, info in get_registry().items("loop_strategy").items():
        if info.distribution != "loopsearch" or not info.obj.loops_block:
            continue
        fields = info.obj.Params.model_fields
        assert "n_loops" in fields and "max_loops" not in fields, name


def test_the_old_loop_count_name_still_works_with_a_deprecation_line():
    import pytest
    from pydantic import ValidationError

    from loopsearch_builtins.halting import HaltingParams
    from loopsearch_builtins.timestep import TimestepParams

    with pytest.warns(FutureWarning, match="'max_loops' is now 'n_loops'"):
        assert HaltingParams(max_loops=3).n_loops == 3
    with pytest.warns(FutureWarning):
        assert TimestepParams.model_validate({"max_loops": 5, "min_loops": 2}).n_loops == 5
    with pytest.raises(ValidationError, match="give 'n_loops' only"):
        HaltingParams.model_validate({"max_loops": 3, "n_loops": 3})


def test_a_space_with_the_old_loop_count_name_still_creates_a_study(tiny_recipe, tmp_path):
    import pytest

    from loopsearch.search import study as studies

    space = tmp_path / "old.toml"
    space.write_text('name = "old"\nstrategies = ["halting", "timestep"]\n[block]\nlayers = [1, 3]\nlength = [1, 2]\n'
                     '[strategy.halting]\nmax_loops = { low = 2, high = 4 }\n'
                     '[strategy.timestep]\nmax_loops = { low = 2, high = 4 }\n')
    with pytest.warns(FutureWarning, match="'max_loops' is now 'n_loops'"):
        spec = studies.make_spec(studies.load_recipe(str(tiny_recipe)), "old", str(space))
    assert spec.space.strategy["halting"]["max_loops"].high == 4  # the space keeps the user's spelling
