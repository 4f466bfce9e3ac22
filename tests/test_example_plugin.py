"""The out-of-tree example plugin (tests/example_plugin, the plugin guide in docs/plugins.md) works end to end:
discovered through its entry point, filtered by LOOPSEARCH_PLUGINS, numerically right, and usable
from a user's own search-space file through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli

DIST = "loopsearch-example-plugin"


def _plugins(env: dict | None = None) -> dict:
    out = run_cli("plugins", "list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _named(listing: dict, kind: str) -> dict:
    return {p["name"]: p for p in listing["plugins"] if p["kind"] == kind}


# ---- discovery ------------------------------------------------------------------------------------------
def test_plugins_list_shows_damped(example_plugin_installed, monkeypatch):
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)
    listing = _plugins()
    damped = _named(listing, "loop_strategy")["damped"]
    assert damped["distribution"] == DIST
    assert damped["version"] == "0.1.0"
    assert damped["plugin"] == "damped"
    params = damped["parameters"]
    assert set(params) == {"n_loops", "beta"}
    assert params["n_loops"]["default"] == 2 and params["n_loops"]["type"] == "integer"
    assert params["beta"]["default"] == 0.5 and params["beta"]["type"] == "number"
    assert all(p.get("description") for p in params.values())
    space = _named(listing, "search_space")["damped_early"]
    assert space["distribution"] == DIST
    assert not [f for f in listing["failures"] if f["distribution"] == DIST]


@pytest.mark.parametrize("value, shown", [("", False), ("damped", True), (DIST, True), ("someone-else", False)])
def test_loopsearch_plugins_env_filters_third_party(example_plugin_installed, value, shown):
    listing = _plugins(env={"LOOPSEARCH_PLUGINS": value})
    strategies = _named(listing, "loop_strategy")
    assert ("damped" in strategies) is shown
    assert ("damped_early" in _named(listing, "search_space")) is shown
    # the builtins always load
    assert {"none", "fixed"} <= set(strategies)
    assert "transformer" in _named(listing, "backbone")
    assert "early_middle" in _named(listing, "search_space")


# ---- numerics --------------------------------------------------------------------------------------------
def _model(strategy_name: str, params: dict, start: int = 1, end: int = 3, seed: int = 0):
    from loopsearch.looping import LoopedMDM
    from loopsearch.registry import get_registry
    from loopsearch_builtins.transformer import Transformer, TransformerParams

    cls = get_registry().get("loop_strategy", strategy_name)  # through the entry point, as a study does
    torch.manual_seed(seed)
    backbone = Transformer(TransformerParams(n_layer=4, d_model=32, n_heads=2), 50, 16)
    return LoopedMDM(backbone, cls(cls.Params(**params), 32), start, end).eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 51, (3, 16), generator=torch.Generator().manual_seed(seed))  # 50 tokens + MASK


@pytest.mark.parametrize("n_loops", [1, 2, 5])
def test_damped_with_beta_one_equals_fixed(example_plugin_installed, monkeypatch, n_loops):
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)
    x = _tokens()
    damped = _model("damped", {"n_loops": n_loops, "beta": 1.0})
    fixed = _model("fixed", {"n_loops": n_loops})
    with torch.no_grad():
        out_d, out_f = damped(x), fixed(x)
        logits_d, applied_d = out_d.logits, out_d.applications
        logits_f, applied_f = out_f.logits, out_f.applications
    torch.testing.assert_close(logits_d, logits_f, rtol=0, atol=1e-6)
    assert applied_d == applied_f == float(n_loops)


def test_damped_with_beta_below_one_follows_its_update(example_plugin_installed, monkeypatch):
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)
    x, beta, n = _tokens(), 0.4, 3
    damped = _model("damped", {"n_loops": n, "beta": beta})
    fixed = _model("fixed", {"n_loops": n})
    with torch.no_grad():
        out_d = damped(x)
        logits_d, applied = out_d.logits, out_d.applications
        logits_f = fixed(x).logits
        # h <- (1 - beta) h + beta block(h), written out by hand on the same weights
        b = damped.backbone
        h = b.run_block(0, b.embed(x))
        for _ in range(n):
            h = (1 - beta) * h + beta * b.run_block(2, b.run_block(1, h))
        expected = b.head(b.run_block(3, h))
    torch.testing.assert_close(logits_d, expected)
    assert applied == float(n)
    assert (logits_d - logits_f).abs().max() > 1e-3  # damping changes the output
    s = damped.strategy
    assert s.eval_loops() == s.max_train_loops() == s.expected_train_loops() == n
    assert s.train_loops(torch.Generator().manual_seed(0)) == n
    # FLOPs follow every block application, first loop included
    assert damped.inference_flops_per_token(16) == fixed.inference_flops_per_token(16)
    assert damped.inference_flops_per_token(16, 1.0) < damped.inference_flops_per_token(16)


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"beta": 1.5}, {"n_loops": 0}, {"n_loops": 65}, {"gamma": 1}])
def test_damped_params_are_validated(example_plugin_installed, bad):
    from pydantic import ValidationError

    from loopsearch_example_plugin import DampedParams

    with pytest.raises(ValidationError):
        DampedParams(**bad)


# ---- end to end through the CLI ------------------------------------------------------------------------------
USER_SPACE = """
name = "my_damped"
description = "a user's own space using the plugin's strategy"
strategies = ["damped"]

[block]
region = [0.0, 0.6]
length = [1, 2]

[strategy.damped]
n_loops = { low = 2, high = 3 }
beta = { low = 0.3, high = 0.9 }
"""


@pytest.mark.slow  # trains two tiny models (~30-40 s warm, ~70 s if it trains the session's tokeniser)
def test_study_with_plugin_strategy_end_to_end(example_plugin_installed, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)
    space = tmp_path / "my_damped.toml"
    space.write_text(USER_SPACE)
    out = run_cli("study", "create", "--space", str(space), "--recipe", str(tiny_recipe), "--name", "ext")
    assert out.returncode == 0, out.stderr
    out = run_cli("study", "run", "ext", "--n-trials", "2", "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    out = run_cli("leaderboard", "--study", "ext", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 2
    assert all(r["state"] == "complete" and math.isfinite(r["val_nll"]) for r in rows), rows
    (base,) = [r for r in rows if r["baseline"]]
    (trial,) = [r for r in rows if not r["baseline"]]
    assert base["strategy"] == "none"
    assert trial["strategy"] == "damped"
    assert trial["n_loops"] in (2, 3)
    assert 0 <= trial["loop_start"] < trial["loop_end"] <= 2  # region [0, 0.6) of 4 layers
    beta = float(dict(kv.split("=") for kv in trial["params"].split())["beta"])
    assert 0.3 <= beta <= 0.9
    assert trial["train_flops"] <= trial["budget"]
    assert trial["inference_flops_per_token"] > base["inference_flops_per_token"]  # the block runs n_loops times


def test_plugin_search_space_is_accepted(example_plugin_installed, tiny_recipe, monkeypatch):
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)
    out = run_cli("study", "create", "--space", "damped_early", "--recipe", str(tiny_recipe), "--name", "own")
    assert out.returncode == 0, out.stderr
    assert "space damped_early" in out.stdout
    out = run_cli("study", "show", "own", "--json")
    assert out.returncode == 0, out.stderr
    space = json.loads(out.stdout)["space"]
    assert space["strategies"] == ["damped"]
    assert set(space["strategy"]["damped"]) == {"n_loops", "beta"}
    # with the plugin filtered out, the space and its strategy are gone and the error says so
    out = run_cli("study", "create", "--space", "damped_early", "--recipe", str(tiny_recipe), "--name", "gone",
                  env={"LOOPSEARCH_PLUGINS": ""})
    assert out.returncode == 2
    assert "damped_early" in out.stderr
