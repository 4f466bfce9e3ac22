"""Shared fixtures: tiny models, an isolated storage/cache per test, the example plugin package."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A tiny study (4 layers, d_model 32, ~30 steps a trial): one definition, shared with plugin authors.
from loopsearch.testing import TINY_RECIPE

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
EXAMPLE_PLUGIN = Path(__file__).resolve().parent / "example_plugin"



def pytest_configure(config):
    """Under pytest-xdist (one test process per core) a test process runs torch on one thread:
    two processes of two threads on two cores stall each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the whole session: the tokeniser is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, cache_dir):
    """Every test runs in its own directory with its own SQLite storage."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOPSEARCH_CACHE", str(cache_dir))
    monkeypatch.setenv("LOOPSEARCH_STORAGE", f"sqlite:///{tmp_path / 'test.db'}")
    from loopsearch.registry import set_registry

    set_registry(None)
    yield tmp_path
    set_registry(None)


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"  # the real server (trust auth), never a mock


@pytest.fixture(scope="module")
def pg():
    """The PostgreSQL URL, or a clean skip when the server (or its driver) is not there."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    try:
        with sqlalchemy.create_engine(PG_URL).connect():
            pass
    except Exception as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    return PG_URL


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread, and two threads per process stall badly on a
    shared 2-core machine (measured 10-50x slower). Use with pytest.mark.usefixtures."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (as a user would). The terminal width is
    not inherited (pytest-xdist workers set COLUMNS): tables are 80 columns wide, as in a pipe,
    unless the test passes COLUMNS."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    full_env = {**inherited, **(env or {})}
    return subprocess.run([sys.executable, "-m", "loopsearch", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def example_plugin_installed():
    """The out-of-tree plugin package in tests/example_plugin, pip-installed if it is not yet."""
    try:
        md.distribution("loopsearch-example-plugin")
    except md.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        str(EXAMPLE_PLUGIN)], check=True)
        md._cache_clear() if hasattr(md, "_cache_clear") else None
    return "loopsearch-example-plugin"


UNIFORM = """name = "uniform"
strategies = ["fixed"]
[block]
layers = [1, 3]
length = [2, 2]
[strategy.fixed]
n_loops = 4
train_loops = "uniform"
"""


@pytest.fixture
def trained(tiny_recipe, tmp_path):
    """A tiny finished study 'scale': the baseline (trial 0) and fixed [1,3) x4, uniform-trained (trial 1)."""
    from loopsearch.search import study as studies
    from loopsearch.search import workers

    space = tmp_path / "uniform.toml"
    space.write_text(UNIFORM)
    studies.create(studies.spec_from_options("scale", str(space), str(tiny_recipe), None, None, None, None, 2))
    workers.run("scale", progress=False)
    return studies.load("scale")[0]
