"""Mistakes a user can make get one line naming the problem and the fix, a non-zero exit
status and no traceback."""

from pathlib import Path

import pytest

from conftest import run_cli

BAD_BLOCK = """name = "outside"
strategies = ["fixed"]
[block]
layers = [2, 10]
length = [1, 2]
"""
UNKNOWN_STRATEGY = """name = "mystery"
strategies = ["telepathy"]
[block]
region = [0.0, 0.5]
"""


def one_line_error(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_space():
    r = run_cli("study", "create", "--space", "nope")
    one_line_error(r, "unknown search space 'nope'", "early_middle", ".toml")


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nstrategies = ["fixed"\n')
    one_line_error(run_cli("study", "create", "--space", str(bad)), "bad.toml", "malformed TOML", "line")


def test_unknown_key_names_allowed_keys(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text('name = "x"\nstrategies = ["fixed"]\n[block]\nregion = [0, 0.5]\nlenght = [1, 2]\n')
    one_line_error(run_cli("study", "create", "--space", str(bad)), "typo.toml", "'block.lenght'", "length")


def test_loop_block_outside_the_model(tmp_path, tiny_recipe):
    space = tmp_path / "outside.toml"
    space.write_text(BAD_BLOCK)
    r = run_cli("study", "create", "--space", str(space), "--recipe", str(tiny_recipe))
    one_line_error(r, "outside the model's 4 layers")


def test_unknown_plugin(tmp_path, tiny_recipe):
    space = tmp_path / "mystery.toml"
    space.write_text(UNKNOWN_STRATEGY)
    r = run_cli("study", "create", "--space", str(space), "--recipe", str(tiny_recipe))
    one_line_error(r, "unknown loop strategy 'telepathy'", "fixed", "none", "plugins list")


def test_unknown_corpus(tiny_recipe):
    r = run_cli("study", "create", "--space", "early_middle", "--corpus", "klingon-poetry")
    one_line_error(r, "klingon-poetry", "shakespeare")


def test_budget_below_one_step(tiny_recipe):
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--budget", "1e6")
    one_line_error(r, "below one training step", "--budget")


def test_unreadable_budget():
    one_line_error(run_cli("study", "create", "--space", "early_middle", "--budget", "lots"), "'lots'", "TFLOP")


def test_unwritable_storage(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = run_cli("study", "create", "--space", "early_middle", "--storage", f"sqlite:///{blocker}/studies.db")
    one_line_error(r, "cannot use storage", "--storage")


@pytest.mark.parametrize("args", [("study", "run", "ghost"), ("study", "show", "ghost"),
                                  ("leaderboard", "--study", "ghost")])
def test_unknown_study(args):
    import os

    import optuna

    # a storage that exists but lacks the study (no storage at all: tests/test_hardening.py)
    optuna.create_study(storage=os.environ["LOOPSEARCH_STORAGE"], study_name="someone_else")
    one_line_error(run_cli(*args), "unknown study 'ghost'", "study create")


def test_every_command_has_help():
    for cmd in (["--help"], ["plugins", "list", "--help"], ["spaces", "list", "--help"],
                ["study", "create", "--help"], ["study", "run", "--help"], ["study", "list", "--help"],
                ["study", "show", "--help"], ["leaderboard", "--help"]):
        r = run_cli(*cmd)
        assert r.returncode == 0 and "Usage:" in r.stdout, cmd
    assert "Example:" in run_cli("study", "create", "--help").stdout


def test_bad_study_budget_and_pruner_budget(tiny_recipe):
    one_line_error(run_cli("study", "run", "any", "--study-budget", "lots"), "--study-budget",
                   "cannot read budget 'lots'")
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--pruner", "median",
                "--budget", "1.5e9")
    one_line_error(r, "pruner 'median'", "below the 1 GFLOP step", "raise --budget to at least 2e+09")


def test_every_command_is_in_the_readme_table_and_has_an_example():
    import click

    from loopsearch.cli import cli

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()

    def leaves(group, prefix):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from leaves(cmd, prefix + [name])
            else:
                yield prefix + [name], cmd

    found = list(leaves(cli, []))
    assert len(found) >= 16
    for path, cmd in found:
        assert f"| `loopsearch {' '.join(path)}" in readme, \
            f"`loopsearch {' '.join(path)}` is not in the README's command table"
        assert "Example" in (cmd.help or ""), f"`loopsearch {' '.join(path)} --help` has no example"
