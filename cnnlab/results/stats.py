"""Seed statistics for comparing CNN variants: small, plain functions on numbers (numpy + scipy only).

Every function takes plain sequences of floats and returns plain numbers (or a
NamedTuple of them); nothing here reads MLflow, pandas frames or tensors.
Missing values are the caller's business: a NaN (or an infinity) in the input
raises ValueError instead of being dropped silently.

Methods and where they come from:

* Student-t interval of a mean and the paired t-test: Student (1908), "The
  probable error of a mean", Biometrika 6(1):1-25.
* Welch's unequal-variance t-test with the Welch-Satterthwaite degrees of
  freedom: Welch (1947), Biometrika 34(1-2):28-35; Satterthwaite (1946),
  Biometrics Bulletin 2(6):110-114.
* Standardized paired effect d_z = mean(d) / sd(d): Cohen (1988), Statistical
  Power Analysis for the Behavioral Sciences, 2nd ed., section 2.3.5; Lakens
  (2013), Frontiers in Psychology 4:863, eq. 6.
* Sign-flip (randomization) test of paired differences: Fisher (1935), The
  Design of Experiments, section 21; Pitman (1937), JRSS Supplement 4(1):119-130.
  Monte Carlo p-values counted with the observed statistic included: Phipson &
  Smyth (2010), Stat. Appl. Genet. Mol. Biol. 9(1), article 39.
* Exact binomial interval: Clopper & Pearson (1934), Biometrika 26(4):404-413.
* Holm's step-down adjustment: Holm (1979), Scand. J. Statist. 6(2):65-70;
  adjusted p-values as in Wright (1992), Biometrics 48(4):1005-1013.
* Power of the t-test from the noncentral t distribution: Cohen (1988),
  chapter 2; Owen (1965), Technometrics 7(1):78-79.
* Percentile bootstrap of the mean: Efron & Tibshirani (1993), An Introduction
  to the Bootstrap, chapter 13.
* Probability of improvement (share of seeds on which one model beats the
  other): Bouthillier et al. (2021), "Accounting for variance in machine
  learning benchmarks", MLSys; Agarwal et al. (2021), NeurIPS, "Deep RL at the
  edge of the statistical precipice".

`compare_two` puts them together for two variants and returns a `PairResult`
whose `figures()` every renderer iterates; a new statistic is a new field and
one entry in `_FIGURES`, in this file only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
from scipy import special, stats

# Percentile bootstrap intervals of a mean undercover badly at small n. Simulated
# coverage of a nominal 95% interval (normal data): 48-50% at n=2 (in theory
# exactly 50%: the interval is [min, max] of the two values), 76% at n=3, 84% at
# n=5, 91% at n=10 (94% at n=20). Callers show a bootstrap interval only when
# n >= BOOTSTRAP_MIN_N; below it the Student-t interval is the honest one.
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 10_000
# The sign-flip test enumerates all 2^n flips up to this n (2^20 ~ 1e6 sums),
# and above it draws SIGN_FLIP_DRAWS random flips with a fixed seed.
SIGN_FLIP_EXACT_MAX_N = 20
SIGN_FLIP_DRAWS = 100_000
SIGN_FLIP_SEED = 20_240_601
# Two flipped sums closer than this share of sum(|d|) count as tied (float
# round-off in sums of accuracies is ~1e-16 of that; real gaps are >= 1e-5).
SIGN_FLIP_RTOL = 1e-9
# Power that `compare_two` plans for, and the largest seed count it searches.
TARGET_POWER = 0.8
SEEDS_MAX_N = 10_000


# --------------------------------------------------------------------- helpers


def _vector(values: Sequence[float] | np.ndarray, name: str = "values") -> np.ndarray:
    """A 1-D float array; ValueError on NaN or infinity (the caller drops missing values)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = "NaN" if np.any(np.isnan(x)) else "an infinity"
        raise ValueError(f"{name} contains {bad}; drop missing values before computing statistics")
    return x


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _sd(x: np.ndarray) -> float:
    """Sample standard deviation (ddof=1), exactly 0 when every value is equal (no round-off residue)."""
    if x.size < 2:
        return math.nan
    if np.all(x == x[0]):
        return 0.0
    return float(np.std(x, ddof=1))


def _t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t (scipy.special.stdtrit: the ufunc behind scipy.stats.t.ppf, without its overhead)."""
    return float(special.stdtrit(df, q))


def _t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic: 2 P(T <= -|t|), T ~ t(df)."""
    return float(min(1.0, 2.0 * special.stdtr(df, -abs(t))))


# -------------------------------------------------------- one- and two-sample


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean (Student 1908): mean +- t_{(1+level)/2, n-1} sd / sqrt(n).

    (NaN, NaN) when n < 2. ValueError when the values contain NaN: the caller drops them.
    """
    _check_level(level)
    x = _vector(values)
    n = x.size
    if n < 2:
        return math.nan, math.nan
    mean = float(np.mean(x))
    half = _t_quantile(0.5 + level / 2, n - 1) * _sd(x) / math.sqrt(n)
    return mean - half, mean + half


class PairedT(NamedTuple):
    """Paired t-test of d = b - a (Student 1908)."""

    n: int
    mean: float      # mean of d
    sd: float        # sd of d, ddof=1
    ci_low: float    # Student-t interval of mean(d)
    ci_high: float
    p_value: float   # two-sided
    t: float
    df: int
    d_z: float       # mean / sd (Cohen 1988, sec. 2.3.5)


def paired_t(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95) -> PairedT:
    """Paired t-test of the differences d = b - a (a[i] and b[i] come from the same seed).

    Same numbers as scipy.stats.ttest_rel(b, a) and its confidence_interval(level), except
    when sd(d) == 0, where scipy divides by zero; here, by convention:
    p = 1 if every d is 0 (no evidence of a difference) else 0 (every seed moved by the same
    nonzero amount), the interval is degenerate at the mean, t is NaN or a signed infinity.

    d_z = mean(d) / sd(d), the standardized paired effect (Cohen 1988, sec. 2.3.5; Lakens 2013,
    eq. 6): NaN when every d is 0, +inf or -inf (the sign of the mean) when sd == 0 otherwise.
    With n < 2 everything but n (and the mean, for n == 1) is NaN.
    """
    _check_level(level)
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} and {b.size}")
    d = b - a
    n = d.size
    mean = float(np.mean(d)) if n else math.nan
    if n < 2:
        return PairedT(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan, max(n - 1, 0), math.nan)
    sd = _sd(d)
    if sd == 0.0:
        if np.all(d == 0):
            return PairedT(n, 0.0, 0.0, 0.0, 0.0, 1.0, math.nan, n - 1, math.nan)
        inf = math.copysign(math.inf, mean)
        return PairedT(n, mean, 0.0, mean, mean, 0.0, inf, n - 1, inf)
    se = sd / math.sqrt(n)
    t = mean / se
    half = _t_quantile(0.5 + level / 2, n - 1) * se
    return PairedT(n, mean, sd, mean - half, mean + half, _t_two_sided_p(t, n - 1), t, n - 1, mean / sd)


class WelchT(NamedTuple):
    """Welch's unequal-variance t-test of mean(b) - mean(a) (Welch 1947)."""

    n_a: int
    n_b: int
    mean_diff: float  # mean(b) - mean(a)
    ci_low: float
    ci_high: float
    p_value: float    # two-sided
    t: float
    df: float         # Welch-Satterthwaite


def welch(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95) -> WelchT:
    """Welch's t-test for unpaired samples with unequal variances (Welch 1947; Satterthwaite 1946).

    t = (mean(b) - mean(a)) / se, se^2 = s_a^2/n_a + s_b^2/n_b,
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)); the same numbers as
    scipy.stats.ttest_ind(b, a, equal_var=False) and its confidence_interval(level).
    Needs 2 values on each side (else NaN). When both samples are constant (se == 0): p = 1 if
    the means are equal else 0, the interval is degenerate at the difference, df is NaN.
    """
    _check_level(level)
    a, b = _vector(a, "a"), _vector(b, "b")
    na, nb = a.size, b.size
    diff = float(np.mean(b) - np.mean(a)) if na and nb else math.nan
    if na < 2 or nb < 2:
        return WelchT(na, nb, diff, math.nan, math.nan, math.nan, math.nan, math.nan)
    va, vb = _sd(a) ** 2 / na, _sd(b) ** 2 / nb
    se2 = va + vb
    if se2 == 0.0:
        t = math.nan if diff == 0 else math.copysign(math.inf, diff)
        return WelchT(na, nb, diff, diff, diff, 1.0 if diff == 0 else 0.0, t, math.nan)
    df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    se = math.sqrt(se2)
    t = diff / se
    half = _t_quantile(0.5 + level / 2, df) * se
    return WelchT(na, nb, diff, diff - half, diff + half, _t_two_sided_p(t, df), t, df)


# ------------------------------------------------------------------ sign flip


class SignFlip(NamedTuple):
    """Sign-flip randomization test of paired differences (Fisher 1935; Pitman 1937)."""

    n: int
    p_value: float
    p_min: float   # smallest p this test can give for these n (and zero differences)
    method: str    # "exact" (all 2^n flips) or "monte carlo"
    flips: int     # 2^n, or the number of random flips drawn


def _signed_sums(x: np.ndarray) -> np.ndarray:
    """All 2^len(x) sums of +-x[i]."""
    sums = np.zeros(1)
    for v in x:
        sums = np.concatenate([sums + v, sums - v])
    return sums


def sign_flip(d: Sequence[float] | np.ndarray) -> SignFlip:
    """Two-sided sign-flip test of H0: the paired differences d are symmetric about 0.

    Under H0 each difference is as likely to have come with the opposite sign, so the
    reference set is the 2^n vectors (+-d_1, ..., +-d_n) (Fisher 1935, sec. 21; Pitman 1937).
    Statistic |mean|; p = share of flips whose |mean| >= the observed one, the identity flip
    included, with ties decided up to SIGN_FLIP_RTOL x sum(|d|) so that float round-off in
    the sums does not break exact ties.

    n <= SIGN_FLIP_EXACT_MAX_N: exact, all 2^n flips, enumerated as the outer sum of the
    signed sums of two halves (2 x 2^(n/2) values instead of n x 2^n).
    Larger n: SIGN_FLIP_DRAWS random flips with the fixed seed SIGN_FLIP_SEED,
    p = (1 + hits) / (1 + draws) (Phipson & Smyth 2010), so never below 1 / (1 + draws).

    p_min is the p-value of the most extreme configuration (every nonzero difference with
    the same sign): 2 / 2^(n - zeros), 1 when every difference is 0. It says how small a p
    this many seeds can give at all (0.125 with 4 seeds, 0.0625 with 5).
    """
    x = _vector(d, "d")
    n = x.size
    if n == 0:
        raise ValueError("sign_flip needs at least one difference")
    scale = float(np.sum(np.abs(x)))
    tol = SIGN_FLIP_RTOL * scale
    observed = abs(float(np.sum(x)))
    if n <= SIGN_FLIP_EXACT_MAX_N:
        half = n // 2
        sums = np.abs(_signed_sums(x[:half])[:, None] + _signed_sums(x[half:])[None, :]).ravel()
        total = sums.size
        p = np.count_nonzero(sums >= observed - tol) / total
        p_min = np.count_nonzero(sums >= scale - tol) / total
        return SignFlip(n, float(p), float(p_min), "exact", total)
    rng = np.random.default_rng(SIGN_FLIP_SEED)
    hits, chunk = 0, max(1, 2_000_000 // n)
    for start in range(0, SIGN_FLIP_DRAWS, chunk):
        m = min(chunk, SIGN_FLIP_DRAWS - start)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ x) >= observed - tol))
    p = (1 + hits) / (1 + SIGN_FLIP_DRAWS)
    zeros = int(np.count_nonzero(2 * np.abs(x) <= tol))
    p_min = min(1.0, 2.0 ** (zeros + 1 - n))
    return SignFlip(n, float(p), p_min, "monte carlo", SIGN_FLIP_DRAWS)


# --------------------------------------------------------- proportions, Holm


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (Clopper & Pearson 1934).

    low = Beta((1-level)/2; k, n-k+1) quantile (0 when k == 0),
    high = Beta((1+level)/2; k+1, n-k) quantile (1 when k == n). (NaN, NaN) when n == 0.
    """
    _check_level(level)
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k}, n={n}")
    k, n = int(k), int(n)
    if n == 0:
        return math.nan, math.nan
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979; adjusted form as in Wright 1992).

    With the m non-NaN p-values sorted, p_(1) <= ... <= p_(m):
    adjusted p_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)); monotone in p, capped at 1.
    NaNs stay NaN where they are and do not count in m. Reject H_(i) at level alpha when
    its adjusted p <= alpha: this controls the family-wise error under any dependence.
    """
    p = np.array(pvalues, dtype=float, ndmin=1)
    if p.ndim != 1:
        raise ValueError(f"pvalues: expected a 1-D sequence, got shape {p.shape}")
    present = ~np.isnan(p)
    if np.any((p[present] < 0) | (p[present] > 1)):
        raise ValueError("p-values must lie in [0, 1] (or be NaN)")
    out = p.copy()
    idx = np.flatnonzero(present)
    m = idx.size
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


# ---------------------------------------------------------------------- power


def paired_power(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level alpha with n pairs (Cohen 1988, ch. 2).

    power(n) = P(T > t_crit) + P(T < -t_crit), T ~ noncentral t(df = n - 1,
    nc = |effect| / sd * sqrt(n)), t_crit = t_{1 - alpha/2, n - 1}. (scipy's noncentral t
    returns NaN for the far tail once nc is in the tens; that tail is then taken as 0.)
    """
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = abs(effect) / sd * math.sqrt(n)
    upper = float(stats.nct.sf(crit, df, nc))
    lower = float(stats.nct.cdf(-crit, df, nc))
    return upper + (0.0 if math.isnan(lower) else lower)


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                 max_n: int = SEEDS_MAX_N) -> int | None:
    """Smallest n (>= 2) at which a two-sided paired t-test at level alpha has >= `power`
    to detect a true mean difference `effect` when the paired differences have sd `sd`
    (power from the noncentral t, see `paired_power`).

    None when the question has no answer: effect not > 0 (it is a magnitude; the test is
    two-sided), sd 0, negative, NaN or infinite (with sd 0 the t statistic is undefined),
    or when even max_n pairs do not reach the power (so None also means "more than max_n";
    `compare_two` words the two cases apart).
    Power grows with n (t_crit falls and nc grows): doubling n from 2 brackets the answer,
    a bisection finds it.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie strictly between 0 and 1, got {alpha}, {power}")
    if max_n < 2:
        raise ValueError(f"max_n must be at least 2, got {max_n}")
    if not (math.isfinite(effect) and effect > 0 and math.isfinite(sd) and sd > 0):
        return None
    low, high = 1, 2  # invariant: power(low) < target (n = 1 has no test); power(high) >= target once found
    while paired_power(high, effect, sd, alpha) < power:
        if high == max_n:
            return None
        low, high = high, min(2 * high, max_n)
    while high - low > 1:
        mid = (low + high) // 2
        if paired_power(mid, effect, sd, alpha) >= power:
            high = mid
        else:
            low = mid
    return high


# ------------------------------------------------------------------ bootstrap


def bootstrap_ci(d: Sequence[float] | np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (Efron & Tibshirani 1993, ch. 13).

    Resamples d with replacement `resamples` times (numpy Generator seeded with `seed`)
    and takes the (1-level)/2 and (1+level)/2 quantiles of the resampled means.
    (NaN, NaN) when n < 2. Undercovers at small n: show it only when n >= BOOTSTRAP_MIN_N.
    """
    _check_level(level)
    x = _vector(d, "d")
    n = x.size
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 1_000_000 // n)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        means[start:start + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def clip_unit(low: float, high: float) -> tuple[float, float, bool]:
    """Clip an accuracy interval to [0, 1] for display; the flag says whether it clipped. NaN passes through."""
    new_low, new_high = float(np.clip(low, 0.0, 1.0)), float(np.clip(high, 0.0, 1.0))
    clipped = (new_low != low and not math.isnan(low)) or (new_high != high and not math.isnan(high))
    return new_low, new_high, bool(clipped)


# ------------------------------------------------------------ two variants


@dataclass
class PairResult:
    """b against a: every number `compare_two` computed, and one-line notes.

    Differences are b - a. `n` is the number of observations the test used: shared seeds
    (paired), n_a + n_b (Welch), 0 (none). Fields that do not apply are NaN (or None, "").
    """

    a_label: str
    b_label: str
    method: str                        # "paired t-test", "Welch t-test" or "none"
    n: int
    n_a: int                           # values of a (all seeds)
    n_b: int
    n_shared: int                      # seeds a and b share
    level: float
    mean_diff: float                   # paired: mean(b - a); else mean(b) - mean(a)
    ci_low: float = math.nan           # Student-t (paired) or Welch interval of mean_diff
    ci_high: float = math.nan
    p_value: float = math.nan          # two-sided
    p_holm: float = math.nan           # filled by adjust()
    holm_m: int = 0                    # how many p-values the Holm adjustment counted
    df: float = math.nan               # n - 1 (paired) or Welch-Satterthwaite
    sd_diff: float = math.nan          # paired: sd of b - a, ddof=1
    d_z: float = math.nan              # paired: mean / sd
    sign_flip_p: float = math.nan
    sign_flip_p_min: float = math.nan
    sign_flip_method: str = ""
    sign_flip_flips: int = 0
    improved: int = 0                  # shared seeds with b > a
    ties: int = 0                      # shared seeds with b == a (counted as not improved)
    p_improve: float = math.nan        # improved / n
    p_improve_low: float = math.nan    # Clopper-Pearson
    p_improve_high: float = math.nan
    effect: float = math.nan           # mean difference the power analysis plans for
    power: float = TARGET_POWER
    seeds_needed: int | None = None    # None: undefined (sd 0) or more than SEEDS_MAX_N
    boot_low: float = math.nan         # percentile bootstrap, only when n >= BOOTSTRAP_MIN_N
    boot_high: float = math.nan
    notes: list[str] = field(default_factory=list)

    def title(self) -> str:
        """What the differences are: "b - a"."""
        return f"{self.b_label} - {self.a_label}"

    def figures(self) -> list[tuple[str, str]]:
        """(label, text) pairs in a fixed order, only those that apply to this result.

        Labels come from FIGURE_LABELS, always spelled the same and always in that order,
        so a renderer can make table columns from FIGURE_LABELS and fill what it gets.
        """
        out = []
        for label, render in _FIGURES:
            text = render(self)
            if text is not None:
                out.append((label, text))
        return out

    def as_dict(self) -> dict[str, object]:
        """Raw numbers for CSV/JSON: every field by name (NaN where not applicable), notes joined by "; "."""
        out: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["notes"] = "; ".join(self.notes)
        return out


def _diff_text(x: float) -> str:
    return f"{x:+.4f}"


def _interval_text(level: float, low: float, high: float, sign: bool = True) -> str:
    fmt = "+.4f" if sign else ".4f"
    return f"{level * 100:g}% [{low:{fmt}}, {high:{fmt}}]"


def p_text(p: float) -> str:
    """A p-value with 4 significant digits: "p = 0.09826"."""
    return f"p = {p:#.4g}"


def _effect_text(effect: float) -> str:
    return f"{effect:.3f}" if effect >= 0.001 else f"{effect:.2g}"


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _fig_test(r: PairResult) -> str:
    if r.method == "paired t-test":
        return f"paired t-test (two-sided) on {_plural(r.n, 'shared seed')}"
    if r.method == "Welch t-test":
        return f"Welch t-test (two-sided, unpaired) on {r.n_a} and {r.n_b} values"
    return "none"


def _fig_seeds_needed(r: PairResult) -> str | None:
    if r.method != "paired t-test":
        return None
    goal = f"to detect {_effect_text(r.effect)} with {r.power * 100:g}% power"
    if r.seeds_needed is not None:
        return f"about {r.seeds_needed} seeds {goal}"
    if not (r.sd_diff > 0):
        return "undefined: the paired differences do not vary"
    return f"more than {SEEDS_MAX_N:,} seeds {goal}"


def _fig_d_z(r: PairResult) -> str | None:
    if r.method != "paired t-test":
        return None
    if math.isnan(r.d_z):
        return "undefined (every difference is 0)"
    if math.isinf(r.d_z):
        return f"{'+' if r.d_z > 0 else '-'}inf (the differences do not vary)"
    return f"{r.d_z:+.3f}"


def _fig_sign_flip(r: PairResult) -> str | None:
    if math.isnan(r.sign_flip_p):
        return None
    if r.sign_flip_method == "exact":
        return (f"{p_text(r.sign_flip_p)}, exact over {r.sign_flip_flips:,} sign flips "
                f"(smallest possible p = {r.sign_flip_p_min:#.4g})")
    return f"{p_text(r.sign_flip_p)}, Monte Carlo over {r.sign_flip_flips:,} random sign flips"


def _fig_improvement(r: PairResult) -> str | None:
    if math.isnan(r.p_improve):
        return None
    if r.ties:
        ties = f"{_plural(r.ties, 'tie')} counted as not better"
    else:
        ties = "no ties"
    return (f"{r.p_improve:.2f} (better on {r.improved} of {r.n} seeds, {ties}), "
            f"{_interval_text(r.level, r.p_improve_low, r.p_improve_high, sign=False)}")


# (label, text or None when it does not apply). Add a statistic: a PairResult field and a line here.
_FIGURES: tuple[tuple[str, Callable[[PairResult], str | None]], ...] = (
    ("test", _fig_test),
    ("mean difference", lambda r: None if math.isnan(r.mean_diff) else _diff_text(r.mean_diff)),
    ("confidence interval",
     lambda r: None if math.isnan(r.ci_low) else _interval_text(r.level, r.ci_low, r.ci_high)),
    ("p-value", lambda r: None if math.isnan(r.p_value) else p_text(r.p_value)),
    ("Holm-adjusted p",
     lambda r: None if math.isnan(r.p_holm) else f"{p_text(r.p_holm)} (Holm over {_plural(r.holm_m, 'comparison')})"),
    ("degrees of freedom",
     lambda r: f"{r.df:.2f}" if r.method == "Welch t-test" and not math.isnan(r.df) else None),
    ("sd of differences", lambda r: None if math.isnan(r.sd_diff) else f"{r.sd_diff:.4f}"),
    ("effect size d_z", _fig_d_z),
    ("sign-flip test", _fig_sign_flip),
    ("probability of improvement", _fig_improvement),
    ("seeds needed", _fig_seeds_needed),
    ("bootstrap interval",
     lambda r: None if math.isnan(r.boot_low)
     else f"{_interval_text(r.level, r.boot_low, r.boot_high)} (percentile, {BOOTSTRAP_RESAMPLES:,} resamples)"),
)
FIGURE_LABELS: tuple[str, ...] = tuple(label for label, _ in _FIGURES)


def _seed_order(seeds: list[Hashable]) -> list[Hashable]:
    try:
        return sorted(seeds)  # type: ignore[type-var]
    except TypeError:
        return seeds


def compare_two(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, effect: float = 0.01,
                level: float = 0.95, a_label: str = "a", b_label: str = "b") -> PairResult:
    """Compare variant b with variant a (seed -> metric, higher is better); differences are b - a.

    * >= 2 shared seeds: paired t-test on the shared seeds (seeds of one side only are left
      out, with a note), d_z, the sign-flip test, the probability of improvement (share of
      shared seeds with b > a, ties counted as not improved; Clopper-Pearson interval), the
      seeds needed for TARGET_POWER to detect `effect` at alpha = 1 - level given the
      observed sd of the differences, and the percentile bootstrap interval when
      n >= BOOTSTRAP_MIN_N.
    * fewer shared seeds but >= 2 values on each side: Welch's t-test on all values, with
      a note (a shared seed, if there is one, is treated as independent).
    * otherwise no test, with a one-line reason.

    NaN values raise ValueError: drop failed or missing runs first.
    """
    _check_level(level)
    if not (math.isfinite(effect) and effect > 0):
        raise ValueError(f"effect must be a positive number, got {effect}")
    a_values = _vector(list(a.values()), a_label)
    b_values = _vector(list(b.values()), b_label)
    shared = _seed_order([s for s in a if s in b])
    n_shared = len(shared)
    base = {"a_label": a_label, "b_label": b_label, "n_a": a_values.size, "n_b": b_values.size,
            "n_shared": n_shared, "level": level}

    if n_shared >= 2:
        x = np.array([a[s] for s in shared], dtype=float)
        y = np.array([b[s] for s in shared], dtype=float)
        t = paired_t(x, y, level)
        d = y - x
        flip = sign_flip(d)
        improved, ties = int(np.count_nonzero(y > x)), int(np.count_nonzero(y == x))
        imp_low, imp_high = clopper_pearson(improved, t.n, level)
        boot = bootstrap_ci(d, level) if t.n >= BOOTSTRAP_MIN_N else (math.nan, math.nan)
        result = PairResult(
            **base, method="paired t-test", n=t.n, mean_diff=t.mean, ci_low=t.ci_low, ci_high=t.ci_high,
            p_value=t.p_value, df=t.df, sd_diff=t.sd, d_z=t.d_z, sign_flip_p=flip.p_value,
            sign_flip_p_min=flip.p_min, sign_flip_method=flip.method, sign_flip_flips=flip.flips,
            improved=improved, ties=ties, p_improve=improved / t.n, p_improve_low=imp_low,
            p_improve_high=imp_high, effect=effect,
            seeds_needed=seeds_needed(effect, t.sd, alpha=round(1 - level, 12), power=TARGET_POWER),
            boot_low=boot[0], boot_high=boot[1])
        only_a, only_b = a_values.size - n_shared, b_values.size - n_shared
        if only_a or only_b:
            result.notes.append(f"paired on {n_shared} shared seeds; {_plural(only_a, 'seed')} of {a_label} "
                                f"and {only_b} of {b_label} have no partner and are left out")
        if t.sd == 0:
            result.notes.append("every seed gives the same difference (sd 0): p is 1 if it is 0 and 0 otherwise, "
                                "by convention; d_z and the seeds needed are not defined")
        if flip.p_min > 1 - level:
            result.notes.append(f"with {_plural(t.n, 'seed')} the sign-flip test cannot go below "
                                f"p = {flip.p_min:#.4g}")
        return result

    if a_values.size >= 2 and b_values.size >= 2:
        w = welch(a_values, b_values, level)
        result = PairResult(**base, method="Welch t-test", n=w.n_a + w.n_b, mean_diff=w.mean_diff,
                            ci_low=w.ci_low, ci_high=w.ci_high, p_value=w.p_value, df=w.df)
        result.notes.append(f"the seeds do not pair ({a_label} and {b_label} share {_plural(n_shared, 'seed')}), "
                            "so Welch's unpaired t-test was used")
        return result

    mean_diff = float(np.mean(b_values) - np.mean(a_values)) if a_values.size and b_values.size else math.nan
    result = PairResult(**base, method="none", n=0, mean_diff=mean_diff)
    result.notes.append(f"no test: {a_label} and {b_label} share {_plural(n_shared, 'seed')} and have "
                        f"{a_values.size} and {b_values.size} values; a test needs 2 shared seeds "
                        "or 2 values on each side")
    return result


def adjust(results: list[PairResult]) -> None:
    """Fill p_holm (and holm_m) in place: Holm (1979) over the results that have a p-value; the others stay NaN."""
    present = [r for r in results if not math.isnan(r.p_value)]
    for r in results:
        r.p_holm, r.holm_m = math.nan, 0
    if not present:
        return
    for r, adjusted in zip(present, holm([r.p_value for r in present])):
        r.p_holm, r.holm_m = float(adjusted), len(present)
