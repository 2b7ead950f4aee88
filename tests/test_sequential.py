"""cnnlab.results.sequential: the safe t-test e-value, its confidence sequence and the sequential decisions.

`pytest -s tests/test_sequential.py` prints the simulation figures quoted in the README.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from cnnlab.results.sequential import (
    STATES,
    Ablation,
    Look,
    SequentialComparison,
    cs_radius,
    e_value,
    e_value_sup,
    fixed_n_for_power,
    min_seeds,
    run_paths,
    simulate,
)

SIM = dict(n_sims=2000, max_seeds=30, round_size=2, alpha=0.05, g=1.0)


# --------------------------------------------------------------------------- the e-value


@pytest.mark.parametrize("n, t, g", [(2, 0.5, 1.0), (3, 2.0, 1.0), (5, -1.3, 0.5), (10, 3.0, 1.0),
                                     (20, 1.0, 2.0), (30, 4.5, 0.25), (8, 0.0, 1.0)])
def test_closed_form_is_the_bayes_factor_of_t(n, t, g):
    """E_n = int nct.pdf(t, nu, delta sqrt(n)) N(delta; 0, g) d delta / t.pdf(t, nu)."""
    nu = n - 1

    def integrand(delta):
        return stats.nct.pdf(t, nu, delta * math.sqrt(n)) * stats.norm.pdf(delta, 0.0, math.sqrt(g))

    marginal, _ = integrate.quad(integrand, -np.inf, np.inf, epsabs=0.0, epsrel=1e-11, limit=200)
    assert e_value(t, n, g) == pytest.approx(marginal / stats.t.pdf(t, nu), rel=1e-7)


def test_e_value_broadcasts_is_symmetric_and_increasing_in_abs_t():
    t = np.linspace(-6, 6, 121)
    n = np.array([[2], [5], [30]])
    e = e_value(t, n)
    assert e.shape == (3, 121)
    np.testing.assert_allclose(e, e[:, ::-1])
    assert np.all(np.diff(e[:, 60:], axis=1) > 0)
    # |t| -> inf: the supremum (1 + n g)^((n-1)/2)
    for m in (2, 5, 30):
        assert e_value(np.inf, m) == pytest.approx(e_value_sup(m), rel=1e-12)
        assert e_value(1e8, m) == pytest.approx(e_value_sup(m), rel=1e-6)
    with pytest.raises(ValueError, match="n = 1"):
        e_value(1.0, 1)


# --------------------------------------------------------------------------- the confidence sequence


@pytest.mark.parametrize("alpha", [0.05, 0.025, 0.01])
@pytest.mark.parametrize("g", [0.5, 1.0, 2.0])
def test_cs_radius_solves_e_equals_one_over_alpha(alpha, g):
    rng = np.random.default_rng(3)
    for n in range(2, 61):
        c = cs_radius(n, alpha, g)
        if math.isinf(c):
            # unreachable: no t gives E_n >= 1/alpha
            assert e_value_sup(n, g) <= 1 / alpha
            continue
        assert e_value_sup(n, g) > 1 / alpha
        assert n >= min_seeds(alpha, g)
        x = rng.normal(0.3, 2.0, n)
        mean, se = x.mean(), x.std(ddof=1) / math.sqrt(n)
        for mu0 in (mean - c * se, mean + c * se):
            assert e_value((mean - mu0) / se, n, g) * alpha == pytest.approx(1.0, abs=1e-8)
        for inside in (0.0, 0.5, 1 - 1e-6):
            assert e_value(inside * c, n, g) < 1 / alpha
        root = optimize.brentq(lambda u, n=n: math.log(e_value(u, n, g)) + math.log(alpha), 0.0, 1e3,
                               xtol=1e-14, rtol=1e-14)
        assert c == pytest.approx(root, rel=1e-9)
    assert min_seeds(alpha, g) < 15


def test_min_seeds_with_default_prior():
    assert [cs_radius(n, 0.05) for n in (2, 3, 4)] == [math.inf] * 3
    assert math.isfinite(cs_radius(5, 0.05))
    assert [min_seeds(a) for a in (0.05, 0.025, 0.05 / 3, 0.01, 0.005)] == [5, 6, 6, 6, 7]


def test_widths_against_the_fixed_n_t_interval(capsys):
    """Half-widths at sd = 0.01 (1 point of accuracy): the price of validity under optional stopping."""
    sd, alpha = 0.01, 0.05
    ratios = []
    with capsys.disabled():
        print("\nhalf-width of the 95% interval, sd = 0.01:  n  CS  fixed-n t  ratio")
        for n in (10, 20, 30):
            cs = cs_radius(n, alpha) * sd / math.sqrt(n)
            tt = stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
            ratios.append(cs / tt)
            print(f"    {n:2d}  {cs:.5f}  {tt:.5f}  {cs / tt:.2f}")
    assert ratios == pytest.approx([1.71, 1.64, 1.64], abs=0.01)


# --------------------------------------------------------------------------- simulated ablations


def test_type_one_error_under_optional_stopping(capsys):
    """(a) True difference 0: the rate of deciding "different" stays below alpha."""
    r = simulate(0.0, margin_sd=0.25, seed=11, **SIM)
    with capsys.disabled():
        print(f"\n(a) true diff 0, margin 0.25 sd: different {r['rate_different']:.4f} "
              f"(better {r['rate_better']:.4f}, worse {r['rate_worse']:.4f}), "
              f"equivalent {r['rate_equivalent']:.4f}, undecided {r['rate_undecided']:.4f}")
    assert r["rate_different"] <= 0.05 + 0.01


def test_equivalence_error_and_seeds_against_fixed_n(capsys):
    """(b) True difference 1 sd, margin 0.25 sd: "equivalent" is rare. (c) Seeds used vs the fixed-n test."""
    r = simulate(1.0, margin_sd=0.25, seed=12, **SIM)
    power = r["rate_better"]
    successes = round(power * SIM["n_sims"])
    # one-sided 95% Clopper-Pearson lower bound of the sequential power: a fixed n that is smaller, so a
    # comparison that gives the fixed-n test the benefit of the doubt
    power_low = stats.beta.ppf(0.05, successes, SIM["n_sims"] - successes + 1)
    n_fixed = fixed_n_for_power(1.0, 0.05, min(power, 1 - 1e-4))
    n_fixed_low = fixed_n_for_power(1.0, 0.05, power_low)
    with capsys.disabled():
        print(f"\n(b) true diff 1 sd, margin 0.25 sd: equivalent {r['rate_equivalent']:.4f}, "
              f"better {r['rate_better']:.4f}, worse {r['rate_worse']:.4f}, undecided {r['rate_undecided']:.4f}")
        print(f"(c) seeds used: mean {r['seeds_mean']:.2f}, median {r['seeds_median']:.0f}, "
              f"90th percentile {r['seeds_p90']:.0f} (looks every 2 seeds, at most 30); "
              f"fixed-n paired t-test with the same power {power:.4f}: n = {n_fixed} "
              f"(n = {n_fixed_low} at its 95% lower bound {power_low:.4f})")
    assert r["rate_equivalent"] <= 0.05 + 0.01
    assert r["rate_worse"] <= 0.05 + 0.01
    assert 0.95 < power
    assert r["seeds_mean"] < n_fixed_low <= n_fixed
    assert r["seeds_median"] < n_fixed_low
    assert r["seeds_mean"] == pytest.approx(14.0, abs=1.0) and 10 <= r["seeds_median"] <= 16 and n_fixed == 20


def test_equivalence_is_reached_when_there_is_no_difference(capsys):
    r = simulate(0.0, margin_sd=1.0, seed=13, **SIM)
    with capsys.disabled():
        print(f"\ntrue diff 0, margin 1 sd: equivalent {r['rate_equivalent']:.4f}, "
              f"different {r['rate_different']:.4f}, seeds mean {r['seeds_mean']:.2f} "
              f"median {r['seeds_median']:.0f}")
    assert r["rate_equivalent"] >= 0.92  # measured 0.96
    assert r["rate_different"] <= 0.05 + 0.01


def test_fixed_n_for_power_known_values():
    # G*Power, paired t-test, two-sided alpha 0.05
    assert fixed_n_for_power(0.5, 0.05, 0.8) == 34
    assert fixed_n_for_power(1.0, 0.05, 0.8) == 10
    assert fixed_n_for_power(-1.0, 0.05, 0.8) == 10
    with pytest.raises(ValueError, match="power = 1"):
        fixed_n_for_power(1.0, 0.05, 1.0)


def test_vectorised_simulation_matches_the_comparison_object():
    rng = np.random.default_rng(5)
    x = rng.normal(rng.uniform(-1.2, 1.2, size=(300, 1)), 1.0, size=(300, 30))
    sizes = list(range(2, 31, 2))
    state, seeds = run_paths(x, sizes, 0.05, 0.8)
    assert set(state.tolist()) == {0, 1, 2, 3}
    for i in range(x.shape[0]):
        comp = SequentialComparison("v", 0.05, 0.8)
        for m in sizes:
            comp.update(x[i, :m])
        assert comp.state == STATES[state[i]]
        assert (comp.decided_at or sizes[-1]) == seeds[i]
        # "different" at the first look where E_n(mu0 = 0) >= 1/alpha, and never before
        first_big = next((look.seeds for look in comp.history if look.e_value >= 20), None)
        if comp.state in ("better", "worse"):
            assert first_big == comp.decided_at
        elif comp.state == "undecided":
            assert first_big is None


# --------------------------------------------------------------------------- replay, resume, state


def test_replay_and_resume_reach_the_same_state():
    rng = np.random.default_rng(7)
    d = rng.normal(0.007, 0.01, 40)
    sizes = [2, 4, 7, 10, 12, 16, 20, 26, 30, 40]
    live = SequentialComparison("no-bn", 0.05, 0.003)
    for m in sizes:
        live.update(d[:m])
    assert live.look_sizes == sizes
    assert (live.state, live.decided_at) == ("better", 16)  # decided after the restart below
    replayed = SequentialComparison.replay(d, sizes, "no-bn", 0.05, 0.003)
    assert replayed.history == live.history and replayed.state == live.state
    # a run killed after its 5th look, restarted: replays what it had, then goes on
    resumed = SequentialComparison.replay(d[:12], sizes[:5], "no-bn", 0.05, 0.003)
    resumed.update(d[:12])  # the restarted round re-reads the same seeds: no new look
    assert resumed.look_sizes == sizes[:5]
    for m in sizes[5:]:
        resumed.update(d[:m])
    assert resumed.history == live.history
    # the running intersection only shrinks
    lows = [look.low for look in live.history]
    highs = [look.high for look in live.history]
    assert lows == sorted(lows) and highs == sorted(highs, reverse=True)
    # the reference's earlier seeds may come back in another order
    again = SequentialComparison.replay(d, sizes[:3], "no-bn", 0.05, 0.003)
    look = again.update(np.concatenate([d[:7][::-1], d[7:10]]))
    assert look.state == live.history[3].state
    for field in ("seeds", "mean", "sd", "low", "high", "e_value"):
        assert getattr(look, field) == pytest.approx(getattr(live.history[3], field), rel=1e-12)


def test_state_is_frozen_and_a_conflict_restarts_the_intersection():
    comp = SequentialComparison("v", 0.05, 0.5)
    first = comp.update(10 + 0.01 * np.arange(6))
    assert first.state == "better" and comp.decided_at == 6
    later = comp.update(np.concatenate([10 + 0.01 * np.arange(6), -10 + 0.01 * np.arange(60)]))
    assert later.conflict and (later.low, later.high) == (later.look_low, later.look_high)
    assert later.state == "better" and later.high < 0


def test_changed_or_shrinking_data_is_rejected():
    comp = SequentialComparison("v", 0.05, 0.5)
    comp.update([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="fewer than the 3"):
        comp.update([0.1, 0.2])
    with pytest.raises(ValueError, match="first 3 differences"):
        comp.update([0.1, 0.2, 0.35, 0.4])
    with pytest.raises(ValueError, match="strictly increasing"):
        SequentialComparison.replay([0.1, 0.2, 0.3, 0.4], [3, 3], "v", 0.05, 0.5)


def test_look_fields():
    d = [0.2, 0.24, 0.22, 0.25, 0.19]
    look = SequentialComparison("v", 0.05, 0.5).update(d)
    assert isinstance(look, Look)
    assert look.seeds == 5 and look.mean == pytest.approx(0.22) and look.sd == pytest.approx(np.std(d, ddof=1))
    half = cs_radius(5, 0.05) * look.sd / math.sqrt(5)
    assert (look.low, look.high) == pytest.approx((0.22 - half, 0.22 + half))
    assert look.e_value == pytest.approx(e_value(0.22 / (look.sd / math.sqrt(5)), 5)) and look.e_value >= 20
    assert look.state == "better" and look.decided
    # the interval inside (-margin, margin) but not excluding 0: equivalent
    look = SequentialComparison("v", 0.05, 0.5).update([0.1, 0.3, 0.2, 0.25, 0.15])
    assert look.low < 0 < look.high < 0.5 and look.state == "equivalent"
    # too few seeds: the interval is the whole line
    early = SequentialComparison("v", 0.05, 0.5).update([0.1, 0.3, 0.2])
    assert (early.low, early.high, early.state) == (-math.inf, math.inf, "undecided")


# --------------------------------------------------------------------------- the ablation


def test_ablation_uses_bonferroni_and_is_done_when_all_are_decided():
    rng = np.random.default_rng(9)
    data = {"big": rng.normal(3.0, 1.0, 400), "null": rng.normal(0.0, 1.0, 400), "tiny": rng.normal(0.0, 0.05, 400)}
    ab = Ablation(list(data), alpha=0.05, margin=0.5)
    assert ab.alpha_each == pytest.approx(0.05 / 3)
    assert all(c.alpha == pytest.approx(0.05 / 3) for c in ab.comparisons.values())
    assert ab.min_seeds() == 6
    n, was_done = 0, []
    for n in range(4, 401, 4):
        looks = ab.update({c: d[:n] for c, d in data.items()})
        assert all(look.radius == cs_radius(n, 0.05 / 3) for look in looks.values())
        was_done.append(ab.done)
        assert ab.done == all(look.decided for look in looks.values())
        if ab.done:
            break
    assert ab.done and was_done[:-1] == [False] * (len(was_done) - 1)
    assert ab.states == {"big": "better", "null": "equivalent", "tiny": "equivalent"}
    assert ab.comparisons["big"].decided_at < n and ab.comparisons["null"].decided_at == n
    replayed = Ablation.replay(data, ab.look_sizes, 0.05, 0.5)
    assert {c: x.history for c, x in replayed.comparisons.items()} == {c: x.history for c, x in
                                                                         ab.comparisons.items()}
    text = ab.error_rate_text()
    assert "family-wise error <= 0.05 over 3 comparisons (Bonferroni" in text and "Pérez-Ortiz" in text
    with pytest.raises(ValueError, match="missing"):
        ab.update({"big": data["big"][:n]})


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), r"alpha = 0.0: must be in \(0, 0.5\)"),
    (dict(alpha=0.5), r"alpha = 0.5: must be in \(0, 0.5\)"),
    (dict(alpha=-0.1), r"alpha = -0.1: must be in \(0, 0.5\)"),
    (dict(alpha="x"), r"alpha = 'x': must be a number in \(0, 0.5\)"),
    (dict(margin=0.0), r"margin = 0.0: must be a finite number > 0"),
    (dict(margin=-0.01), r"margin = -0.01: must be a finite number > 0"),
    (dict(margin=float("nan")), r"margin = nan: must be a finite number > 0"),
    (dict(g=0.0), r"g = 0.0: must be a finite number > 0"),
])
def test_bad_settings_are_named(kwargs, match):
    settings = dict(alpha=0.05, margin=0.01) | kwargs
    with pytest.raises(ValueError, match=match):
        SequentialComparison("v", **settings)
    with pytest.raises(ValueError, match=match):
        Ablation(["v", "w"], **settings)


def test_bad_looks_are_named():
    comp = SequentialComparison("no-bn", 0.05, 0.01)
    with pytest.raises(ValueError, match=r"no-bn: 1 difference\(s\) at a look; a look needs at least 2"):
        comp.update([0.01])
    with pytest.raises(ValueError, match=r"no-bn: difference #1 is nan"):
        comp.update([0.01, float("nan"), 0.02])
    ab = Ablation(["a", "b"], 0.05, 0.01)
    with pytest.raises(ValueError, match=r"b: 0 difference\(s\) at a look"):
        ab.update({"a": [0.01, 0.02], "b": []})
    with pytest.raises(ValueError, match="names must be unique"):
        Ablation(["a", "a"], 0.05, 0.01)
    with pytest.raises(ValueError, match="at least one comparison"):
        Ablation([], 0.05, 0.01)
