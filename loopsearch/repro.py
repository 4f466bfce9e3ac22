"""The paper's experiment in one command: ``loopsearch repro``.

LoopMDM (arXiv 2605.26106) claims, for a masked diffusion LM whose early-middle layers are looped:

1. it reaches a same-size MDM's NLL with up to 3.3x fewer training FLOPs;
2. it beats a deeper non-looped model of similar per-step compute;
3. early-middle is where to loop (the paper places the block there, not late);
4. more loops at inference help (the loop count trades compute for quality);
5. looping raises the attention that masked positions pay to each other.

``run`` creates the study of the ``loopmdm_repro`` recipe (arms of ``search_spaces/
loopmdm_repro.toml``: baseline, early-middle looped, late looped, deeper non-looped, each at the
same training-FLOP budget), trains the arms, evaluates the looped arms at several inference loop
counts, the zero-shot bounds of every arm on WikiText-2 and LAMBADA, the attention analysis of
the early-middle arm, and writes the report, whose first section (``sections``) puts each claim
beside what was measured and says whether this small-scale run agrees. Every step is stored
with the study and skipped when already done, so an interrupted ``repro`` continues.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import LoopsearchError

ATTENTION_ATTR = "loopsearch.attention."
ROLES = ("baseline", "early_looped", "late_looped", "deeper")
ZEROSHOT = {"WikiText-2": "wikitext-2/wiki.test.raw", "LAMBADA": "lambada/lambada_test.jsonl"}
PAPER_FLOP_RATIO = 3.3
TIE = 0.01  # nats/token (or attention share): a smaller difference is called inconclusive, not a result
RATES = (0.15, 0.5, 0.85)


# ---- which trial plays which role ------------------------------------------------------------------
def role_trials(study: optuna.Study, spec) -> dict[str, FrozenTrial]:
    """{role: the complete trial of the arm with that role} (budget scale 1, seed 0 when a study
    also sweeps budgets or seeds)."""
    roles = {name: arm.role for name, arm in spec.space.arms.items() if arm.role}
    out: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if t.state != TrialState.COMPLETE or a.get("arm") not in roles or "val_nll" not in a:
            continue
        if float(a.get("budget_scale", 1.0)) != 1.0 or int(a.get("seed_offset", 0)) != 0:
            continue
        out.setdefault(roles[a["arm"]], t)
    return out


def has_roles(spec) -> bool:
    return any(arm.role for arm in spec.space.arms.values())


# ---- running ---------------------------------------------------------------------------------------------
def run(name: str = "loopmdm_repro", recipe: str = "loopmdm_repro", *, data: str | Path | None = None,
        budget: str | None = None, corpus: dict | None = None, storage: str | None = None, workers: int = 1,
        output: str | Path | None = None, fmt: str = "html", progress: bool = True, device: str = "auto",
        say: Callable[[str], None] = print):
    """Create (if needed) and run the repro study, then every evaluation the claims need, then
    the report. Returns the written ``report.Report``."""
    from . import report
    from . import study as studies
    from .data import shared_data_dir

    root = shared_data_dir(data)
    if name not in studies.study_names(storage):
        spec = studies.spec_from_options(name, None, recipe, budget, corpus, None, None, None)
        studies.create(spec, storage)
        say(f"created study {name!r}: {len(spec.space.grid())} arms at {spec.budget:.3g} training FLOPs each")
    elif budget is not None or corpus is not None:
        raise LoopsearchError(f"study {name!r} exists; --budget/--corpus apply to a new one (pick another --name)")
    from .workers import run_to_target

    run_to_target(name, storage, workers, progress, say)
    study, spec = studies.load(name, storage)
    trials = role_trials(study, spec)
    missing = [r for r in ROLES if r not in trials and any(a.role == r for a in spec.space.arms.values())]
    if missing:
        raise LoopsearchError(f"study {name!r}: the arms {missing} did not finish (see `loopsearch leaderboard "
                              f"--study {name}`); run `loopsearch repro --name {name}` again")
    loop_scaling(study, trials, device, say)
    zero_shot(study, trials, root, device, say)
    attention(study, trials, device, say)
    rep = report.write(name, output, fmt, storage)
    say(f"report: {rep.page}")
    return rep


def loop_scaling(study: optuna.Study, trials: dict[str, FrozenTrial], device: str, say) -> None:
    """Val NLL of each looped arm at 1 .. 2x its trained loop count (``loopsearch eval``)."""
    from . import evaluate

    done = evaluate.stored(study)
    for role in ("early_looped", "late_looped"):
        t = trials.get(role)
        if t is None or t.number in done:
            continue
        n = int(t.user_attrs["n_loops"])
        loops = sorted({1, *range(1, n + 1), n + 1, 2 * n})
        say(f"loop scaling of trial {t.number} ({role}) at {loops} loops")
        directory = evaluate.trial_checkpoint(study, t.number)
        evaluate.store(study, t.number, directory, evaluate.loop_scaling(directory, loops, device))


def zero_shot(study: optuna.Study, trials: dict[str, FrozenTrial], root: Path | None, device: str, say) -> None:
    """The zero-shot ELBO bound of every arm on WikiText-2 test and LAMBADA (when present)."""
    from . import evaluate, generation, metrics

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
        loaded = generation.load_trial(evaluate.trial_checkpoint(study, t.number), device)
        for label, path in todo.items():
            say(f"zero-shot {label} for trial {t.number} ({role})")
            metrics.store(study, t.number, metrics.zeroshot_metric(loaded, path, sequences=64))


def attention(study: optuna.Study, trials: dict[str, FrozenTrial], device: str, say) -> None:
    """Attention shares of the early-middle arm (and the baseline, for reference)."""
    from . import analysis, evaluate

    for role in ("early_looped", "baseline"):
        t = trials.get(role)
        if t is None or f"{ATTENTION_ATTR}{t.number}" in study.user_attrs:
            continue
        say(f"attention analysis of trial {t.number} ({role})")
        rows = analysis.trial_attention_shares(evaluate.trial_checkpoint(study, t.number), RATES, device=device)
        study.set_user_attr(f"{ATTENTION_ATTR}{t.number}", rows)


# ---- the measurements behind the claims ---------------------------------------------------------------------
def flops_to_reach(curve: list[tuple[float, float]], target: float) -> tuple[float | None, bool]:
    """Training FLOPs at which a learning curve [(FLOPs, val NLL)] first reaches ``target``
    (linear between validation points); (None, False) if it never does. The flag is True when
    the first point already reached it (the FLOPs are then an upper bound)."""
    prev = None
    for flops, nll in curve:
        if nll <= target:
            if prev is None:
                return flops, True
            f0, n0 = prev
            return f0 + (n0 - target) / (n0 - nll) * (flops - f0), False
        prev = (flops, nll)
    return None, False


def curve_of(t: FrozenTrial) -> list[tuple[float, float]]:
    return [(float(f), float(v)) for f, v in t.user_attrs.get("history", [])]


def flop_rows(trials: dict[str, FrozenTrial]) -> list[dict[str, Any]]:
    """Per arm: final val NLL, its difference from the baseline, and the FLOP ratio at which it
    reaches the baseline's final val NLL (baseline FLOPs / the arm's FLOPs to get there)."""
    base = trials["baseline"]
    target, base_flops = float(base.user_attrs["val_nll"]), float(base.user_attrs["train_flops"])
    rows = []
    for role in ROLES:
        t = trials.get(role)
        if t is None:
            continue
        a = t.user_attrs
        # the baseline defines the target: its own (noisy) curve may dip below its final value earlier
        reach, first = (base_flops, False) if role == "baseline" else flops_to_reach(curve_of(t), target)
        rows.append({"role": role, "arm": a["arm"], "trial": t.number, "val_nll": float(a["val_nll"]),
                     "delta": float(a["val_nll"]) - target, "train_flops": float(a["train_flops"]),
                     "steps": int(a["steps"]), "inference_flops_per_token": float(a["inference_flops_per_token"]),
                     "flops_to_baseline": reach, "bound": first,
                     "flop_ratio": None if reach is None else base_flops / reach})
    return rows


def scaling_rows(study: optuna.Study, t: FrozenTrial | None) -> list[dict[str, Any]]:
    from . import evaluate

    if t is None:
        return []
    return [r for r in evaluate.stored(study).get(t.number, []) if r.get("exit", "none") == "none"]


def attention_change(study: optuna.Study, t: FrozenTrial | None) -> dict[str, float] | None:
    """Mask->mask attention share in the looped block: first vs last loop iteration, mean over
    the block's layers and the mask rates, beside the uniform share."""
    if t is None:
        return None
    rows = study.user_attrs.get(f"{ATTENTION_ATTR}{t.number}")
    start, end = int(t.user_attrs["loop_start"]), int(t.user_attrs["loop_end"])
    block = [r for r in rows or [] if start <= r["layer"] < end and r["mask_to_mask"] is not None
             and not math.isnan(r["mask_to_mask"])]
    if not block:
        return None
    last = max(r["loop"] for r in block)
    mean = lambda rs, key: statistics.fmean(r[key] for r in rs)  # noqa: E731
    first_rows = [r for r in block if r["loop"] == 1]
    last_rows = [r for r in block if r["loop"] == last]
    return {"first": mean(first_rows, "mask_to_mask"), "last": mean(last_rows, "mask_to_mask"),
            "uniform": mean(block, "masked_key_fraction"), "loops": last}


def zeroshot_rows(study: optuna.Study, trials: dict[str, FrozenTrial]) -> list[dict[str, Any]]:
    from . import metrics

    stored = metrics.stored(study)
    out = []
    for role in ROLES:
        t = trials.get(role)
        if t is None:
            continue
        for r in stored.get(t.number, []):
            if r.get("metric") != "zeroshot":
                continue
            label = next((k for k, rel in ZEROSHOT.items() if str(r["data"]).endswith(rel)), Path(r["data"]).name)
            out.append({"role": role, "arm": t.user_attrs["arm"], "data": label, "nll": r.get("nll"),
                        "perplexity": r.get("perplexity"), "bits_per_byte": r.get("bits_per_byte")})
    return out


# ---- the claims table -----------------------------------------------------------------------------------------
def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("agrees" if ok else "disagrees")


def _compare(gain: float) -> str:
    """Verdict on a measured gain in the claim's direction (> 0: as the paper says)."""
    if abs(gain) < TIE:
        return f"inconclusive (|difference| < {TIE})"
    return _verdict(gain > 0)


def claims(study: optuna.Study, trials: dict[str, FrozenTrial]) -> list[dict[str, str]]:
    """One row per claim: the paper's words, the measurement, and agrees / disagrees."""
    rows = {r["role"]: r for r in flop_rows(trials)} if "baseline" in trials else {}
    early, late, deeper = rows.get("early_looped"), rows.get("late_looped"), rows.get("deeper")
    out = []
    if early:
        ratio = early["flop_ratio"]
        if ratio is None:
            measured = (f"the early-middle looped model never reached the baseline's {rows['baseline']['val_nll']:.4f} "
                        f"(final {early['val_nll']:.4f}, {early['delta']:+.4f} nats/token)")
        else:
            measured = (f"reached the baseline's final val NLL after {early['flops_to_baseline']:.3g} of "
                        f"{rows['baseline']['train_flops']:.3g} FLOPs: {ratio:.2f}x fewer"
                        + (" (at its first validation: an upper bound on its FLOPs)" if early["bound"] else ""))
        verdict = _verdict(ratio is not None and ratio > 1.0)
        if ratio is None and abs(early["delta"]) < TIE:
            verdict = f"inconclusive (|difference| < {TIE})"
        out.append({"claim": f"looping early-middle layers reaches the baseline's NLL with up to "
                             f"{PAPER_FLOP_RATIO}x fewer training FLOPs", "measured": measured, "verdict": verdict})
    if early and deeper:
        out.append({"claim": "the looped model beats a deeper non-looped model of similar per-step compute",
                    "measured": f"early-middle {early['val_nll']:.4f} vs deeper {deeper['val_nll']:.4f} nats/token "
                                f"({early['inference_flops_per_token']:.3g} vs {deeper['inference_flops_per_token']:.3g} "
                                f"inference FLOPs/token)",
                    "verdict": _compare(deeper["val_nll"] - early["val_nll"])})
    if early and late:
        out.append({"claim": "early-middle layers are the place to loop (not late ones)",
                    "measured": f"early-middle {early['val_nll']:.4f} vs late {late['val_nll']:.4f} nats/token",
                    "verdict": _compare(late["val_nll"] - early["val_nll"])})
    scaling = {r["n_loops"]: r["val_nll"] for r in scaling_rows(study, trials.get("early_looped"))}
    if scaling and early:
        trained = int(trials["early_looped"].user_attrs["n_loops"])
        beyond = [n for n in sorted(scaling) if n > trained]
        text = ", ".join(f"{n}: {v:.4f}" for n, v in sorted(scaling.items()))
        verdict = _compare(scaling[1] - scaling[trained]) if 1 in scaling and trained in scaling else _verdict(None)
        more = "" if not beyond else (f"; beyond the trained {trained} loops: "
                                      f"{'still improves' if scaling[beyond[-1]] < scaling[trained] else 'no further gain'}")
        out.append({"claim": "more loops at inference help (loop count trades compute for quality)",
                    "measured": f"val NLL by inference loops {text}{more}", "verdict": verdict})
    att = attention_change(study, trials.get("early_looped"))
    if att:
        out.append({"claim": "looping raises the attention masked positions pay to each other",
                    "measured": f"mask->mask share in the looped block: loop 1 {att['first']:.3f} -> loop {att['loops']} "
                                f"{att['last']:.3f} (uniform {att['uniform']:.3f}; mean over t = "
                                f"{', '.join(str(r) for r in RATES)})",
                    "verdict": _compare(att["last"] - att["first"])})
    return out


def sections(d, out: Path) -> list:
    """The report's "paper's claims vs measured" sections (a table each; the learning curves
    and the loop-scaling plot are the report's own sections)."""
    from .report import Section

    trials = role_trials(d.study, d.spec)
    sec = Section("claims", "LoopMDM's claims vs this study")
    if "baseline" not in trials:
        sec.note = "No data: the baseline arm has not finished (run `loopsearch repro` or `loopsearch study run`)."
        return [sec]
    sec.caption = ("Each claim of LoopMDM (arXiv 2605.26106) beside what this study measured, at "
                   f"{float(trials['baseline'].user_attrs['budget']):.3g} training FLOPs per arm. At small budgets "
                   "the answer can be the opposite of the paper's: a looped model gets fewer optimizer steps for "
                   "the same FLOPs (see a budget sweep, `loopsearch sweep`). One seed per arm: a difference below "
                   f"{TIE} nats/token (or attention share) is called inconclusive.")
    sec.headers = ["claim (paper)", "measured here", "verdict"]
    sec.rows = [[c["claim"], c["measured"], c["verdict"]] for c in claims(d.study, trials)]
    flops = Section("flop_ratio", "Matched-FLOP arms")
    flops.caption = ("Final val NLL (nats/token) of each arm at the same training FLOPs, and the FLOP ratio at which "
                     "its learning curve reaches the baseline's final val NLL (> 1: fewer FLOPs than the baseline).")
    flops.headers = ["arm", "role", "trial", "steps", "val NLL", "Δ baseline", "inference FLOPs/token",
                     "FLOPs to baseline NLL", "FLOP ratio"]
    flops.rows = [[r["arm"], r["role"], str(r["trial"]), str(r["steps"]), f"{r['val_nll']:.4f}", f"{r['delta']:+.4f}",
                   f"{r['inference_flops_per_token']:.3g}",
                   "not reached" if r["flops_to_baseline"] is None else
                   f"{'≤ ' if r['bound'] else ''}{r['flops_to_baseline']:.3g}" + (" (target)" if r["role"] == "baseline" else ""),
                   "-" if r["flop_ratio"] is None else f"{'≥ ' if r['bound'] else ''}{r['flop_ratio']:.2f}x"]
                  for r in flop_rows(trials)]
    zs = Section("zeroshot", "Zero-shot perplexity bounds")
    zrows = zeroshot_rows(d.study, trials)
    if zrows:
        zs.caption = ("The diffusion ELBO on other corpora, bounding perplexity from above: nats/token under the "
                      "study's tokenizer and bits/byte (comparable across tokenizers); 64 windows per corpus.")
        zs.headers = ["arm", "role", "corpus", "NLL ≤ (nats/token)", "perplexity ≤", "bits/byte ≤"]
        zs.rows = [[r["arm"], r["role"], r["data"], f"{r['nll']:.4f}", f"{r['perplexity']:.2f}",
                    "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"] for r in zrows]
    else:
        zs.note = "Not measured: no WikiText-2/LAMBADA files were found (run `loopsearch repro --data DIR`)."
    return [sec, flops, zs]
