"""The builtin looping strategies, and the example plugin's third-party ``damped``, pass the
conformance suite a strategy author inherits (loopsearch.testing)."""

from __future__ import annotations

import pytest

from conftest import run_cli

from loopsearch.testing import StrategyConformance


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
    assert run_cli("plugins", "check", "ancestral").returncode == 2  # a sampler: no suite yet, said in one line
