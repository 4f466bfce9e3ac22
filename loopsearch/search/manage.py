"""Everyday study tools: queue a chosen configuration, retry a failed trial, delete a study.

``enqueue`` checks the parameters against the study's own space before anything is stored (the
same ``suggest`` the sampler's trials go through, on an Optuna ``FixedTrial``), so a typo fails
now, in one line, not as a failed trial later. ``retry`` queues a failed trial again the way a
worker's retry does (Optuna's retry callback: same parameters and user attributes, the retry
history kept), so it resumes from the failed attempt's last checkpoint. ``delete`` removes the
study from the storage and its checkpoint directory.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
from optuna.trial import FixedTrial, TrialState

from ..errors import LoopsearchError
from .space import suggest
from .study import artifacts_root, load


def parse_value(text: str):
    """A --param value: an int, a float, true/false, or else the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if not (isinstance(value, float) and not math.isfinite(value)) else text
    return text


class _CheckedTrial(FixedTrial):
    """A FixedTrial that fails, in one line, on a parameter the space draws but was not given or
    on a value outside its distribution (FixedTrial itself only warns)."""

    def __init__(self, params: dict, space_name: str):
        super().__init__(params)
        self.space_name = space_name

    def _suggest(self, name, distribution):
        if name not in self._params:
            raise LoopsearchError(f"--param: this configuration needs {name!r} too (space {self.space_name!r}); "
                                  f"given: {', '.join(sorted(self._params)) or 'nothing'}")
        value = self._params[name]
        try:
            ok = distribution._contains(distribution.to_internal_repr(value))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            allowed = (f"one of {list(distribution.choices)}"
                       if isinstance(distribution, optuna.distributions.CategoricalDistribution)
                       else f"{distribution.low}..{distribution.high}")
            raise LoopsearchError(f"--param {name}={value!r} is outside the space {self.space_name!r}: "
                                  f"allowed {allowed}")
        return super()._suggest(name, distribution)


def check_params(study: optuna.Study, spec, params: dict) -> dict:
    """``params`` as the study's space would have drawn them; a one-line error names a missing,
    unknown or out-of-range parameter and what the space allows."""
    fixed = _CheckedTrial(params, spec.space.name)
    try:
        suggest(fixed, spec.space, spec.backbone.params)
    except LoopsearchError as exc:
        raise LoopsearchError(str(exc) if str(exc).startswith("--param") else f"--param: {exc}") from None
    unused = sorted(set(params) - set(fixed.distributions))
    if unused:
        raise LoopsearchError(f"--param {', '.join(unused)}: not drawn by space {spec.space.name!r} for this "
                              f"configuration (it draws {', '.join(sorted(fixed.distributions))})")
    return dict(fixed.params)


def enqueue(name: str, params: dict, storage: str | None = None) -> dict:
    """Queue one configuration of the study's space; it runs before any sampled trial."""
    study, spec = load(name, storage)
    checked = check_params(study, spec, params)
    study.enqueue_trial(checked, user_attrs={"enqueued_by": "loopsearch study enqueue"})
    return checked


def retry(name: str, number: int, storage: str | None = None) -> int:
    """Queue a failed trial again (same parameters; it resumes from the failed attempt's last
    checkpoint); return the number of trials waiting in the queue."""
    from .workers import requeue

    study, _ = load(name, storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise LoopsearchError(f"study {name!r} has no trial {number} (trials 0..{max(trials, default=-1)}); "
                              f"see `loopsearch leaderboard --study {name} --wide`")
    trial = trials[number]
    if trial.state != TrialState.FAIL:
        raise LoopsearchError(f"trial {number} of {name!r} is {trial.state.name.lower()}: only failed trials are "
                              f"retried (queue a configuration again with `loopsearch study enqueue`)")
    later = [t.number for t in trials.values() if number in (t.system_attrs.get("retry_history") or [])]
    if later:
        raise LoopsearchError(f"trial {number} of {name!r} was retried already (as trial {later[-1]}); retry "
                              f"that one if it failed too")
    requeue(study, trial)
    return sum(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))


def describe(name: str, storage: str | None = None) -> tuple[int, Path]:
    """(trials, checkpoint directory) of a study, for the confirmation."""
    study, spec = load(name, storage)
    return len(study.get_trials(deepcopy=False)), artifacts_root(spec)


def delete(name: str, storage: str | None = None) -> tuple[int, Path | None]:
    """Delete the study and its checkpoint directory; return (trials deleted, directory removed or None)."""
    from .storage import open_storage

    n, root = describe(name, storage)
    optuna.delete_study(study_name=name, storage=open_storage(storage))
    if root.exists():
        shutil.rmtree(root)
        return n, root
    return n, None
