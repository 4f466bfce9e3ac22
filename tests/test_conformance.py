"""The builtin looping strategies, and the example plugin's third-party ``damped``, pass the
conformance suite a strategy author inherits (loopsearch.testing)."""

from __future__ import annotations

import pytest

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
