"""How sure a number is: intervals, paired differences and the verdicts built on them.

Every figure loopsearch prints that compares two things goes through here, so one set of rules
decides what counts as a difference:

* An **interval** is a mean, its standard error and the degrees of freedom of that error; its
  95% bounds use Student's t with those degrees of freedom (the normal quantile when the error
  is known to many degrees of freedom). Over seeds, n values give n - 1 degrees of freedom:
  with 2 seeds the 97.5% quantile is 12.7, not 2.
* A difference whose interval contains 0 is a **tie**, said in words.
* A **verdict** on a claim ("agrees" / "disagrees" / "inconclusive") needs the interval of the
  effect to exclude 0; its side says which.
* **Paired validation differences** (two models scored on the same windows and masks): the
  validation estimator (loopsearch/diffusion.py: ``validation_elbo``) draws ``R`` independent
  masks per window, so the Monte-Carlo variance of a mean over windows is estimated, given the
  windows, from the spread between a window's draws.

Nothing here knows about Optuna, models or files: plain floats in, plain floats out.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

LEVEL = 0.95


def t_quantile(p: float, df: float | None) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (the normal's when df is None
    or infinite)."""
    from scipy import stats as st

    if df is None or math.isinf(df):
        return float(st.norm.ppf(p))
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(st.t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """mean +- t(df) * se at ``level``. ``se`` None: a single value, no interval."""

    mean: float
    se: float | None
    df: float | None = None  # None: normal quantile
    n: int = 1  # values (seeds) behind the mean
    level: float = LEVEL

    @property
    def half_width(self) -> float | None:
        if self.se is None:
            return None
        return t_quantile(0.5 + self.level / 2, self.df) * self.se

    @property
    def lo(self) -> float | None:
        h = self.half_width
        return None if h is None else self.mean - h

    @property
    def hi(self) -> float | None:
        h = self.half_width
        return None if h is None else self.mean + h

    @property
    def tie(self) -> bool | None:
        """True when the interval contains 0; None without an interval."""
        if self.se is None:
            return None
        return self.lo <= 0.0 <= self.hi

    def text(self, fmt: str = "+.4f") -> str:
        """'+0.0312 [+0.0101, +0.0523]' (or the bare mean without an interval)."""
        if self.se is None:
            return f"{self.mean:{fmt}}"
        return f"{self.mean:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"

    def as_dict(self, prefix: str) -> dict[str, float | bool | None]:
        return {prefix: self.mean, f"{prefix}_se": self.se, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of independent values (seeds) with a t interval on n - 1 degrees of freedom."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, None, None, 1, level)
    return Interval(mean, statistics.stdev(values) / math.sqrt(n), n - 1, n, level)


def window_interval(values: Sequence[float], draws: int, level: float = LEVEL) -> Interval:
    """The validation estimate and its Monte-Carlo standard error from per-(window, draw) values
    (flattened window-major: index w * draws + r, draws independent given the window).

    Var(mean) = sum_w s_w^2 / draws / W^2, with s_w^2 the sample variance of window w's draws:
    the noise of the masks and mask rates, given the validation windows. Degrees of freedom:
    W * (draws - 1)."""
    if draws < 2:
        raise ValueError(f"a standard error needs >= 2 mask draws per window, got {draws}")
    if len(values) % draws:
        raise ValueError(f"{len(values)} values do not split into windows of {draws} draws")
    w = len(values) // draws
    if w == 0:
        raise ValueError("no windows")
    rows = [values[i * draws:(i + 1) * draws] for i in range(w)]
    mean = statistics.fmean(values)
    var = sum(statistics.variance(r) for r in rows) / draws / w ** 2
    return Interval(mean, math.sqrt(var), w * (draws - 1), 1, level)


def paired_window_interval(a: Sequence[float], b: Sequence[float], draws: int, level: float = LEVEL) -> Interval:
    """b - a scored on identical windows and masks (per-(window, draw) values of both models):
    the mean difference and its Monte-Carlo standard error (see ``window_interval``)."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length ({len(a)} vs {len(b)}): not the same windows")
    return window_interval([y - x for x, y in zip(a, b)], draws, level)


def paired_results(a: Mapping[str, Any], b: Mapping[str, Any], level: float = LEVEL) -> Interval | None:
    """b - a from two stored results' per-(window, draw) values (keys ``val_windows``,
    ``val_draws``, ``eval_key``): the paired Monte-Carlo interval when both were scored on the same
    windows and masks (equal eval_key and draws, >= 2 draws, equal lengths); else None."""
    wa, wb, draws = a.get("val_windows"), b.get("val_windows"), a.get("val_draws")
    if not wa or not wb or draws is None or int(draws) < 2 or draws != b.get("val_draws"):
        return None
    if a.get("eval_key") is None or a.get("eval_key") != b.get("eval_key") or len(wa) != len(wb):
        return None
    return paired_window_interval(wa, wb, int(draws), level)


def proportion_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n (e.g. task accuracy): sensible at 0 and n,
    where the normal interval collapses to a point."""
    if n <= 0:
        raise ValueError(f"no trials (n = {n})")
    z = t_quantile(0.5 + level / 2, None)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(effect: Interval) -> str:
    """A claim whose effect is > 0 when the claim holds: 'agrees' when the interval lies above 0,
    'disagrees' when below, else 'inconclusive'. Without an interval: 'inconclusive'."""
    if effect.se is None:
        return "inconclusive"
    if effect.lo > 0:
        return "agrees"
    if effect.hi < 0:
        return "disagrees"
    return "inconclusive"


def tie_words(delta: Interval, better: str = "better", worse: str = "worse") -> str:
    """'tie' when the interval of a difference (< 0: better) contains 0, else better/worse;
    '' without an interval."""
    if delta.se is None:
        return ""
    if delta.tie:
        return "tie"
    return better if delta.hi < 0 else worse


@dataclass(frozen=True)
class BlockedAnova:
    """Do k arms differ beyond noise, when each was measured once per block (seed)? The two-way
    analysis of variance without replication: arms x blocks, the block (seed) effect removed, as
    a paired comparison removes it from two arms.

    ``f`` = MS_arms / MS_residual on (``df_arms``, ``df_residual``) degrees of freedom; ``p`` its
    upper tail (the chance of an F this large when every arm has the same mean). ``residual_se``:
    the standard error of one arm's mean once the seed effect is removed, sqrt(MS_residual / n);
    ``spread``: the standard deviation of the arm means; ``snr`` = spread / residual_se =
    sqrt(f), the paired signal-to-noise (about 1 when the arms do not differ)."""

    f: float
    df_arms: int
    df_residual: int
    p: float
    spread: float
    residual_se: float

    @property
    def snr(self) -> float:
        if self.residual_se > 0:
            return self.spread / self.residual_se
        return math.inf if self.spread > 0 else math.nan

    def differ(self, alpha: float = 1 - LEVEL) -> bool:
        return self.p < alpha


def blocked_anova(rows: Sequence[Sequence[float]]) -> BlockedAnova:
    """``rows[i][j]``: arm i measured in block (seed) j, every arm in every block (a complete
    table: drop seeds some arm lacks first). Needs >= 2 arms and >= 2 blocks."""
    from scipy import stats as st

    y = [[float(v) for v in r] for r in rows]
    k = len(y)
    n = len(y[0]) if y else 0
    if k < 2 or n < 2:
        raise ValueError(f"an F test needs >= 2 arms and >= 2 seeds each, got {k} arms x {n} seeds")
    if any(len(r) != n for r in y):
        raise ValueError("every arm needs a value in every block (seed): use the seeds all arms have")
    if not all(math.isfinite(v) for r in y for v in r):
        raise ValueError("an F test needs finite values (a diverged run has none): leave that arm out")
    grand = statistics.fmean(v for r in y for v in r)
    arm = [statistics.fmean(r) for r in y]
    block = [statistics.fmean(y[i][j] for i in range(k)) for j in range(n)]
    ss_arms = n * sum((a - grand) ** 2 for a in arm)
    ss_res = sum((y[i][j] - arm[i] - block[j] + grand) ** 2 for i in range(k) for j in range(n))
    df_arms, df_res = k - 1, (k - 1) * (n - 1)
    ms_res = ss_res / df_res
    scale = max(1.0, max(abs(v) for r in y for v in r)) ** 2
    if ss_arms <= 1e-24 * scale:  # the arms' means agree (identical runs, say): nothing to detect
        f, p = 0.0, 1.0
    elif ms_res <= 1e-24 * scale:  # the arms differ by exact constants across seeds: no noise at all
        f, p = math.inf, 0.0
    else:
        f = (ss_arms / df_arms) / ms_res
        p = float(st.f.sf(f, df_arms, df_res))
    return BlockedAnova(f, df_arms, df_res, p, statistics.stdev(arm), math.sqrt(ms_res / n))
