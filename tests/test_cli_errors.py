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


# ---- issue 14: inputs that gave tracebacks, or failed only at run time -------------------------
def test_a_binary_file_as_a_space(tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(bytes(range(128, 256)) * 2)
    one_line_error(run_cli("study", "create", "--space", str(binary)), "bin.toml", "not a UTF-8 text file")


@pytest.mark.parametrize("dist,needle", [("[]", "at least 1 item"), ("{ low = 1, high = 4, step = 0 }", "step"),
                                         ("{ low = 1, high = 4, step = -2 }", "greater than or equal to 1")])
def test_empty_choices_and_non_positive_steps_are_refused_at_create(tmp_path, tiny_recipe, dist, needle):
    space = tmp_path / "s.toml"
    space.write_text(f'name = "s"\nstrategies = ["fixed"]\n[block]\nlayers = [1, 3]\nlength = [1, 2]\n'
                     f'[strategy.fixed]\nn_loops = {dist}\n')
    r = run_cli("study", "create", "--space", str(space), "--recipe", str(tiny_recipe))
    one_line_error(r, "strategy.fixed.n_loops", needle)


def test_an_unwritable_leaderboard_output_is_one_line(tiny_recipe, tmp_path):
    assert run_cli("study", "create", "--recipe", str(tiny_recipe), "--name", "o").returncode == 0
    r = run_cli("leaderboard", "--study", "o", "--output", str(tmp_path / "missing" / "x.csv"))
    one_line_error(r, "does not exist")


@pytest.mark.parametrize("device,needle", [("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device")])
def test_a_device_this_machine_cannot_have_fails_before_any_trial(tiny_recipe, device, needle):
    assert run_cli("study", "create", "--recipe", str(tiny_recipe), "--name", "d").returncode == 0
    r = run_cli("study", "run", "d", "--device", device)
    one_line_error(r, needle)
    from loopsearch.search import study as studies

    assert studies.load("d")[0].get_trials() == [] or all(  # nothing ran: only the enqueued baseline waits
        t.state.name == "WAITING" for t in studies.load("d")[0].get_trials())


def test_cuda_without_a_gpu_is_one_line(tiny_recipe):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run_cli("study", "create", "--recipe", str(tiny_recipe), "--name", "g").returncode == 0
    one_line_error(run_cli("study", "run", "g", "--device", "cuda"), "sees no CUDA GPU", "--device cpu")


def test_a_model_too_big_for_memory_is_refused_at_create_with_the_estimate(tmp_path):
    recipe = tmp_path / "big.toml"
    recipe.write_text('description = "big"\nbudget = "1e12"\n[backbone]\nname = "transformer"\n'
                      'params = { n_layer = 48, d_model = 16384, n_heads = 64 }\n')
    one_line_error(run_cli("study", "create", "--recipe", str(recipe)), "GiB to train", "GiB free",
                   "lower d_model")


def test_the_memory_estimate_counts_optimizer_state_and_loop_activations():
    """training_memory includes weights, gradients and both AdamW moments (16 bytes a parameter)
    and grows with the loops kept for the backward pass. (It is not checked against a measured
    allocation: peak RSS is too coarse at this size.)"""
    from helpers import tiny_model
    from loopsearch.spec import TrainConfig
    from loopsearch.train import training_memory

    model = tiny_model(loop=(1, 3, {"n_loops": 3}), seq_len=16)
    cfg = TrainConfig(batch_size=4, seq_len=16)
    params = sum(p.numel() for p in model.parameters())
    est = training_memory(model, cfg)
    assert est > 16 * params  # weights, grads and AdamW moments at least
    plain = training_memory(tiny_model(seq_len=16), cfg)
    assert est > plain  # loops keep more activations


def test_an_unwritable_checkpoint_folder_fails_before_any_training(tiny_recipe, tmp_path):
    """Issue 15: with an unwritable loopsearch_runs a trial trained to the end, then died saving.
    (A file where the folder should be: permissions do not stop root, which CI may run as.)"""
    assert run_cli("study", "create", "--recipe", str(tiny_recipe), "--name", "w").returncode == 0
    Path("loopsearch_runs").write_text("not a folder")
    r = run_cli("study", "run", "w", "--no-progress")
    one_line_error(r, "cannot write checkpoints to", "loopsearch_runs", "artifacts_dir")
    from loopsearch.search import study as studies

    assert all(t.state.name == "WAITING" for t in studies.load("w")[0].get_trials())  # nothing started


def test_the_dashboard_sees_metric_names(tiny_recipe):
    assert run_cli("study", "create", "--recipe", str(tiny_recipe), "--name", "m").returncode == 0
    from loopsearch.search import study as studies

    assert studies.load("m")[0].metric_names == ["val_nll"]


def test_study_create_estimates_the_time_of_a_trial(tmp_path):
    """Issue 15 item 5: create measures a few steps of the baseline here and says how long a trial
    and the study will take (a 1e20 budget is not accepted without a word)."""
    db = f"sqlite:///{tmp_path / 'e.db'}"
    r = run_cli("study", "create", "--space", "early_middle", "--name", "e", "--estimate", "--storage", db)
    assert r.returncode == 0, r.stderr
    (line,) = [line for line in r.stdout.splitlines() if line.startswith("estimate:")]
    assert "per trial on this machine" in line and "GFLOP/s" in line and "for the study's 5 trials" in line
    huge = run_cli("study", "create", "--space", "early_middle", "--name", "h", "--budget", "1e20", "--estimate",
                   "--storage", db)
    assert huge.returncode == 0 and "years" in huge.stdout, huge.stdout
    quiet = run_cli("study", "create", "--space", "early_middle", "--name", "q", "--storage", db)  # not a terminal
    assert quiet.returncode == 0 and "estimate:" not in quiet.stdout
