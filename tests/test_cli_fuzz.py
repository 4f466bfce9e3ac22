"""Generated command lines never end in a traceback (issue 14 item 6).

Hypothesis builds argument lists for the commands a user types most (create, list, show,
leaderboard, compare, report, sample, evaluate, enqueue, retry, delete, sweep --no-run) from
good values, bad values and junk, and runs them in-process through ``loopsearch.cli.main``: every
outcome must be an exit code, never an exception escaping ``main``. Nothing trains: `study run`
is only given studies that do not exist, and `sweep` runs with --no-run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopsearch.cli import main

JUNK = st.sampled_from(["", "-1", "0", "1e999", "nan", "inf", "-inf", "x", "[/]x", "a$\\foo$b", "../..", "1e12",
                        "3e9", "9" * 30, "1,2", "1-3", "☃", "--", "-", "none"])
NUMBER = st.one_of(st.integers(1, 4).map(str), st.integers(-10, 10).map(str),
                   st.sampled_from(["1e12", "0.5", "-0.5", "1e999", "nan"]), JUNK)
NAME = st.one_of(st.sampled_from(["fz", "missing", "quickstart"]), JUNK)


def opt(flag: str, values) -> st.SearchStrategy:
    return st.one_of(st.just([]), values.map(lambda v: [flag, v]))


COMMANDS = st.one_of(
    st.tuples(st.just(["study", "create", "--space"]),
              st.sampled_from(["early_middle", "early_middle", "depth", "nope", "x.toml"]).map(lambda v: [v]),
              opt("--name", NAME), opt("--budget", NUMBER), opt("--n-trials", NUMBER), opt("--seeds", NUMBER),
              opt("--pruner", st.sampled_from(["median", "hyperband", "bogus"])),
              opt("--optuna-sampler", st.sampled_from(["tpe", "gp", "bogus"]))),
    st.tuples(st.just(["study", "list"]), opt("--storage", st.sampled_from(["sqlite:///fz.db", "bogus://x", "x"]))),
    st.tuples(st.just(["study", "show"]), NAME.map(lambda n: [n])),
    st.tuples(st.just(["study", "run"]), st.sampled_from([["missing"], ["nope"]]), opt("--timeout", NUMBER),
              opt("--n-trials", NUMBER), opt("--workers", NUMBER), opt("--heartbeat", NUMBER), opt("--grace", NUMBER)),
    st.tuples(st.just(["study", "enqueue"]), NAME.map(lambda n: [n]), opt("--param", JUNK.map(lambda v: f"k={v}"))),
    st.tuples(st.just(["study", "retry"]), NAME.map(lambda n: [n]), NUMBER.map(lambda v: [v])),
    st.tuples(st.just(["study", "delete", "--yes"]), st.sampled_from([["missing"]])),
    st.tuples(st.just(["leaderboard"]), opt("--study", NAME), opt("--top", NUMBER),
              opt("--format", st.sampled_from(["table", "csv", "json", "markdown", "bogus"]))),
    st.tuples(st.just(["compare"]), NAME.map(lambda n: [n]), NAME.map(lambda n: [n])),
    st.tuples(st.just(["sample"]), NAME.map(lambda n: [n]), NUMBER.map(lambda v: [v]), opt("--steps", NUMBER),
              opt("--seq-len", NUMBER), opt("-n", NUMBER)),
    st.tuples(st.just(["evaluate"]), NAME.map(lambda n: [n]), NUMBER.map(lambda v: [v]),
              opt("--metric", st.sampled_from(["loop_scaling", "gen_ppl", "bogus"])), opt("--loops", NUMBER)),
    st.tuples(st.just(["sweep", "--no-run", "--recipe", "quickstart", "--space", "early_middle"]),
              opt("--scales", NUMBER), opt("--seeds", NUMBER), opt("--budget", NUMBER)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=COMMANDS)
def test_no_generated_command_line_ends_in_a_traceback(parts, capsys):
    argv = [a for part in parts for a in part]
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    else:  # main always exits
        code = 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, argv
    assert code in (0, 1, 2, 130), (argv, code, err[-500:])
    if code not in (0, 130):
        assert err.strip(), (argv, "a failure must say why")
