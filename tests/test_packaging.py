"""A non-editable install ships the builtin plugins, search spaces, recipes and default corpus."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True)
    return next(out.glob("loopsearch-*.whl"))


def test_wheel_contains_spaces_recipes_corpus_and_entry_points(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("loopsearch_builtins/search_spaces/early_middle.toml",
                 "loopsearch_builtins/search_spaces/anywhere.toml",
                 "loopsearch_builtins/search_spaces/depth.toml", "loopsearch_builtins/studies/quickstart.toml",
                 "loopsearch_builtins/data/tinyshakespeare.txt", "loopsearch_builtins/strategies.py",
                 "loopsearch/cli.py", "loopsearch/search/study.py", "loopsearch/eval/metrics.py",
                 "loopsearch/results/page.py", "loopsearch/experiments/repro.py"):
        assert path in names, path
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "[loopsearch]" in text and "loopsearch_builtins.strategies" in text


@pytest.mark.slow
def test_installed_wheel_finds_its_spaces(wheel, tmp_path):
    """Install the wheel into a fresh venv (reusing this interpreter's dependencies) and load a space
    from outside the source tree."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    # --system-site-packages sees the base interpreter's packages, not this (virtual) environment's:
    # put this environment's site-packages (torch, optuna, ...) on the new one's path, after its own
    new_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(new_site, "_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True)
    code = ("import loopsearch_builtins, loopsearch.search.space as s; "
            "assert 'site-packages' in loopsearch_builtins.__file__, loopsearch_builtins.__file__; "
            "print(s.load_space('early_middle').name, s.load_recipe('quickstart').budget)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["early_middle", "1000000000000.0"]
