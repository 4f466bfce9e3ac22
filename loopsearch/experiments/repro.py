"""The paper's experiment in one command: ``loopsearch repro``.

``run`` creates the study of the ``loopmdm_repro`` recipe (arms of ``search_spaces/
loopmdm_repro.toml``: baseline, early-middle looped, late looped, deeper non-looped, each at the
same training-FLOP budget), trains the arms, evaluates the looped arms at several inference loop
counts, the zero-shot bounds of every arm on WikiText-2 and LAMBADA, the attention analysis of
the early-middle arm, and writes the report, whose first section puts each of LoopMDM's claims
beside what was measured and says whether this small-scale run agrees (the claims, their
measurements and verdicts: loopsearch/results/claims.py). Every step is stored with the study
and skipped when already done, so an interrupted ``repro`` continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial

from ..data import shared_data_dir
from ..errors import LoopsearchError
from ..eval import attention as attn
from ..eval import generation, loop_scaling as scaling, metrics
from ..results import report
from ..results.claims import ATTENTION_ATTR, RATES, ROLES, ZEROSHOT, one_per_role, role_trials
from ..search import study as studies
from ..search.workers import run_to_target
from ..spec import validate


def run(name: str = "loopmdm_repro", recipe: str = "loopmdm_repro", *, data: str | Path | None = None,
        budget: str | None = None, corpus: dict | None = None, storage: str | None = None, workers: int = 1,
        output: str | Path | None = None, fmt: str = "html", progress: bool = True, device: str = "auto",
        seeds: int | None = None, say: Callable[[str], None] = print):
    """Create (if needed) and run the repro study, then every evaluation the claims need, then
    the report. ``seeds`` (default: the space's) trains every arm that many times, paired by
    seed, so the claims get intervals over seeds. Returns the written report (``loopsearch.results.page.Report``)."""
    root = shared_data_dir(data)
    if name not in studies.study_names(storage):
        spec = make_spec(name, recipe, budget, corpus, seeds)
        studies.create(spec, storage)
        say(f"created study {name!r}: {len(spec.space.arms)} arms x {spec.space.seeds} seed(s) at "
            f"{spec.budget:.3g} training FLOPs each")
    elif budget is not None or corpus is not None:
        raise LoopsearchError(f"study {name!r} exists; --budget/--corpus apply to a new one (pick another --name)")
    elif seeds is not None and seeds != (have := studies.load(name, storage)[1].space.seeds):
        raise LoopsearchError(f"study {name!r} exists with {have} seed(s); --seeds applies to a new one "
                              f"(pick another --name)")
    run_to_target(name, storage, workers, progress, say)
    study, spec = studies.load(name, storage)
    trials = role_trials(study, spec)
    missing = [r for r in ROLES if r not in trials and any(a.role == r for a in spec.space.arms.values())]
    if missing:
        raise LoopsearchError(f"study {name!r}: the arms {missing} did not finish (see `loopsearch leaderboard "
                              f"--study {name}`); run `loopsearch repro --name {name}` again")
    one = one_per_role(trials)
    loop_scaling(study, one, device, say)
    zero_shot(study, one, root, device, say)
    attention(study, trials, device, say)
    rep = report.write(name, output, fmt, storage)
    say(f"report: {rep.page}")
    return rep


def make_spec(name: str, recipe: str, budget: str | None = None, corpus: dict | None = None,
              seeds: int | None = None):
    """The study spec of a recipe with command-line overrides; ``seeds`` replaces the space's."""
    spec = studies.spec_from_options(name, None, recipe, budget, corpus, None, None, None)
    if seeds is None or seeds == spec.space.seeds:
        return spec
    if seeds < 1:
        raise LoopsearchError(f"--seeds must be >= 1, got {seeds}")
    space = validate(type(spec.space), {**spec.space.model_dump(), "seeds": seeds}, f"space {spec.space.name!r}")
    if "seeds" in type(spec).model_fields:  # a recipe-level seeds would override the space's
        spec = spec.model_copy(update={"seeds": seeds})
    return studies.make_spec(spec, name, space)


def loop_scaling(study: optuna.Study, trials: dict[str, FrozenTrial], device: str, say) -> None:
    """Val NLL of each looped arm at 1 .. 2x its trained loop count (``loopsearch eval``)."""
    done = scaling.stored(study)
    for role in ("early_looped", "late_looped"):
        t = trials.get(role)
        if t is None or t.number in done:
            continue
        n = int(t.user_attrs["n_loops"])
        loops = sorted({1, *range(1, n + 1), n + 1, 2 * n})
        say(f"loop scaling of trial {t.number} ({role}) at {loops} loops")
        directory = scaling.trial_checkpoint(study, t.number)
        scaling.store(study, t.number, directory, scaling.loop_scaling(directory, loops, device))


def zero_shot(study: optuna.Study, trials: dict[str, FrozenTrial], root: Path | None, device: str, say) -> None:
    """The zero-shot ELBO bound of every arm on WikiText-2 test and LAMBADA (when present)."""
    files = {label: root / rel for label, rel in ZEROSHOT.items()} if root else {}
    files = {label: path for label, path in files.items() if path.is_file()}
    if not files:
        say(f"zero-shot skipped: no {', '.join(ZEROSHOT.values())} under {root or 'a shared data folder'} "
            f"(pass --data DIR)")
        return
    stored = metrics.stored(study)
    for role, t in trials.items():
        have = {r.get("data") for r in stored.get(t.number, []) if r.get("metric") == "zeroshot"}
        todo = {label: p for label, p in files.items() if str(p) not in have}
        if not todo:
            continue
        loaded = generation.load_trial(scaling.trial_checkpoint(study, t.number), device)
        for label, path in todo.items():
            say(f"zero-shot {label} for trial {t.number} ({role})")
            metrics.store(study, t.number, metrics.zeroshot_metric(loaded, path, sequences=64))


def attention(study: optuna.Study, trials: dict[str, list[FrozenTrial]], device: str, say) -> None:
    """Attention shares of the early-middle arm, every seed (the claim's interval is over seeds),
    and of the baseline's first seed, for reference."""
    todo = [("early_looped", t) for t in trials.get("early_looped", [])]
    todo += [("baseline", t) for t in trials.get("baseline", [])[:1]]
    for role, t in todo:
        stored = study.user_attrs.get(f"{ATTENTION_ATTR}{t.number}")
        if stored and all("self" in r for r in stored):  # rows without "self" counted it as mask->mask: redo
            continue
        say(f"attention analysis of trial {t.number} ({role})")
        rows = attn.trial_attention_shares(scaling.trial_checkpoint(study, t.number), RATES, device=device)
        study.set_user_attr(f"{ATTENTION_ATTR}{t.number}", rows)
