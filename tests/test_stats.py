"""cnnlab.results.stats against independent computations: scipy, statsmodels, brute force, simulation.

No figure is checked against the module's own helpers. statsmodels is a test-only reference.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

from cnnlab.results.stats import (
    BOOTSTRAP_MIN_N,
    FIGURE_LABELS,
    SIGN_FLIP_DRAWS,
    PairResult,
    adjust,
    bootstrap_ci,
    clip_unit,
    clopper_pearson,
    compare_two,
    holm,
    mean_ci,
    p_text,
    paired_power,
    paired_t,
    seeds_needed,
    sign_flip,
    welch,
)

RNG_SEEDS = [0, 1, 2, 3, 4]


def _accuracies(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two variants' accuracies over n seeds: a shared seed effect plus independent noise."""
    seed_effect = rng.normal(0, 0.01, n)
    a = 0.80 + seed_effect + rng.normal(0, 0.005, n)
    b = 0.80 + shift + seed_effect + rng.normal(0, 0.005, n)
    return a, b


# ------------------------------------------------------------------ mean_ci


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_mean_ci_is_scipy_t_interval(level):
    rng = np.random.default_rng(7)
    for n in (2, 3, 5, 17):
        x = rng.normal(0.8, 0.02, n)
        expected = stats.t.interval(level, n - 1, loc=np.mean(x), scale=stats.sem(x))
        assert mean_ci(x, level) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_mean_ci_small_n_and_nan():
    assert all(math.isnan(v) for v in mean_ci([0.8]))
    assert all(math.isnan(v) for v in mean_ci([]))
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([0.8, math.nan, 0.7])
    with pytest.raises(ValueError):
        mean_ci([0.8, 0.7], level=1.5)


# ----------------------------------------------------------------- paired t


@pytest.mark.parametrize("seed", RNG_SEEDS)
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_paired_t_matches_ttest_rel(seed, level):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 25))
    a, b = _accuracies(rng, n, shift=0.003)
    ours = paired_t(a, b, level)
    ref = stats.ttest_rel(b, a)
    ci = ref.confidence_interval(level)
    d = b - a
    assert ours.n == n and ours.df == n - 1
    assert ours.mean == pytest.approx(np.mean(d), rel=1e-12)
    assert ours.sd == pytest.approx(np.std(d, ddof=1), rel=1e-12)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert ours.d_z == pytest.approx(np.mean(d) / np.std(d, ddof=1), rel=1e-12)


def test_paired_t_when_differences_do_not_vary():
    a = np.array([0.80, 0.70, 0.75])
    same = paired_t(a, a)
    assert same.p_value == 1.0 and same.sd == 0.0 and same.mean == 0.0
    assert (same.ci_low, same.ci_high) == (0.0, 0.0) and math.isnan(same.d_z)
    up = paired_t([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])    # every seed +0.5, exactly representable
    assert up.p_value == 0.0 and up.sd == 0.0 and up.d_z == math.inf and up.t == math.inf
    assert (up.ci_low, up.ci_high) == (0.5, 0.5)
    # equal differences whose numpy sd is round-off (1.4e-16), not 0: still "do not vary"
    assert np.std(np.full(3, 0.7), ddof=1) > 0
    drift = paired_t([0.0, 0.0, 0.0], [0.7, 0.7, 0.7])
    assert drift.sd == 0.0 and drift.p_value == 0.0 and drift.d_z == math.inf
    down = paired_t([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert down.d_z == -math.inf and down.p_value == 0.0
    one = paired_t([0.8], [0.9])
    assert one.n == 1 and math.isnan(one.p_value) and math.isnan(one.ci_low)
    with pytest.raises(ValueError, match="length"):
        paired_t([0.8, 0.7], [0.9])
    with pytest.raises(ValueError, match="NaN"):
        paired_t([0.8, math.nan], [0.9, 0.8])


# -------------------------------------------------------------------- Welch


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_welch_matches_scipy(seed):
    rng = np.random.default_rng(100 + seed)
    na, nb = (int(v) for v in rng.integers(2, 12, 2))
    a = rng.normal(0.80, 0.01, na)
    b = rng.normal(0.81, 0.03, nb)
    ours = welch(a, b, 0.95)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (ours.n_a, ours.n_b) == (na, nb)
    assert ours.mean_diff == pytest.approx(np.mean(b) - np.mean(a), rel=1e-12)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.df == pytest.approx(ref.df, rel=1e-10)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_welch_degenerate_and_too_small():
    flat = welch([0.5, 0.5], [0.75, 0.75])
    assert flat.p_value == 0.0 and (flat.ci_low, flat.ci_high) == (0.25, 0.25)
    equal = welch([0.5, 0.5], [0.5, 0.5, 0.5])
    assert equal.p_value == 1.0
    small = welch([0.5], [0.6, 0.7])
    assert math.isnan(small.p_value) and small.mean_diff == pytest.approx(0.15)


# ---------------------------------------------------------------- sign flip


def _scipy_sign_flip(d: np.ndarray) -> float:
    res = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
                                 permutation_type="samples", n_resamples=np.inf, alternative="two-sided")
    return float(res.pvalue)


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_sign_flip_matches_scipy_permutation_test(seed):
    # scipy's two-sided p is 2 * min(P(T* >= t), P(T* <= t)), capped at 1; ours is P(|T*| >= |t|).
    # The sign-flip null distribution is symmetric about 0 (each flip has its negation), so for t != 0
    # both equal 2 P(T* >= |t|); for t == 0 both are 1. They agree by construction, exactly.
    rng = np.random.default_rng(200 + seed)
    for n in (3, 6, 9, 12):
        d = rng.normal(0.004, 0.01, n)
        ours = sign_flip(d)
        assert ours.method == "exact" and ours.flips == 2**n
        assert ours.p_value == pytest.approx(_scipy_sign_flip(d), rel=1e-12)


def _brute_force_sign_flip(d: list[Fraction]) -> tuple[Fraction, Fraction]:
    """p and smallest p by enumerating every sign vector with exact rational arithmetic (ties exact)."""
    n = len(d)
    sums = [abs(sum(s * v for s, v in zip(signs, d))) for signs in itertools.product((1, -1), repeat=n)]
    observed, extreme = abs(sum(d)), sum(abs(v) for v in d)
    return (Fraction(sum(s >= observed for s in sums), 2**n), Fraction(sum(s >= extreme for s in sums), 2**n))


@pytest.mark.parametrize("counts", [
    [12, -3, 5, 5, -5, 7],              # ties in |d| and a tie between flipped sums
    [10, 0, 0, 4, -4, 9, 1],            # zero differences (flipping them changes nothing)
    [3, 3, 3, -3, 3],
    [1, -1, 2, -2],                     # observed mean exactly 0: p = 1
    [0, 0, 0],                          # all zero
    [25, 17, 8, 31, 2, 11, 6, 14, 9],   # all positive: the most extreme configuration
    [7],
])
def test_sign_flip_matches_brute_force_enumeration(counts):
    # accuracy differences of k/10000: float sums of these carry round-off, Fractions do not
    d = np.array(counts) / 10_000
    p, p_min = _brute_force_sign_flip([Fraction(c, 10_000) for c in counts])
    ours = sign_flip(d)
    assert ours.p_value == pytest.approx(float(p), rel=1e-12)
    assert ours.p_min == pytest.approx(float(p_min), rel=1e-12)


def test_sign_flip_smallest_p():
    assert sign_flip([0.01, 0.02, 0.03, 0.01]).p_min == 2 / 2**4          # 0.125: 4 seeds never reach 0.05
    assert sign_flip([0.01, -0.02, 0.03, 0.01, 0.02]).p_min == 2 / 2**5
    assert sign_flip([0.01, 0.0, 0.03, 0.01, 0.02]).p_min == 2 / 2**4     # a zero difference carries no sign
    assert sign_flip([0.0, 0.0]).p_min == 1.0


def _exact_sign_flip_integers(k: np.ndarray) -> float:
    """Exact two-sided p for integer differences: the null distribution of sum(+-k_i) by convolution."""
    offset = int(np.sum(np.abs(k)))
    counts = np.zeros(2 * offset + 1, dtype=np.int64)
    counts[offset] = 1
    for v in np.abs(k):
        shifted = np.zeros_like(counts)
        shifted[v:] += counts[:counts.size - v]
        shifted[:counts.size - v] += counts[v:]
        counts = shifted
    sums = np.arange(-offset, offset + 1)
    return counts[np.abs(sums) >= abs(int(np.sum(k)))].sum() / 2.0 ** len(k)


def test_sign_flip_exact_at_20_and_monte_carlo_above():
    rng = np.random.default_rng(11)
    k20 = rng.integers(-40, 60, 20)
    exact = sign_flip(k20 / 10_000)
    assert exact.method == "exact" and exact.flips == 2**20
    assert exact.p_value == pytest.approx(_exact_sign_flip_integers(k20), rel=1e-12)

    k26 = rng.integers(-50, 58, 26)
    k26[[3, 17]] = 0  # zero differences carry no sign: smallest p = 2 / 2^24
    expected = _exact_sign_flip_integers(k26)
    assert 0.02 < expected < 0.5  # a p-value with room either side, so the check means something
    mc = sign_flip(k26 / 10_000)
    assert mc.method == "monte carlo" and mc.flips == SIGN_FLIP_DRAWS
    se = math.sqrt(expected * (1 - expected) / SIGN_FLIP_DRAWS)
    assert abs(mc.p_value - expected) < 4 * se
    assert mc.p_min == pytest.approx(2 / 2**24)
    assert sign_flip(k26 / 10_000) == mc  # fixed seed: the same answer every time


# ---------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_binomtest(level):
    for n in (1, 2, 5, 10, 37):
        for k in range(n + 1):
            ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
            assert clopper_pearson(k, n, level) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-14)


def test_clopper_pearson_bad_input():
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    with pytest.raises(ValueError):
        clopper_pearson(4, 3)
    with pytest.raises(ValueError):
        clopper_pearson(1.5, 3)


# --------------------------------------------------------------------- Holm


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_holm_matches_statsmodels(seed):
    rng = np.random.default_rng(300 + seed)
    p = rng.uniform(0, 0.2, 12) ** 2
    p[3] = p[7]                      # a tie
    p[5] = 1.0
    expected = multipletests(p, method="holm")[1]
    np.testing.assert_allclose(holm(p), expected, rtol=1e-12)
    with_nan = np.insert(p, [0, 4, 12], np.nan)
    out = holm(with_nan)
    assert np.array_equal(np.isnan(out), np.isnan(with_nan))  # NaNs stay where they were, m counts the rest
    np.testing.assert_allclose(out[~np.isnan(with_nan)], expected, rtol=1e-12)


def test_holm_small_cases():
    np.testing.assert_allclose(holm([0.01, math.nan, 0.04]), [0.02, math.nan, 0.04])
    np.testing.assert_allclose(holm([0.04, 0.01, 0.03]), [0.06, 0.03, 0.06])  # monotone: max over earlier
    assert holm([0.6, 0.7])[0] == 1.0                                         # capped at 1
    assert np.isnan(holm([math.nan])).all() and holm([]).size == 0
    with pytest.raises(ValueError):
        holm([0.5, 1.2])


# -------------------------------------------------------------------- power


@pytest.mark.parametrize("es", [0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("alpha,power", [(0.05, 0.8), (0.01, 0.9)])
def test_seeds_needed_matches_statsmodels(es, alpha, power):
    sd = 0.01
    expected = math.ceil(TTestPower().solve_power(effect_size=es, alpha=alpha, power=power,
                                                  alternative="two-sided"))
    assert seeds_needed(es * sd, sd, alpha=alpha, power=power) == max(expected, 2)


@pytest.mark.parametrize("es", [0.05, 0.1, 0.2])
def test_seeds_needed_at_low_power_counts_both_tails(es):
    # at a low target power the wrong-sign tail P(T < -t_crit) is a sizeable part of the power
    expected = math.ceil(TTestPower().solve_power(effect_size=es, alpha=0.05, power=0.12, alternative="two-sided"))
    assert seeds_needed(es * 0.01, 0.01, alpha=0.05, power=0.12) == expected


def test_paired_power_matches_statsmodels():
    for es in (0.05, 0.2, 0.5, 1.0):
        for n in (2, 3, 10, 50, 400, 5_000):
            expected = TTestPower().power(effect_size=es, nobs=n, alpha=0.05, alternative="two-sided")
            # at large nc scipy's far tail is NaN and statsmodels returns NaN; with nc = es sqrt(n) >= 10
            # the power is 1 within 1e-15 (P(T < 1.97) <= Phi(-8))
            if math.isnan(expected):
                assert es * math.sqrt(n) >= 10
                expected = 1.0
            assert paired_power(n, es * 0.01, 0.01) == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert paired_power(n, -es * 0.01, 0.01) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _simulated_power(n: int, effect: float, sd: float, alpha: float, rng: np.random.Generator,
                     experiments: int = 20_000) -> float:
    d = rng.normal(effect, sd, (experiments, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    return float(np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)))


@pytest.mark.parametrize("effect,sd", [(0.01, 0.01), (0.01, 0.02), (0.005, 0.004)])
def test_seeds_needed_by_simulation(effect, sd):
    rng = np.random.default_rng(17)
    n = seeds_needed(effect, sd)
    assert _simulated_power(n, effect, sd, 0.05, rng) >= 0.8 - 0.02
    assert _simulated_power(n - 1, effect, sd, 0.05, rng) < 0.8 + 0.02


def test_seeds_needed_undefined_and_beyond_max():
    assert seeds_needed(0.01, 0.0) is None
    assert seeds_needed(0.01, math.nan) is None
    assert seeds_needed(0.0, 0.01) is None
    assert seeds_needed(-0.01, 0.01) is None
    assert seeds_needed(0.0001, 0.05) is None                       # needs ~2 million seeds
    exact = math.ceil(TTestPower().solve_power(effect_size=0.25, alpha=0.05, power=0.8))
    assert seeds_needed(0.0025, 0.01, max_n=exact) == exact
    assert seeds_needed(0.0025, 0.01, max_n=exact - 1) is None
    with pytest.raises(ValueError):
        seeds_needed(0.01, 0.01, power=1.0)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(23)
    d = rng.normal(0.004, 0.01, 12)
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=20_000, confidence_level=0.95,
                          rng=np.random.default_rng(99)).confidence_interval
    low, high = bootstrap_ci(d)
    tolerance = 0.08 * np.std(d, ddof=1) / math.sqrt(d.size)  # Monte Carlo error of two 10k/20k-resample quantiles
    assert abs(low - ref.low) < tolerance and abs(high - ref.high) < tolerance
    assert bootstrap_ci(d, seed=5) == bootstrap_ci(d, seed=5)
    assert all(math.isnan(v) for v in bootstrap_ci([0.1]))


def test_bootstrap_undercovers_at_small_n():
    # why BOOTSTRAP_MIN_N exists: at n = 3 a nominal 95% percentile interval covers the mean ~76% of the time
    rng = np.random.default_rng(29)
    x = rng.normal(0.0, 1.0, (1_000, 3))
    covered = sum(low <= 0.0 <= high for low, high in (bootstrap_ci(row, resamples=2_000, seed=i)
                                                      for i, row in enumerate(x)))
    assert 0.70 < covered / 1_000 < 0.82
    assert BOOTSTRAP_MIN_N == 10


def test_clip_unit():
    assert clip_unit(-0.02, 0.4) == (0.0, 0.4, True)
    assert clip_unit(0.97, 1.03) == (0.97, 1.0, True)
    assert clip_unit(0.2, 0.4) == (0.2, 0.4, False)
    low, high, clipped = clip_unit(math.nan, math.nan)
    assert math.isnan(low) and math.isnan(high) and not clipped


# --------------------------------------------------------------- simulation


def test_paired_t_interval_covers_true_difference():
    rng = np.random.default_rng(31)
    experiments, n, true = 2_000, 5, 0.01
    seed_effect = rng.normal(0, 0.02, (experiments, n))
    a = 0.8 + seed_effect + rng.normal(0, 0.006, (experiments, n))
    b = 0.8 + true + seed_effect + rng.normal(0, 0.006, (experiments, n))
    covered = 0
    for x, y in zip(a, b):
        t = paired_t(x, y)
        covered += t.ci_low <= true <= t.ci_high
    assert 0.93 <= covered / experiments <= 0.97


def test_holm_controls_family_wise_error():
    # 10 null variants and one reference over the same 5 seeds; each variant vs the reference (paired t).
    # The 10 tests share the reference, so they are positively correlated; Holm holds under any dependence.
    rng = np.random.default_rng(37)
    experiments, variants, n = 2_000, 10, 5
    acc = 0.8 + rng.normal(0, 0.02, (experiments, 1, n)) + rng.normal(0, 0.006, (experiments, variants + 1, n))
    any_raw = any_holm = 0
    for runs in acc:
        p = np.array([paired_t(runs[0], runs[j]).p_value for j in range(1, variants + 1)])
        any_raw += bool(np.any(p <= 0.05))
        any_holm += bool(np.any(holm(p) <= 0.05))
    assert any_holm / experiments <= 0.06
    assert any_raw / experiments > 0.15


# -------------------------------------------------------------- compare_two


PAIRED_LABELS = ["test", "mean difference", "confidence interval", "p-value", "sd of differences",
                 "effect size d_z", "sign-flip test", "probability of improvement", "seeds needed"]


def test_compare_two_paired():
    a = {0: 0.801, 1: 0.795, 2: 0.812, 3: 0.790, 4: 0.806, 5: 0.799, 9: 0.700}
    b = {0: 0.809, 1: 0.795, 2: 0.815, 3: 0.801, 4: 0.804, 5: 0.811, 8: 0.900}
    r = compare_two(a, b, effect=0.01, a_label="kernels=[5]", b_label="kernels=[3,3]")
    x = np.array([a[s] for s in range(6)])
    y = np.array([b[s] for s in range(6)])
    d = y - x
    ref = stats.ttest_rel(y, x)
    ci = ref.confidence_interval(0.95)
    assert r.method == "paired t-test" and r.n == 6 and (r.n_a, r.n_b, r.n_shared) == (7, 7, 6)
    assert r.mean_diff == pytest.approx(np.mean(d), rel=1e-12)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.sd_diff == pytest.approx(np.std(d, ddof=1), rel=1e-12)
    assert r.d_z == pytest.approx(np.mean(d) / np.std(d, ddof=1), rel=1e-12)
    p_flip, p_min = _brute_force_sign_flip([Fraction(round(v * 1000), 1000) for v in d])
    assert r.sign_flip_p == pytest.approx(float(p_flip)) and r.sign_flip_p_min == pytest.approx(float(p_min))
    assert r.sign_flip_method == "exact" and r.sign_flip_p_min == 2 / 2**5  # one seed ties: 5 signs matter
    # b > a on 4 seeds, 1 tie (seed 1), worse on 1: the tie does not count as an improvement
    assert (r.improved, r.ties, r.p_improve) == (4, 1, pytest.approx(4 / 6))
    cp = stats.binomtest(4, 6).proportion_ci(method="exact")
    assert (r.p_improve_low, r.p_improve_high) == pytest.approx((cp.low, cp.high), rel=1e-9)
    expected_n = math.ceil(TTestPower().solve_power(effect_size=0.01 / np.std(d, ddof=1), alpha=0.05, power=0.8))
    assert r.seeds_needed == expected_n
    assert math.isnan(r.boot_low) and math.isnan(r.p_holm)

    figures = dict(r.figures())
    assert [label for label, _ in r.figures()] == PAIRED_LABELS
    assert figures["test"] == "paired t-test (two-sided) on 6 shared seeds"
    assert figures["mean difference"] == f"{np.mean(d):+.4f}"
    assert figures["p-value"] == f"p = {ref.pvalue:#.4g}"
    assert figures["probability of improvement"] == (
        f"0.67 (better on 4 of 6 seeds, 1 tie counted as not better), 95% [{cp.low:.4f}, {cp.high:.4f}]")
    assert figures["seeds needed"] == f"about {expected_n} seeds to detect 0.010 with 80% power"
    assert figures["sign-flip test"].endswith("exact over 64 sign flips (smallest possible p = 0.06250)")
    assert r.notes == [
        "paired on 6 shared seeds; 1 seed of kernels=[5] and 1 of kernels=[3,3] have no partner and are left out",
        "with 6 seeds the sign-flip test cannot go below p = 0.06250",
    ]


def test_compare_two_bootstrap_only_from_min_n():
    rng = np.random.default_rng(41)
    for n in (BOOTSTRAP_MIN_N - 1, BOOTSTRAP_MIN_N):
        x, y = _accuracies(rng, n, shift=0.004)
        r = compare_two(dict(enumerate(x)), dict(enumerate(y)))
        labels = [label for label, _ in r.figures()]
        if n < BOOTSTRAP_MIN_N:
            assert "bootstrap interval" not in labels and math.isnan(r.boot_low)
        else:
            assert labels == [*PAIRED_LABELS, "bootstrap interval"]
            ref = stats.bootstrap((y - x,), np.mean, method="percentile", n_resamples=20_000,
                                  rng=np.random.default_rng(3)).confidence_interval
            tolerance = 0.08 * np.std(y - x, ddof=1) / math.sqrt(n)
            assert abs(r.boot_low - ref.low) < tolerance and abs(r.boot_high - ref.high) < tolerance
            assert not any("sign-flip test cannot" in note for note in r.notes)  # 2/2^10 < 0.05


def test_compare_two_pairs_from_two_shared_seeds():
    r = compare_two({1: 0.80, 2: 0.81, 3: 0.70}, {1: 0.82, 2: 0.815})
    ref = stats.ttest_rel([0.82, 0.815], [0.80, 0.81])
    assert r.method == "paired t-test" and r.n == 2 and r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert "with 2 seeds the sign-flip test cannot go below p = 0.5000" in r.notes
    assert "1 seed of a and 0 of b have no partner" in r.notes[0]


def test_compare_two_welch_when_seeds_do_not_pair():
    a = {1: 0.80, 2: 0.81, 3: 0.79}
    b = {3: 0.82, 4: 0.83, 5: 0.815, 6: 0.825}
    r = compare_two(a, b, a_label="kernels=[5]", b_label="kernels=[3,3]")
    ref = stats.ttest_ind(list(b.values()), list(a.values()), equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert r.method == "Welch t-test" and r.n == 7 and r.n_shared == 1
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r.df == pytest.approx(ref.df, rel=1e-10)
    assert [label for label, _ in r.figures()] == ["test", "mean difference", "confidence interval", "p-value",
                                                   "degrees of freedom"]
    assert dict(r.figures())["test"] == "Welch t-test (two-sided, unpaired) on 3 and 4 values"
    assert r.notes == ["the seeds do not pair (kernels=[5] and kernels=[3,3] share 1 seed), "
                       "so Welch's unpaired t-test was used"]


def test_compare_two_no_test():
    r = compare_two({1: 0.80}, {1: 0.82, 2: 0.83, 3: 0.815}, a_label="kernels=[5]", b_label="kernels=[3,3]")
    assert r.method == "none" and r.n == 0 and math.isnan(r.p_value)
    assert r.notes == ["no test: kernels=[5] and kernels=[3,3] share 1 seed and have 1 and 3 values; "
                       "a test needs 2 shared seeds or 2 values on each side"]
    assert r.figures() == [("test", "none"), ("mean difference", "+0.0217")]
    empty = compare_two({}, {1: 0.5})
    assert empty.figures() == [("test", "none")] and "share 0 seeds and have 0 and 1 values" in empty.notes[0]


def test_compare_two_rejects_nan_and_bad_effect():
    with pytest.raises(ValueError, match="NaN"):
        compare_two({1: 0.8, 2: math.nan}, {1: 0.8, 2: 0.9})
    with pytest.raises(ValueError):
        compare_two({1: 0.8, 2: 0.7}, {1: 0.8, 2: 0.9}, effect=0.0)


def test_compare_two_constant_differences():
    r = compare_two({1: 1.0, 2: 2.0, 3: 3.0}, {1: 1.5, 2: 2.5, 3: 3.5})
    figures = dict(r.figures())
    assert r.p_value == 0.0 and r.seeds_needed is None
    assert figures["effect size d_z"] == "+inf (the differences do not vary)"
    assert figures["seeds needed"] == "undefined: the paired differences do not vary"
    assert any("same difference (sd 0)" in note for note in r.notes)


def test_adjust_matches_statsmodels_and_skips_untested():
    rng = np.random.default_rng(43)
    results = []
    for shift in (0.0, 0.002, 0.01, 0.004):
        x, y = _accuracies(rng, 6, shift)
        results.append(compare_two(dict(enumerate(x)), dict(enumerate(y))))
    results.insert(2, compare_two({1: 0.8}, {2: 0.9}))  # no test: no p-value
    adjust(results)
    tested = [r for r in results if r.method != "none"]
    expected = multipletests([r.p_value for r in tested], method="holm")[1]
    np.testing.assert_allclose([r.p_holm for r in tested], expected, rtol=1e-12)
    assert math.isnan(results[2].p_holm)
    labels = [label for label, _ in tested[0].figures()]
    assert labels[:5] == ["test", "mean difference", "confidence interval", "p-value", "Holm-adjusted p"]
    assert dict(tested[0].figures())["Holm-adjusted p"].endswith("(Holm over 4 comparisons)")


def test_figures_follow_figure_labels_and_format():
    r = PairResult(a_label="a", b_label="b", method="paired t-test", n=5, n_a=5, n_b=5, n_shared=5, level=0.95,
                   mean_diff=0.01234, ci_low=-0.0031, ci_high=0.02778, p_value=0.098261, effect=0.01,
                   seeds_needed=14, sd_diff=0.0123, d_z=1.0033)
    figures = r.figures()
    labels = [label for label, _ in figures]
    assert labels == [label for label in FIGURE_LABELS if label in labels]  # FIGURE_LABELS order
    text = dict(figures)
    assert text["p-value"] == "p = 0.09826"
    assert text["mean difference"] == "+0.0123"
    assert text["confidence interval"] == "95% [-0.0031, +0.0278]"
    assert text["seeds needed"] == "about 14 seeds to detect 0.010 with 80% power"
    assert text["effect size d_z"] == "+1.003"
    assert p_text(0.5) == "p = 0.5000" and p_text(1.234e-7) == "p = 1.234e-07"
    raw = r.as_dict()
    assert raw["p_value"] == 0.098261 and raw["seeds_needed"] == 14 and raw["notes"] == ""
    assert r.title() == "b - a"
