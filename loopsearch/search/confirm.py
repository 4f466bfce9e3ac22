"""``loopsearch study confirm``: retrain a study's best configurations and its baseline with new seeds.

A search ranks configurations by one training run each (or ``seeds`` each); the winner of many
noisy runs is biased towards luck. Confirmation retrains the top K complete trials and the
baseline with N further seeds (initialisation and data order; validation masks stay the study's),
as new trials that carry ``loopsearch.confirm_of`` (the trial they confirm) and
``loopsearch.confirm_seeds`` (the seed offsets they train, after every offset used so far).
They do not count towards the study's ``n_trials``, their FLOPs count against ``--study-budget``,
and the leaderboard merges their seeds into the trial they confirm: the trial's val NLL becomes
the mean over all its seeds, and its difference from the baseline is paired seed by seed with a
t interval on n - 1 degrees of freedom.
"""

from __future__ import annotations

from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import interrupt
from ..errors import LoopsearchError
from ..units import format_flops
from .space import BASELINE_ATTR
from .study import CONFIRM_OF_ATTR, CONFIRM_SEEDS_ATTR, Objective, load, trial_line
from .workers import flops_spent


def used_offsets(trials: list[FrozenTrial], number: int) -> set[int]:
    """The seed offsets trial ``number`` and its confirmations have trained or will train."""
    used: set[int] = set()
    for t in trials:
        if t.number == number:
            used.update(int(r["seed_offset"]) for r in t.user_attrs.get("seed_results", []))
            used.add(int(t.user_attrs.get("seed_offset", 0)))
        elif t.user_attrs.get(CONFIRM_OF_ATTR) == number and t.state in (
                TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
            used.update(int(s) for s in t.user_attrs.get(CONFIRM_SEEDS_ATTR, []))
    return used


def targets(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The baseline and the ``top`` best other complete trials by val NLL (not confirmations)."""
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE and t.user_attrs.get(CONFIRM_OF_ATTR) is None
            and t.user_attrs.get("val_nll") is not None]
    baselines = sorted((t for t in done if t.user_attrs.get(BASELINE_ATTR)), key=lambda t: t.user_attrs["val_nll"])
    if not baselines:
        raise LoopsearchError(f"study {study.study_name!r} has no complete baseline to confirm against; run "
                              f"`loopsearch study run {study.study_name}` first")
    others = sorted((t for t in done if not t.user_attrs.get(BASELINE_ATTR)), key=lambda t: t.user_attrs["val_nll"])
    if not others:
        raise LoopsearchError(f"study {study.study_name!r} has no complete trial besides the baseline; "
                              f"run more trials first")
    return [baselines[0], *others[:top]]


def plan(study: optuna.Study, top: int, seeds: int) -> list[tuple[FrozenTrial, list[int]]]:
    """[(trial, new seed offsets)] for the baseline and the top trials."""
    trials = study.get_trials(deepcopy=False)
    out = []
    for t in targets(study, top):
        start = max(used_offsets(trials, t.number)) + 1
        out.append((t, list(range(start, start + seeds))))
    return out


def enqueue(study: optuna.Study, planned: list[tuple[FrozenTrial, list[int]]]) -> list[int]:
    """Queue one confirmation trial per planned (trial, seeds); returns how many were queued."""
    for t, offsets in planned:
        attrs = {CONFIRM_OF_ATTR: t.number, CONFIRM_SEEDS_ATTR: offsets}
        if t.user_attrs.get(BASELINE_ATTR):
            attrs[BASELINE_ATTR] = True
        study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
    return [t.number for t, _ in planned]


def confirm(name: str, storage: str | None = None, *, top: int = 3, seeds: int = 2,
            study_budget: float | None = None, progress: bool = True,
            say: Callable[[str], None] = print) -> list[int]:
    """Queue and run the confirmation trials; returns the numbers of the trials confirmed."""
    if top < 1 or seeds < 1:
        raise LoopsearchError(f"--top and --seeds must be >= 1, got {top} and {seeds}")
    study, spec = load(name, storage)
    if spec.objective.multi:
        raise LoopsearchError(f"study {name!r} has several objectives {spec.objective.metrics}; confirm ranks "
                              f"by val NLL, so it needs a single-objective study")
    trials = study.get_trials(deepcopy=False)
    waiting = [t.number for t in trials if t.state == TrialState.WAITING and t.user_attrs.get(CONFIRM_OF_ATTR) is None]
    if waiting:
        raise LoopsearchError(f"study {name!r} has queued trials {waiting[:5]}; run `loopsearch study run {name}` "
                              f"first, then confirm")
    pending = [t for t in trials if t.state == TrialState.WAITING and t.user_attrs.get(CONFIRM_OF_ATTR) is not None]
    if pending:
        say(f"continuing {len(pending)} queued confirmation trial(s)")
        confirmed = sorted({int(t.user_attrs[CONFIRM_OF_ATTR]) for t in pending})
    else:
        planned = plan(study, top, seeds)
        need = sum(len(offsets) * float(t.user_attrs.get("budget", spec.budget)) for t, offsets in planned)
        if study_budget is not None and flops_spent(trials) + need > study_budget:
            raise LoopsearchError(
                f"confirming {len(planned)} trials x {seeds} seeds needs {format_flops(need)}; with "
                f"{format_flops(flops_spent(trials))} spent the study budget {format_flops(study_budget)} cannot pay "
                f"for it; lower --top or --seeds, or raise --study-budget")
        confirmed = enqueue(study, planned)
        say(f"confirming trials {confirmed} (the first is the baseline) with {seeds} more seed(s) each: "
            f"{format_flops(need)} of training")
    objective = Objective(spec, progress)  # it never prunes a confirmation, whatever study.pruner is
    with interrupt.deferred():
        while True:
            interrupt.check()
            queued = [t for t in study.get_trials(deepcopy=False)
                      if t.state == TrialState.WAITING and t.user_attrs.get(CONFIRM_OF_ATTR) is not None]
            if not queued:
                break
            study.optimize(objective, n_trials=1, catch=(RuntimeError,),
                           callbacks=[lambda st, t: say(trial_line(t) + f" (confirms trial "
                                                        f"{t.user_attrs.get(CONFIRM_OF_ATTR)})")])
    return confirmed
