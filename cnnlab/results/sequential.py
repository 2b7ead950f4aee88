"""Anytime-valid sequential comparisons of ablation variants (the engine behind `cnnlab ablate`).

An ablation compares k variants with a reference on the paired per-seed differences of test
accuracy, d_i = acc(variant, seed i) - acc(reference, seed i). Seeds arrive in rounds; after
each round every comparison is looked at and the ablation stops once every comparison is
decided. Looking after every round and stopping on what was seen ("optional stopping")
breaks the error rates of a fixed-n t-test; the tests here keep theirs.

Method: the safe t-test (Grünwald, de Heide & Koolen, "Safe testing", JRSS-B 2024;
Pérez-Ortiz, Lardy, de Heide & Grünwald, "E-statistics, group invariance and anytime-valid
testing", Annals of Statistics 2024). Against H0: mu = mu0 it uses the Bayes factor of the
t-statistic with a Gaussian prior N(0, g) on the standardized effect delta = (mu - mu0) / sigma
and the right-Haar prior 1/sigma on the scale. For n >= 2 differences with t-statistic t on
nu = n - 1 degrees of freedom it has the closed form (Gönen et al. 2005; Rouder et al. 2009,
fixed g)

    E_n = (1 + n g)^(-1/2) * [(1 + t^2/nu) / (1 + t^2/(nu (1 + n g)))]^((nu + 1)/2),

which is the ratio of the marginal density of t under the prior, the integral over delta of
nct.pdf(t, nu, delta sqrt(n)) N(delta; 0, g), to its density under H0, t.pdf(t, nu) (checked
by numerical integration in tests/test_sequential.py). The right-Haar prior on the scale makes
it the likelihood ratio of the scale-invariant part of the data, so (E_n) is a nonnegative
martingale with mean 1 under H0 (E_1 = 1: one difference's sign says nothing about a symmetric
prior), and Ville's inequality gives P_H0(E_n >= 1/alpha for some n) <= alpha, whatever rule
decides when to look and when to stop.

Confidence sequence: the values mu0 that are not rejected at look n are
{mu0 : E_n(t(mu0)) < 1/alpha} with t(mu0) = (mean - mu0) / (s / sqrt(n)). E_n increases in |t|,
so this is mean +- c_n s / sqrt(n) with E_n(c_n) = 1/alpha. Solving that equation gives
c_n in closed form (see `cs_radius`). As |t| -> infinity E_n tends to (1 + n g)^((n-1)/2); while
that is below 1/alpha no mu0 can be rejected and the interval is the whole line (too few seeds
to decide anything). The coverage holds at all n at once, so the running intersection of the
intervals over the looks is a confidence sequence too; it is the reported interval.

Decisions for one comparison with margin M > 0 at level alpha_k: "better"/"worse" when the
interval lies above/below 0, else "equivalent" when it lies inside (-M, +M), else "undecided".
"Different" wins when both hold (a significant effect smaller than the margin is reported as
significant; the interval shows that it is small). The state is frozen at the first decision;
the interval keeps narrowing with more seeds. Each wrong decision needs the interval to miss
the true mean difference at some look (a "better" when mu <= 0, an "equivalent" when |mu| >= M),
which has probability <= alpha_k.

Family-wise error: Bonferroni, alpha_k = alpha / k for k comparisons. The comparisons share the
reference's runs and so are dependent; a union bound holds under any dependence, and because
each comparison's guarantee is already uniform over time, the union bound holds uniformly over
time as well, so optional stopping of the whole ablation keeps family-wise error <= alpha.

Assumptions: the differences of one comparison are independent draws from a normal distribution
(seeds independent; the guarantee is exact only then). Heavy symmetric tails and rounding
(accuracy on a finite test set) did not hurt in simulation; skew does: centred Exp(1)
differences, looked at every 2 seeds up to 30, were called "different" 8.9% of the time at
alpha = 0.05. A diverged run (one seed far below the rest) is such skew: look at it, do not
leave it in silently. Which seeds enter must not depend on their results.

Pure numerics: numpy and scipy only, no cnnlab imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

DEFAULT_G = 1.0
STATES = ("better", "worse", "equivalent", "undecided")
UNDECIDED = "undecided"

__all__ = [
    "DEFAULT_G",
    "STATES",
    "Ablation",
    "Look",
    "SequentialComparison",
    "cs_radius",
    "e_value",
    "e_value_sup",
    "fixed_n_for_power",
    "log_e_value",
    "look_schedule",
    "min_seeds",
    "run_paths",
    "simulate",
]


# --------------------------------------------------------------------------- validation


def _check_alpha(alpha: float, what: str = "alpha") -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{what} = {alpha!r}: must be a number in (0, 0.5)") from None
    if not 0.0 < a < 0.5:
        raise ValueError(f"{what} = {alpha!r}: must be in (0, 0.5)")
    return a


def _check_positive(value: float, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} = {value!r}: must be a finite number > 0") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} = {value!r}: must be a finite number > 0")
    return v


def _check_n(n: int, what: str = "n") -> int:
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"{what} = {n!r}: must be an integer >= 2 (the t-statistic needs two differences)")
    return int(n)


# --------------------------------------------------------------------------- e-values


def log_e_value(t: float | np.ndarray, n: int | np.ndarray, g: float = DEFAULT_G) -> np.ndarray:
    """Natural log of `e_value`; finite for every t (|t| = inf gives the supremum over t)."""
    g = _check_positive(g, "g")
    t = np.asarray(t, dtype=float)
    n_arr = np.asarray(n)
    if n_arr.size and (np.any(n_arr < 2) or np.any(n_arr != np.round(n_arr))):
        raise ValueError(f"n = {n!r}: every n must be an integer >= 2 (the t-statistic needs two differences)")
    n_arr = n_arr.astype(float)
    nu = n_arr - 1.0
    log_r = np.log1p(n_arr * g)  # log(1 + n g)
    t2 = t * t
    with np.errstate(over="ignore", invalid="ignore"):
        body = np.log1p(t2 / nu) - np.log1p(t2 / (nu * np.exp(log_r)))
    body = np.where(np.isinf(t2), log_r, body)  # limit |t| -> inf: log(1 + n g)
    out = -0.5 * log_r + 0.5 * (nu + 1.0) * body
    return out


def e_value(t: float | np.ndarray, n: int | np.ndarray, g: float = DEFAULT_G) -> float | np.ndarray:
    """The safe t-test e-value E_n of a t-statistic `t` from `n` >= 2 paired differences.

    E_n = (1 + n g)^(-1/2) [(1 + t^2/nu) / (1 + t^2/(nu (1 + n g)))]^((nu+1)/2), nu = n - 1:
    the Bayes factor of t with prior N(0, g) on the standardized effect and 1/sigma on the
    scale (Grünwald et al. 2024; Pérez-Ortiz et al. 2024). Broadcasts over `t` and `n`; returns a
    float for scalar inputs. Rejecting H0 once E_n >= 1/alpha, at any look, has type-I error <= alpha.
    """
    out = np.exp(log_e_value(t, n, g))
    return float(out) if out.ndim == 0 else out


def e_value_sup(n: int, g: float = DEFAULT_G) -> float:
    """sup over t of E_n, reached as |t| -> inf: (1 + n g)^((n-1)/2)."""
    n = _check_n(n)
    g = _check_positive(g, "g")
    return math.exp(0.5 * (n - 1) * math.log1p(n * g))


@lru_cache(maxsize=4096)
def _cs_radius(n: int, alpha: float, g: float) -> float:
    nu = n - 1
    log_r = math.log1p(n * g)
    # E_n(c) = 1/alpha  <=>  (1 + x) / (1 + x/r) = K,  x = c^2/nu,  r = 1 + n g,
    # K = (sqrt(r)/alpha)^(2/(nu+1)); solution x = (K - 1) / (1 - K/r), which needs K < r,
    # i.e. sup_t E_n = r^(nu/2) > 1/alpha.
    log_k = (2.0 / (nu + 1)) * (0.5 * log_r - math.log(alpha))
    if log_k >= log_r:
        return math.inf
    x = math.expm1(log_k) / -math.expm1(log_k - log_r)
    return math.sqrt(nu * x)


def cs_radius(n: int, alpha: float, g: float = DEFAULT_G) -> float:
    """c_n with E_n(c_n) = 1/alpha: the confidence sequence at look n is mean +- c_n s / sqrt(n).

    Closed form (no root finding; tests check it against brentq). `math.inf` when no t reaches
    1/alpha, i.e. (1 + n g)^((n-1)/2) <= 1/alpha: with so few differences nothing can be decided.
    Cached.
    """
    n = _check_n(n)
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha = {alpha!r}: must be in (0, 1)")
    return _cs_radius(n, a, _check_positive(g, "g"))


def min_seeds(alpha: float, g: float = DEFAULT_G) -> int:
    """Smallest n at which the interval can be finite (so that any decision is possible) at level alpha.

    For an `Ablation` of k comparisons pass alpha / k. With g = 1: 5 seeds at alpha = 0.05,
    6 at 0.025, 0.0167 and 0.01, 7 at 0.005.
    """
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha = {alpha!r}: must be in (0, 1)")
    g = _check_positive(g, "g")
    n = 2
    while math.isinf(_cs_radius(n, a, g)):
        n += 1
    return n


# --------------------------------------------------------------------------- one comparison


@dataclass(frozen=True)
class Look:
    """One look at one comparison, after `seeds` paired differences.

    `low`, `high`: the running intersection of the confidence intervals of all looks so far
    (the reported interval for the mean difference); `look_low`, `look_high`: this look's own.
    `e_value`: E_n against mu0 = 0 at this look. `state`: "better", "worse", "equivalent" or
    "undecided", frozen at the first decision. `conflict`: this look's interval missed the
    running intersection (possible only after the interval already missed the true mean, an
    event of probability <= alpha); the intersection then restarts from this look's interval.
    """

    seeds: int
    mean: float
    sd: float
    low: float
    high: float
    e_value: float
    state: str
    radius: float
    look_low: float
    look_high: float
    conflict: bool = False

    @property
    def decided(self) -> bool:
        return self.state != UNDECIDED


def _decide(low: float, high: float, margin: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if -margin < low and high < margin:
        return "equivalent"
    return UNDECIDED


def _as_differences(differences: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(differences, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name}: differences must be a flat sequence of numbers, got shape {x.shape}")
    if x.size < 2:
        raise ValueError(f"{name}: {x.size} difference(s) at a look; a look needs at least 2 paired differences")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{name}: difference #{bad[0]} is {float(x[bad[0]])!r}; differences must be finite numbers")
    return x


class SequentialComparison:
    """One variant vs the reference, looked at after every round of seeds.

    `update` takes ALL paired differences so far (the caller re-reads them each round): the first
    n_prev must be the ones of the previous look (in any order), new seeds come after them. A
    look with no new differences returns the previous `Look` unchanged, so re-running a round is
    harmless. The state depends on the data and on the sizes of the looks, nothing else: persist
    `look_sizes` with the run and rebuild with `replay` after a restart.
    """

    def __init__(self, name: str, alpha: float, margin: float, g: float = DEFAULT_G):
        self.name = str(name)
        self.alpha = _check_alpha(alpha)
        self.margin = _check_positive(margin, "margin")
        self.g = _check_positive(g, "g")
        self.history: list[Look] = []
        self._data = np.empty(0)
        self._low = -math.inf
        self._high = math.inf
        self._state = UNDECIDED
        self.decided_at: int | None = None  # seeds at the first decision

    @property
    def state(self) -> str:
        return self._state

    @property
    def decided(self) -> bool:
        return self._state != UNDECIDED

    @property
    def look_sizes(self) -> list[int]:
        return [look.seeds for look in self.history]

    def update(self, differences: Sequence[float]) -> Look:
        """Look at all `differences` so far (>= 2) and return the new `Look`."""
        x = _as_differences(differences, self.name)
        n = x.size
        if self.history:
            n_prev = self.history[-1].seeds
            if n < n_prev:
                raise ValueError(f"{self.name}: {n} differences, fewer than the {n_prev} of the previous look; "
                                 "differences can only be added")
            old, new = np.sort(self._data), np.sort(x[:n_prev])
            if not np.allclose(old, new, rtol=1e-9, atol=1e-12):
                raise ValueError(f"{self.name}: the first {n_prev} differences are not those of the previous look; "
                                 "pass them in the same order, new seeds at the end")
            if n == n_prev:
                return self.history[-1]
        self._data = x.copy()

        mean = float(np.mean(x))
        sd = float(np.std(x, ddof=1))
        radius = cs_radius(n, self.alpha, self.g)
        if math.isinf(radius):
            half = math.inf
        else:
            half = radius * sd / math.sqrt(n)
        look_low, look_high = mean - half, mean + half
        low, high = max(self._low, look_low), min(self._high, look_high)
        conflict = low > high
        if conflict:
            low, high = look_low, look_high
        self._low, self._high = low, high
        if self._state == UNDECIDED:
            self._state = _decide(low, high, self.margin)
            if self._state != UNDECIDED:
                self.decided_at = n
        if sd > 0:
            t = mean / (sd / math.sqrt(n))
        else:
            t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        look = Look(seeds=n, mean=mean, sd=sd, low=low, high=high, e_value=float(e_value(t, n, self.g)),
                    state=self._state, radius=radius, look_low=look_low, look_high=look_high, conflict=conflict)
        self.history.append(look)
        return look

    @classmethod
    def replay(cls, differences: Sequence[float], look_sizes: Sequence[int], name: str, alpha: float,
               margin: float, g: float = DEFAULT_G) -> SequentialComparison:
        """Rebuild a comparison from its stored differences and the sizes of its past looks, in order."""
        x = np.asarray(differences, dtype=float)
        sizes = [int(m) for m in look_sizes]
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"{name}: look_sizes = {list(look_sizes)!r} must be strictly increasing")
        if sizes and sizes[-1] > x.size:
            raise ValueError(f"{name}: look_sizes = {list(look_sizes)!r} goes beyond the {x.size} differences given")
        comparison = cls(name, alpha, margin, g)
        for m in sizes:
            comparison.update(x[:m])
        return comparison

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else None
        where = f", n={last.seeds}, [{last.low:.4g}, {last.high:.4g}]" if last else ""
        return f"SequentialComparison({self.name!r}, {self._state}{where})"


# --------------------------------------------------------------------------- an ablation


class Ablation:
    """k comparisons, each at alpha / k (Bonferroni), so family-wise error <= alpha under optional stopping."""

    def __init__(self, comparisons: Sequence[str], alpha: float, margin: float, g: float = DEFAULT_G):
        names = [str(c) for c in comparisons]
        if not names:
            raise ValueError("comparisons = []: an ablation needs at least one comparison")
        duplicates = sorted({c for c in names if names.count(c) > 1})
        if duplicates:
            raise ValueError(f"comparisons = {names!r}: names must be unique, repeated: {duplicates}")
        self.alpha = _check_alpha(alpha)
        self.margin = _check_positive(margin, "margin")
        self.g = _check_positive(g, "g")
        self.alpha_each = self.alpha / len(names)
        self.comparisons: dict[str, SequentialComparison] = {
            c: SequentialComparison(c, self.alpha_each, self.margin, self.g) for c in names}

    @property
    def k(self) -> int:
        return len(self.comparisons)

    def update(self, diffs_by_comparison: Mapping[str, Sequence[float]]) -> dict[str, Look]:
        """Look at every comparison; `diffs_by_comparison` maps each name to all its differences so far."""
        given, expected = set(diffs_by_comparison), set(self.comparisons)
        if given != expected:
            raise ValueError(f"differences given for {sorted(given)!r}; expected exactly {sorted(expected)!r} "
                             f"(missing {sorted(expected - given)!r}, unknown {sorted(given - expected)!r})")
        return {c: comp.update(diffs_by_comparison[c]) for c, comp in self.comparisons.items()}

    @property
    def done(self) -> bool:
        """True once every comparison is decided."""
        return all(comp.decided for comp in self.comparisons.values())

    @property
    def states(self) -> dict[str, str]:
        return {c: comp.state for c, comp in self.comparisons.items()}

    @property
    def look_sizes(self) -> dict[str, list[int]]:
        return {c: comp.look_sizes for c, comp in self.comparisons.items()}

    def min_seeds(self) -> int:
        """Seeds below which no comparison can be decided (the interval is the whole line)."""
        return min_seeds(self.alpha_each, self.g)

    @classmethod
    def replay(cls, diffs_by_comparison: Mapping[str, Sequence[float]],
               look_sizes_by_comparison: Mapping[str, Sequence[int]], alpha: float, margin: float,
               g: float = DEFAULT_G) -> Ablation:
        """Rebuild an ablation from stored differences and each comparison's look sizes."""
        ablation = cls(list(look_sizes_by_comparison), alpha, margin, g)
        if set(diffs_by_comparison) != set(ablation.comparisons):
            raise ValueError(f"differences given for {sorted(diffs_by_comparison)!r}; "
                             f"expected {sorted(ablation.comparisons)!r}")
        for c in ablation.comparisons:
            ablation.comparisons[c] = SequentialComparison.replay(
                diffs_by_comparison[c], look_sizes_by_comparison[c], c, ablation.alpha_each, margin, g)
        return ablation

    def error_rate_text(self) -> str:
        """One sentence for a paper's methods section."""
        k = self.k
        plural = "comparison" if k == 1 else "comparisons"
        bonferroni = "" if k == 1 else f" (Bonferroni, {self.alpha_each:.3g} each)"
        return (f"anytime-valid safe t-test confidence sequences (Grünwald et al. 2024; Pérez-Ortiz et al. 2024; "
                f"prior N(0, {self.g:g}) on the standardized effect) on the paired per-seed differences, "
                f"family-wise error <= {self.alpha:g} over {k} {plural}{bonferroni}, "
                f"under optional stopping after every round; equivalence margin ±{self.margin:g}")


# --------------------------------------------------------------------------- power and simulation


def fixed_n_for_power(effect_sd: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 1_000_000) -> int:
    """Smallest n for which the two-sided fixed-n paired t-test at level `alpha` has `power`
    against a mean difference of `effect_sd` standard deviations (noncentral t, scipy.stats.nct)."""
    effect = abs(float(effect_sd))
    if not (math.isfinite(effect) and effect > 0):
        raise ValueError(f"effect_sd = {effect_sd!r}: must be a finite nonzero number")
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha = {alpha!r}: must be in (0, 1)")
    p = float(power)
    if not a < p < 1.0:
        raise ValueError(f"power = {power!r}: must be in (alpha, 1)")

    def pw(n: int) -> float:
        nu = n - 1
        tc = stats.t.ppf(1 - a / 2, nu)
        nc = effect * math.sqrt(n)
        return float(stats.nct.sf(tc, nu, nc) + stats.nct.cdf(-tc, nu, nc))

    if pw(2) >= p:
        return 2
    lo, hi = 2, 4
    while pw(hi) < p:
        lo, hi = hi, hi * 2
        if hi > max_n:
            raise ValueError(f"power = {power!r} at effect_sd = {effect_sd!r} needs more than {max_n} seeds")
    while hi - lo > 1:  # pw(lo) < p <= pw(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pw(mid) >= p else (mid, hi)
    return hi


def look_schedule(max_seeds: int, round_size: int) -> list[int]:
    """Look sizes round_size, 2 round_size, ... (those >= 2), ending at max_seeds."""
    max_seeds = _check_n(max_seeds, "max_seeds")
    if isinstance(round_size, bool) or int(round_size) != round_size or round_size < 1:
        raise ValueError(f"round_size = {round_size!r}: must be an integer >= 1")
    sizes = [m for m in range(int(round_size), max_seeds + 1, int(round_size)) if m >= 2]
    if not sizes or sizes[-1] != max_seeds:
        sizes.append(max_seeds)
    return sizes


def run_paths(x: np.ndarray, look_sizes: Sequence[int], alpha: float, margin: float,
              g: float = DEFAULT_G) -> tuple[np.ndarray, np.ndarray]:
    """Sequential decisions for many paths at once: the same rule as `SequentialComparison`.

    `x`: (paths, seeds) paired differences. Returns (state index into `STATES`, seeds used), where
    seeds used is the look size at the first decision, or the last look's size when undecided.
    """
    x = np.asarray(x, dtype=float)
    sizes = list(look_sizes)
    lows, highs = [], []
    for m in sizes:
        xm = x[:, :m]
        mean = xm.mean(axis=1)
        sd = xm.std(axis=1, ddof=1)
        radius = cs_radius(m, alpha, g)
        half = np.full_like(mean, math.inf) if math.isinf(radius) else radius * sd / math.sqrt(m)
        lows.append(mean - half)
        highs.append(mean + half)
    # Running intersection. When it becomes empty a decision has already been made at or before
    # that look (see `Look.conflict`), so the first decisions equal those of `SequentialComparison`.
    low = np.maximum.accumulate(np.stack(lows, axis=1), axis=1)
    high = np.minimum.accumulate(np.stack(highs, axis=1), axis=1)
    better = low > 0
    worse = high < 0
    equivalent = (low > -margin) & (high < margin) & ~better & ~worse
    decided = better | worse | equivalent
    any_decided = decided.any(axis=1)
    first = np.where(any_decided, decided.argmax(axis=1), len(sizes) - 1)
    rows = np.arange(x.shape[0])
    state = np.full(x.shape[0], STATES.index(UNDECIDED))
    for i, mask in enumerate((better, worse, equivalent)):
        state = np.where(any_decided & mask[rows, first], i, state)
    seeds = np.asarray(sizes)[first]
    return state, seeds


def simulate(true_diff_sd: float, n_sims: int = 2000, max_seeds: int = 30, round_size: int = 2,
             alpha: float = 0.05, margin_sd: float = 0.25, g: float = DEFAULT_G, seed: int = 0) -> dict:
    """Simulate `n_sims` sequential ablations with one comparison, paired differences N(true_diff_sd, 1).

    Looks after every `round_size` seeds (from 2 on) up to `max_seeds`. Returns the rate of each
    final state ("rate_better", "rate_worse", "rate_equivalent", "rate_undecided", and
    "rate_different" = better + worse), the number of seeds used (at the first decision, or
    `max_seeds` when undecided): "seeds_mean", "seeds_median", "seeds_p90", and the settings.
    """
    n_sims = int(n_sims)
    if n_sims < 1:
        raise ValueError(f"n_sims = {n_sims!r}: must be >= 1")
    alpha = _check_alpha(alpha)
    margin = _check_positive(margin_sd, "margin_sd")
    sizes = look_schedule(max_seeds, round_size)
    rng = np.random.default_rng(seed)
    x = rng.normal(float(true_diff_sd), 1.0, size=(n_sims, sizes[-1]))
    state, seeds = run_paths(x, sizes, alpha, margin, g)
    rates = {f"rate_{s}": float(np.mean(state == i)) for i, s in enumerate(STATES)}
    rates["rate_different"] = rates["rate_better"] + rates["rate_worse"]
    return {
        **rates,
        "seeds_mean": float(np.mean(seeds)),
        "seeds_median": float(np.median(seeds)),
        "seeds_p90": float(np.quantile(seeds, 0.9)),
        "n_sims": n_sims,
        "true_diff_sd": float(true_diff_sd),
        "margin_sd": margin,
        "alpha": alpha,
        "g": float(g),
        "look_sizes": sizes,
    }
