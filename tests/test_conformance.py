"""The builtin looping strategies, exit criteria, samplers and backbone, and the example plugin's
third-party ``damped``, pass the conformance suites a plugin author inherits (loopsearch.testing)."""

from __future__ import annotations

import pytest

from conftest import run_cli

from loopsearch.testing import BackboneConformance, ExitConformance, SamplerConformance, StrategyConformance


class TestFixed(StrategyConformance):
    strategy = "fixed"
    params = {"n_loops": 3}
    one_loop_params = {"n_loops": 1}


class TestFixedReinjectUniform(StrategyConformance):
    strategy = "fixed"
    params = {"n_loops": 3, "reinject": True, "train_loops": "uniform"}
    one_loop_params = {"n_loops": 1, "reinject": True, "train_loops": "uniform"}


class TestTimestep(StrategyConformance):
    strategy = "timestep"
    params = {"schedule": "linear", "min_loops": 1, "n_loops": 3}
    one_loop_params = {"schedule": "constant", "min_loops": 1, "n_loops": 1}


class TestHalting(StrategyConformance):
    strategy = "halting"
    params = {"n_loops": 3}
    one_loop_params = {"n_loops": 1}


@pytest.mark.parametrize("name, params", [("hidden_delta", {"tol": 0.5}), ("cosine", {"tol": 0.05}), ("kl", {}),
                                          ("min_p_kl", {"tol": 1e-3}), ("entropy", {"tol": 0.05}),
                                          ("argmax", {"patience": 1}), ("max_prob", {"threshold": 0.05})])
def test_builtin_exit_criteria_pass_their_suite(name, params):
    suite = type(f"Test_{name}", (ExitConformance,), {"criterion": name, "params": params})()
    for check in ("test_params_model_forbids_unknown_keys", "test_checks_give_one_sticky_bool_per_sequence",
                  "test_min_loops_holds_on_a_block_that_does_not_move",
                  "test_an_exit_run_equals_the_model_at_the_loops_it_reports"):
        getattr(suite, check)()
    for loops in (1, 2, 4):
        suite.test_flops_match_flop_counter(loops)


@pytest.mark.parametrize("name, params", [("ancestral", {}), ("cached", {}), ("confidence", {"block_length": 4}),
                                          ("threshold", {"threshold": 0.5})])
def test_builtin_samplers_pass_their_suite(name, params, monkeypatch):
    suite = type(f"Test_{name}", (SamplerConformance,), {"sampler": name, "params": params})()
    suite.test_params_model_forbids_unknown_keys()
    suite.test_fills_every_mask_and_keeps_the_prompt()
    suite.test_committed_tokens_never_change(monkeypatch)
    suite.test_same_seed_same_samples()
    suite.test_cost_matches_flop_counter()


@pytest.fixture
def _damped_available(example_plugin_installed, monkeypatch):
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)  # the third-party plugin must load


@pytest.mark.usefixtures("_damped_available")
class TestDamped(StrategyConformance):
    """A third-party strategy, tested exactly as its author would (beta = 1 is plain looping)."""

    strategy = "damped"
    params = {"n_loops": 3, "beta": 0.5}
    one_loop_params = {"n_loops": 1, "beta": 1.0}


PLANTED = '''
import torch
from pydantic import BaseModel, ConfigDict

import loopsearch
from loopsearch.looping import LoopResult, LoopStrategy


class P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Undercharged(LoopStrategy):
    """Runs the block three times but reports two: a planted FLOP error."""

    name = "undercharged"
    Params = P

    def train_loops(self, generator):
        return 3

    def max_train_loops(self):
        return 3

    def expected_train_loops(self):
        return 3.0

    def eval_loops(self):
        return 3

    def run(self, h, block, n_loops, ctx):
        for _ in range(n_loops):
            h = block(h)
        return LoopResult(h, float(n_loops - 1))


@loopsearch.hookimpl
def register_loop_strategies():
    return [Undercharged]


from loopsearch.exits import ExitCriterion, ExitParams


class FreeReadout(ExitCriterion):
    """Reads the predictions every loop but charges nothing for it: a planted FLOP error."""

    name = "free_readout"
    Params = ExitParams

    def converged(self, h_prev, h_new, state, ctx):
        confident = self.log_probs(ctx, h_new).amax(dim=-1).exp().amin(dim=-1) > 2.0  # never
        return confident, state, 0.0


@loopsearch.hookimpl
def register_exit_criteria():
    return [FreeReadout]


from loopsearch.sampling import Sampler


class Sneaky(Sampler):
    """Calls the model behind the Denoiser's back once per step: a planted cost error."""

    name = "sneaky"

    def sample(self, x, den, steps, generator):
        den(x, 0, steps)  # charged
        mask = x == den.mask_id
        logits = den.model(x).logits  # not charged
        x[mask] = logits[..., :den.mask_id].argmax(-1)[mask]
        return x


@loopsearch.hookimpl
def register_samplers():
    return [Sneaky]


from loopsearch_builtins.transformer import Transformer, TransformerParams
from loopsearch.flops import FlopProfile, head_flops, transformer_layer_flops


class NoAttentionCount(Transformer):
    """A transformer whose flop profile leaves out attention's T x T matmuls: a planted FLOP error."""

    name = "no_attention_count"
    Params = TransformerParams

    def flop_profile(self, seq_len):
        p = self.params
        layer = transformer_layer_flops(seq_len, p.d_model, p.d_ff, gated_mlp=p.mlp == "swiglu")
        layer -= 4 * seq_len * seq_len * p.d_model
        return FlopProfile(seq_len, (layer,) * p.n_layer, head_flops(seq_len, p.d_model, self.n_tokens))


@loopsearch.hookimpl
def register_backbones():
    return [NoAttentionCount]
'''


def test_plugins_check_runs_the_suite_and_catches_a_planted_flop_error(tmp_path):
    """`loopsearch plugins check NAME` on an installed (entry-point) plugin: a strategy that
    under-reports its block applications fails, naming FlopCounterMode; a builtin passes."""
    site = tmp_path / "site"
    (site / "planted_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "planted_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: planted-plugin\n"
                                                                    "Version: 0.1\n")
    (site / "planted_plugin-0.1.dist-info" / "entry_points.txt").write_text("[loopsearch]\nplanted = planted_mod\n")
    (site / "planted_mod.py").write_text(PLANTED)
    env = {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    r = run_cli("plugins", "check", "undercharged", env=env)
    assert r.returncode != 0
    assert "failed its conformance suite" in r.stderr and "FlopCounterMode" in r.stdout
    bad = run_cli("plugins", "check", "fixed", "--param", "n_loops=0", env=env)
    assert bad.returncode == 2 and "n_loops" in bad.stderr and "Traceback" not in bad.stderr
    r = run_cli("plugins", "check", "no_attention_count", env=env)  # a backbone that forgets attention's FLOPs
    assert r.returncode != 0 and "backbone 'no_attention_count' failed" in r.stderr and "FlopCounterMode" in r.stdout
    r = run_cli("plugins", "check", "sneaky", env=env)  # a sampler that calls the model behind the Denoiser
    assert r.returncode != 0 and "sampler 'sneaky' failed" in r.stderr and "FlopCounterMode" in r.stdout
    r = run_cli("plugins", "check", "free_readout", env=env)  # an exit criterion that hides its readouts
    assert r.returncode != 0
    assert "exit criterion 'free_readout' failed" in r.stderr and "FlopCounterMode" in r.stdout
    ok = run_cli("plugins", "check", "max_prob", "--param", "threshold=0.5", env=env)
    assert ok.returncode == 0 and "exit criterion 'max_prob' passed" in ok.stdout


class TestRecurrentTruncated(StrategyConformance):
    """Huginn-style recurrent depth, backprop through the last loop only: the first two of three
    loops run without backward and are charged once."""

    strategy = "recurrent"
    params = {"n_loops": 3, "train_loops": "constant", "backprop_loops": 1}
    one_loop_params = {"n_loops": 1, "train_loops": "constant", "injection": "add", "init_std": 0.0}


class TestRecurrentFullBackprop(StrategyConformance):
    strategy = "recurrent"
    params = {"n_loops": 3, "train_loops": "constant", "backprop_loops": 8}


class TestRecurrentLognormal(StrategyConformance):
    """Log-normal-Poisson loop counts with truncation: applications and forward-only loops vary per step."""

    strategy = "recurrent"
    params = {"n_loops": 6, "mean_loops": 3.0, "backprop_loops": 2, "injection": "add"}


class TestExitGate(StrategyConformance):
    """Ouro-style learned exit gate: readouts of the loops before the cap are charged (3x in training)."""

    strategy = "exit_gate"
    params = {"n_loops": 3}
    one_loop_params = {"n_loops": 1}


class TestExitGateEarlyExit(StrategyConformance):
    """A gate that starts wanting to exit: inference stops before the cap, and is charged what ran."""

    strategy = "exit_gate"
    params = {"n_loops": 4, "init_bias": 3.0, "threshold": 0.9}


class TestRouter(StrategyConformance):
    """Mixture-of-Recursions routing: later loops run only the kept tokens, charged at their length."""

    strategy = "router"
    params = {"n_loops": 3}
    one_loop_params = {"n_loops": 1}


class TestRouterGeometric(StrategyConformance):
    strategy = "router"
    params = {"n_loops": 4, "capacity": "geometric", "keep": 0.5}


class TestTransformerBackbone(BackboneConformance):
    backbone = "transformer"
    params = {"n_layer": 3, "d_model": 32, "n_heads": 2}


class TestTransformerBackboneGelu(BackboneConformance):
    backbone = "transformer"
    params = {"n_layer": 2, "d_model": 32, "n_heads": 4, "mlp": "gelu", "tie_embeddings": False}
