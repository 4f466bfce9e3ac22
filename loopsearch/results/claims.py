"""LoopMDM's claims beside what a study measured: the analysis half of ``loopsearch repro``.

LoopMDM (arXiv 2605.26106) claims, for a masked diffusion LM whose early-middle layers are looped:

1. it reaches a same-size MDM's NLL with up to 3.3x fewer training FLOPs;
2. it beats a deeper non-looped model of similar per-step compute;
3. early-middle is where to loop (the paper places the block there, not late);
4. more loops at inference help (the loop count trades compute for quality);
5. looping raises the attention that masked positions pay to each other.

A study of arms with roles (``search_spaces/loopmdm_repro.toml``: baseline, early-middle looped,
late looped, deeper non-looped, each at the same training-FLOP budget) is read here from storage:
the trials of each role, the loop-scaling rows, zero-shot bounds and attention shares stored with
them (loopsearch/experiments/repro.py runs those), and ``sections`` puts each claim beside what
was measured for the report (loopsearch/results/report.py), saying whether this small-scale run
agrees.

Verdicts respect the noise (loopsearch/stats.py): a claim "agrees" only when the 95% interval
of its effect excludes 0 in the claimed direction, "disagrees" when it excludes 0 the other
way, else "inconclusive". With ``seeds`` = N > 1 every arm trains N times (paired by seed:
same initialisation offset and data order) and effects are means over seeds with a t interval
on N - 1 degrees of freedom. With one seed the only interval is the paired Monte-Carlo one of
the validation masks (per-window values stored with the trials), labelled "validation noise
only": it says whether the two models differ on this validation data, not whether another
training seed would agree.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import stats
from ..eval import loop_scaling, metrics
from ..stats import Interval
from .page import Section

ATTENTION_ATTR = "loopsearch.attention."
ROLES = ("baseline", "early_looped", "late_looped", "deeper")
ZEROSHOT = {"WikiText-2": "wikitext-2/wiki.test.raw", "LAMBADA": "lambada/lambada_test.jsonl"}
PAPER_FLOP_RATIO = 3.3
RATES = (0.15, 0.5, 0.85)
MC_ONLY = "validation noise only"


# ---- which trial plays which role ------------------------------------------------------------------
def _seed(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("seed_offset", 0))


def role_trials(study: optuna.Study, spec) -> dict[str, list[FrozenTrial]]:
    """{role: the complete trials of the arm with that role, one per seed, by seed_offset} (budget
    scale 1 when a study also sweeps budgets)."""
    roles = {name: arm.role for name, arm in spec.space.arms.items() if arm.role}
    out: dict[str, dict[int, FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if t.state != TrialState.COMPLETE or a.get("arm") not in roles or "val_nll" not in a:
            continue
        if float(a.get("budget_scale", 1.0)) != 1.0:
            continue
        out.setdefault(roles[a["arm"]], {}).setdefault(_seed(t), t)
    return {role: [by_seed[k] for k in sorted(by_seed)] for role, by_seed in out.items()}


def one_per_role(trials: dict[str, list[FrozenTrial]]) -> dict[str, FrozenTrial]:
    """The seed-0 trial (the lowest seed that finished) of each role: for what needs one model
    (loop scaling, zero-shot bounds)."""
    return {role: ts[0] for role, ts in trials.items() if ts}


def has_roles(spec) -> bool:
    return any(arm.role for arm in spec.space.arms.values())


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
    return [(float(h[0]), float(h[1])) for h in t.user_attrs.get("history", [])]  # (FLOPs, val NLL, ...)


def mean_curve(ts: list[FrozenTrial]) -> list[tuple[float, float]]:
    """The learning curve averaged over seeds, validation by validation (the seeds of an arm
    validate at the same FLOPs; a shorter curve cuts the others)."""
    curves = [curve_of(t) for t in ts]
    n = min((len(c) for c in curves), default=0)
    return [(statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)) for i in range(n)]


@dataclass(frozen=True)
class Effect:
    """An interval and what it is over: 'N seeds', '1 seed, validation noise only' or '1 seed,
    no interval'."""

    interval: Interval
    basis: str

    def text(self, fmt: str = "+.4f", unit: str = " nats/token") -> str:
        """'+0.0312 [+0.0101, +0.0523] nats/token (3 seeds)': mean [95% interval] and the seeds behind it."""
        return f"{self.interval.text(fmt)}{unit} ({self.basis})"

    @property
    def verdict(self) -> str:
        """stats.verdict (effect > 0: the claim holds), with the reason when inconclusive."""
        v = stats.verdict(self.interval)
        if v != "inconclusive":
            return v
        why = "no interval" if self.interval.se is None else "the 95% interval contains 0"
        return f"inconclusive ({why})"


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def paired_effect(a: list[FrozenTrial], b: list[FrozenTrial]) -> Effect | None:
    """b - a of the final val NLL, paired by seed (same seed_offset): the mean over seeds with a t
    interval on n - 1 degrees of freedom; with one pair, the paired Monte-Carlo interval of the
    validation masks when both trials stored per-window values under the same eval_key
    (validation noise only); else no interval. None when the arms share no seed."""
    by_seed = {_seed(t): t for t in a}
    pairs = [(by_seed[_seed(t)], t) for t in b if _seed(t) in by_seed]
    if not pairs:
        return None
    diffs = [float(y.user_attrs["val_nll"]) - float(x.user_attrs["val_nll"]) for x, y in pairs]
    if len(pairs) > 1:
        return Effect(stats.mean_interval(diffs), _seeds(len(pairs)))
    mc = stats.paired_results(pairs[0][0].user_attrs, pairs[0][1].user_attrs)
    if mc is None:
        return Effect(stats.mean_interval(diffs), "1 seed, no interval")
    return Effect(Interval(diffs[0], mc.se, mc.df), f"1 seed, {MC_ONLY}")


def value_effect(ts: list[FrozenTrial]) -> Effect:
    """An arm's final val NLL: the mean over seeds with a t interval; with one seed, the
    Monte-Carlo interval of its validation masks when per-window values are stored."""
    values = [float(t.user_attrs["val_nll"]) for t in ts]
    if len(values) > 1:
        return Effect(stats.mean_interval(values), _seeds(len(values)))
    a = ts[0].user_attrs
    if a.get("val_windows") and int(a.get("val_draws") or 0) >= 2:
        mc = stats.window_interval(a["val_windows"], int(a["val_draws"]))
        return Effect(Interval(values[0], mc.se, mc.df), f"1 seed, {MC_ONLY}")
    return Effect(stats.mean_interval(values), "1 seed, no interval")


def flop_rows(trials: dict[str, list[FrozenTrial]]) -> list[dict[str, Any]]:
    """Per arm: final val NLL (mean over seeds, with its interval), its paired difference from the
    baseline (with its interval), and the FLOP ratio at which its mean learning curve reaches the
    baseline's final val NLL minus the noise (baseline FLOPs / the arm's FLOPs to get there).

    The noise is the half-width of the paired difference's 95% interval, or without one that of
    the baseline's own value; without either (one seed, no per-window values) it is None and the
    target is the bare baseline value, which ``claims`` does not accept as agreement."""
    base = trials["baseline"]
    base_value = value_effect(base)
    target0 = base_value.interval.mean
    base_flops = statistics.fmean(float(t.user_attrs["train_flops"]) for t in base)
    rows = []
    for role in ROLES:
        ts = trials.get(role)
        if not ts:
            continue
        a = ts[0].user_attrs
        value = value_effect(ts)
        if role == "baseline":
            effect, noise, target = None, base_value.interval.half_width, target0
            reach, first = base_flops, False  # the baseline defines the target
        else:
            effect = paired_effect(base, ts)
            noise = effect.interval.half_width if effect is not None else None
            noise = base_value.interval.half_width if noise is None else noise
            target = target0 - (noise or 0.0)
            reach, first = flops_to_reach(mean_curve(ts), target)
        rows.append({"role": role, "arm": a["arm"], "trials": [t.number for t in ts], "seeds": len(ts),
                     "val_nll": value.interval.mean, "value": value, "effect": effect,
                     "delta": None if effect is None else effect.interval.mean,
                     "train_flops": statistics.fmean(float(t.user_attrs["train_flops"]) for t in ts),
                     "steps": int(a["steps"]), "inference_flops_per_token": float(a["inference_flops_per_token"]),
                     "target": target, "noise": noise, "flops_to_baseline": reach, "bound": first,
                     "flop_ratio": None if reach is None or role == "baseline" else base_flops / reach})
    return rows


def scaling_rows(study: optuna.Study, t: FrozenTrial | None) -> list[dict[str, Any]]:
    if t is None:
        return []
    return [r for r in loop_scaling.stored(study).get(t.number, []) if r.get("exit", "none") == "none"]


def loop_effect(t: FrozenTrial, worse: dict[str, Any], better: dict[str, Any]) -> Effect:
    """``worse`` minus ``better`` val NLL of two loop-scaling rows of one trial (same windows and
    masks): the paired Monte-Carlo interval when both rows carry ``val_windows``, else none."""
    draws = lambda r: r.get("val_draws", t.user_attrs.get("val_draws"))  # noqa: E731
    a = {"val_windows": better.get("val_windows"), "val_draws": draws(better), "eval_key": t.number}
    b = {"val_windows": worse.get("val_windows"), "val_draws": draws(worse), "eval_key": t.number}
    diff = float(worse["val_nll"]) - float(better["val_nll"])
    mc = stats.paired_results(a, b)
    if mc is None:
        return Effect(Interval(diff, None), "1 seed, no interval")
    return Effect(Interval(diff, mc.se, mc.df), f"1 seed, {MC_ONLY}")


def attention_change(study: optuna.Study, t: FrozenTrial | None) -> dict[str, float] | None:
    """Attention shares in the looped block, first vs last loop iteration, means over the
    block's layers and the mask rates: mask->mask (``first``, ``last``: mass on other masked
    keys), self (``self_first``, ``self_last``: on the query's own position) and the uniform
    reference (the masked share of the other keys)."""
    if t is None:
        return None
    rows = study.user_attrs.get(f"{ATTENTION_ATTR}{t.number}")
    start, end = int(t.user_attrs["loop_start"]), int(t.user_attrs["loop_end"])
    block = [r for r in rows or [] if start <= r["layer"] < end and r["mask_to_mask"] is not None
             and not math.isnan(r["mask_to_mask"])]
    if not block:
        return None
    last = max(r["loop"] for r in block)
    mean = lambda rs, key: statistics.fmean(r[key] for r in rs) if all(key in r for r in rs) else math.nan  # noqa: E731
    first_rows = [r for r in block if r["loop"] == 1]
    last_rows = [r for r in block if r["loop"] == last]
    return {"first": mean(first_rows, "mask_to_mask"), "last": mean(last_rows, "mask_to_mask"),
            "self_first": mean(first_rows, "self"), "self_last": mean(last_rows, "self"),
            "uniform": mean(block, "masked_key_fraction"), "loops": last}


def zeroshot_rows(study: optuna.Study, trials: dict[str, FrozenTrial]) -> list[dict[str, Any]]:
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
def flop_claim(rows: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(measured, verdict) of claim 1: 'agrees' only when the early-middle arm's mean curve reaches
    the baseline's final val NLL minus the noise with fewer FLOPs (ratio > 1); 'disagrees' when
    the interval of its final difference lies above 0; else 'inconclusive'."""
    early, base = rows["early_looped"], rows["baseline"]
    effect, ratio, noise = early["effect"], early["flop_ratio"], early["noise"]
    final = f"final Δ {effect.text()}" if effect else f"final {early['val_nll']:.4f}"
    if noise is None:
        measured = f"no noise estimate to set the target by (one seed, no per-window validation values); {final}"
    elif ratio is None:
        measured = (f"never reached the baseline's {base['val_nll']:.4f} minus the noise {noise:.4f} "
                    f"(= {early['target']:.4f}); {final}")
    else:
        measured = (f"reached the baseline's {base['val_nll']:.4f} minus the noise {noise:.4f} "
                    f"(= {early['target']:.4f}) after {early['flops_to_baseline']:.3g} of {base['train_flops']:.3g} "
                    f"FLOPs: {ratio:.2f}x fewer"
                    + (" (at its first validation: an upper bound on its FLOPs)" if early["bound"] else "")
                    + f"; {final}")
    if noise is not None and ratio is not None and ratio > 1.0:
        return measured, "agrees"
    if effect is not None and effect.interval.se is not None and effect.interval.lo > 0:
        return measured, "disagrees"
    if noise is None or effect is None or effect.interval.se is None:
        return measured, "inconclusive (no interval)"
    return measured, "inconclusive (target not reached with fewer FLOPs; the final Δ's 95% interval contains 0)"


def claims(study: optuna.Study, trials: dict[str, list[FrozenTrial]]) -> list[dict[str, str]]:
    """One row per claim: the paper's words, the measurement (mean [95% interval] and the seeds
    behind it) and agrees / disagrees / inconclusive."""
    rows = {r["role"]: r for r in flop_rows(trials)} if trials.get("baseline") else {}
    early, late, deeper = rows.get("early_looped"), rows.get("late_looped"), rows.get("deeper")
    out = []
    if early:
        measured, verdict = flop_claim(rows)
        out.append({"claim": f"looping early-middle layers reaches the baseline's NLL with up to "
                             f"{PAPER_FLOP_RATIO}x fewer training FLOPs", "measured": measured, "verdict": verdict})
    if early and deeper:
        effect = paired_effect(trials["early_looped"], trials["deeper"])  # > 0: the looped model is better
        out.append({"claim": "the looped model beats a deeper non-looped model of similar per-step compute",
                    "measured": f"deeper - early-middle {effect.text()}; early-middle "
                                f"{early['val_nll']:.4f} vs deeper {deeper['val_nll']:.4f} ("
                                f"{early['inference_flops_per_token']:.3g} vs "
                                f"{deeper['inference_flops_per_token']:.3g} inference FLOPs/token)",
                    "verdict": effect.verdict})
    if early and late:
        effect = paired_effect(trials["early_looped"], trials["late_looped"])
        out.append({"claim": "early-middle layers are the place to loop (not late ones)",
                    "measured": f"late - early-middle {effect.text()}; early-middle {early['val_nll']:.4f} "
                                f"vs late {late['val_nll']:.4f}",
                    "verdict": effect.verdict})
    t = one_per_role(trials).get("early_looped")
    scaling = {r["n_loops"]: r for r in scaling_rows(study, t)}
    if scaling and early:
        trained = int(t.user_attrs["n_loops"])
        text = ", ".join(f"{n}: {r['val_nll']:.4f}" for n, r in sorted(scaling.items()))
        if 1 in scaling and trained in scaling:
            effect = loop_effect(t, scaling[1], scaling[trained])  # > 0: more loops help
            measured = f"val NLL at 1 minus at the trained {trained} loops {effect.text()}"
            verdict = effect.verdict
        else:
            measured, verdict = "", "not measured"
        beyond = [n for n in sorted(scaling) if n > trained]
        if beyond and trained in scaling:
            more = loop_effect(t, scaling[trained], scaling[beyond[-1]])  # > 0: still improves
            measured += f"; {trained} minus {beyond[-1]} loops {more.interval.text()}"
        out.append({"claim": "more loops at inference help (loop count trades compute for quality)",
                    "measured": f"{measured}; val NLL by inference loops {text}".lstrip("; "), "verdict": verdict})
    changes = [c for c in (attention_change(study, t) for t in trials.get("early_looped", [])) if c]
    if changes:
        effect = Effect(stats.mean_interval([c["last"] - c["first"] for c in changes]),
                        _seeds(len(changes)) + (", no interval" if len(changes) == 1 else ""))
        mean = lambda key: statistics.fmean(c[key] for c in changes)  # noqa: E731
        loops = changes[0]["loops"]
        out.append({"claim": "looping raises the attention masked positions pay to each other",
                    "measured": f"mask->mask share (other masked keys) in the looped block, loop 1 -> loop {loops}: "
                                f"{mean('first'):.3f} -> {mean('last'):.3f}, change {effect.text('+.3f', '')}; the "
                                f"interval is over training seeds, each seed's value the mean over t = "
                                f"{', '.join(str(r) for r in RATES)} and the block's layers (self "
                                f"{mean('self_first'):.3f} -> {mean('self_last'):.3f}, apart; uniform "
                                f"{mean('uniform'):.3f})",
                    "verdict": effect.verdict})
    return out


def sections(d, out: Path) -> list:
    """The report's "paper's claims vs measured" sections (a table each; the learning curves
    and the loop-scaling plot are the report's own sections)."""
    trials = role_trials(d.study, d.spec)
    sec = Section("claims", "LoopMDM's claims vs this study")
    if "baseline" not in trials:
        sec.note = "No data: the baseline arm has not finished (run `loopsearch repro` or `loopsearch study run`)."
        return [sec]
    seeds = max(len(ts) for ts in trials.values())
    sec.caption = ("Each claim of LoopMDM (arXiv 2605.26106) beside what this study measured, at "
                   f"{float(trials['baseline'][0].user_attrs['budget']):.3g} training FLOPs per arm, {_seeds(seeds)} "
                   "per arm. At small budgets the answer can be the opposite of the paper's: a looped model gets "
                   "fewer optimizer steps for the same FLOPs (see a budget sweep, `loopsearch sweep`). Effects are "
                   "printed as mean [95% interval]: Student's t over seeds (n - 1 degrees of freedom), paired by "
                   "seed; with one seed, the paired interval of the validation masks (validation noise only, not "
                   "seed-to-seed variation). A claim agrees only when the interval of its effect excludes 0 in the "
                   "claimed direction (the FLOP ratio: when the arm reaches the baseline's NLL minus that noise); "
                   "otherwise it disagrees (excluded the other way) or is inconclusive.")
    sec.headers = ["claim (paper)", "measured here", "verdict"]
    sec.rows = [[c["claim"], c["measured"], c["verdict"]] for c in claims(d.study, trials)]
    flops = Section("flop_ratio", "Matched-FLOP arms")
    flops.caption = ("Final val NLL (nats/token) of each arm at the same training FLOPs, as the mean over seeds "
                     "[95% interval], its paired difference from the baseline [95% interval], and the FLOP ratio at "
                     "which its mean learning curve reaches the baseline's final val NLL minus the noise (the "
                     "half-width of the difference's interval; > 1: fewer FLOPs than the baseline).")
    flops.headers = ["arm", "role", "seeds", "trials", "steps", "val NLL [95%]", "Δ baseline [95%]",
                     "inference FLOPs/token", "target", "FLOPs to target", "FLOP ratio"]
    flops.rows = [[r["arm"], r["role"], str(r["seeds"]), ",".join(str(n) for n in r["trials"]), str(r["steps"]),
                   r["value"].interval.text(".4f"), "" if r["effect"] is None else r["effect"].interval.text(),
                   f"{r['inference_flops_per_token']:.3g}", f"{r['target']:.4f}",
                   "not reached" if r["flops_to_baseline"] is None else
                   f"{'≤ ' if r['bound'] else ''}{r['flops_to_baseline']:.3g}"
                   + (" (target)" if r["role"] == "baseline" else ""),
                   "-" if r["flop_ratio"] is None else f"{'≥ ' if r['bound'] else ''}{r['flop_ratio']:.2f}x"]
                  for r in flop_rows(trials)]
    zs = Section("zeroshot", "Zero-shot perplexity bounds")
    zrows = zeroshot_rows(d.study, one_per_role(trials))
    if zrows:
        zs.caption = ("The diffusion ELBO on other corpora, bounding perplexity from above: nats/token under the "
                      "study's tokenizer and bits/byte (comparable across tokenizers); 64 windows per corpus; the "
                      "first seed of each arm.")
        zs.headers = ["arm", "role", "corpus", "NLL ≤ (nats/token)", "perplexity ≤", "bits/byte ≤"]
        zs.rows = [[r["arm"], r["role"], r["data"], f"{r['nll']:.4f}", f"{r['perplexity']:.2f}",
                    "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"] for r in zrows]
    else:
        zs.note = "Not measured: no WikiText-2/LAMBADA files were found (run `loopsearch repro --data DIR`)."
    return [sec, flops, zs]
